"""prefrank's public functional API: differentiable ops backed by fused kernels.

Every op validates its inputs (clear ``ValueError``/``TypeError`` naming the argument), then dispatches on
the device and the selected backend (see :mod:`prefrank.backend`): CUDA tensors → Triton kernels / the CUDA
extension, CPU tensors → the C++ CPU kernels, ``set_backend("reference")`` → :mod:`prefrank.reference`.
"""

from prefrank.backend import get_backend, set_backend, use_backend
from prefrank.logprobs import linear_sequence_logprobs, sequence_logprobs
from prefrank.plackett_luce import plackett_luce_nll
from prefrank.sortnet import soft_sort, sortnet_rank_loss

__all__ = [
    "get_backend",
    "linear_sequence_logprobs",
    "plackett_luce_nll",
    "sequence_logprobs",
    "set_backend",
    "soft_sort",
    "sortnet_rank_loss",
    "use_backend",
]
