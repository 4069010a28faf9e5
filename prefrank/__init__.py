"""prefrank: fused kernels and drop-in losses for listwise and group preference alignment.

Public surface: ``prefrank.ops`` (kernels as differentiable functions), ``prefrank.losses`` (preference
losses), ``prefrank.reference`` (pure-PyTorch oracles of every op), ``prefrank.debug()`` (data checks on
every device), ``prefrank.__version__``. The trainer (``prefrank.train``) is optional and never imported here.
"""

from prefrank import losses, ops
from prefrank._checks import debug
from prefrank._extension import info

__version__ = "0.1.0"

__all__ = ["__version__", "debug", "info", "losses", "ops"]
