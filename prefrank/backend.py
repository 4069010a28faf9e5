"""Which implementation an op runs: the compiled kernels (default) or the pure-PyTorch references.

``auto``      CUDA tensors → Triton kernels / CUDA extension; CPU tensors → the C++ CPU kernels.
``reference`` the pure-PyTorch code in :mod:`prefrank.reference` everywhere (debugging, A/B checks).
``triton``    like ``auto`` but Triton kernels also on CPU tensors; only meaningful under
              ``TRITON_INTERPRET=1`` (how CI runs the Triton kernels without a GPU). Ops without a Triton
              kernel use their C++ kernels.

The initial value comes from the environment variable ``PREFRANK_BACKEND`` (default ``auto``).
"""

import contextlib
import os

BACKENDS = ("auto", "reference", "triton")

_current = "auto"


def _checked(name):
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name):
    """Select the implementation every op uses from now on (``"auto"``, ``"reference"`` or ``"triton"``)."""
    global _current
    _current = _checked(name)


def get_backend():
    """The backend currently selected."""
    return _current


@contextlib.contextmanager
def use_backend(name):
    """Context manager: run the enclosed code with another backend, then restore the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


set_backend(os.environ.get("PREFRANK_BACKEND", "auto"))
