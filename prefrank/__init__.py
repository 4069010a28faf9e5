"""prefrank: fused kernels and drop-in losses for listwise and group preference alignment.

Public surface: ``prefrank.ops`` (kernels as differentiable functions), ``prefrank.losses`` (preference
losses), ``prefrank.reference`` (pure-PyTorch oracles of every op).
"""

__version__ = "0.1.0"
