"""Which implementation an op runs: per call (``impl=``), per block (``use_backend``) or process-wide.

``auto``      CUDA tensors → Triton kernels / CUDA extension; CPU tensors → the C++ CPU kernels.
``reference`` the pure-PyTorch code in :mod:`prefrank.reference` (debugging, A/B checks, any device).
``triton``    the Triton kernels, on CPU tensors too; only meaningful under ``TRITON_INTERPRET=1`` (how CI
              runs the Triton kernels without a GPU). Ops without a Triton kernel run their C++ kernels.

Every op takes ``impl="auto"|"reference"|"triton"``; ``impl="auto"`` means "the current default", which is,
in order: the innermost enclosing :func:`use_backend` block of this thread / async task (a ``ContextVar``,
so threads never see each other's blocks), else the process-wide :func:`set_backend` value, else the
environment variable ``PREFRANK_BACKEND`` (read at import), else ``"auto"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Iterator
from typing import Literal

import torch

Impl = Literal["auto", "reference", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "triton")

_process_default = "auto"
_process_lock = threading.Lock()
_block_default: contextvars.ContextVar[str | None] = contextvars.ContextVar("prefrank_backend", default=None)


def _checked(name: object, argument: str = "backend") -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: Impl) -> None:
    """Select the process-wide default implementation (``"auto"``, ``"reference"`` or ``"triton"``)."""
    global _process_default
    with _process_lock:
        _process_default = _checked(name)


def get_backend() -> str:
    """The default ``impl="auto"`` resolves to here (innermost ``use_backend`` block, else process-wide)."""
    if torch.compiler.is_compiling() and not _DYNAMO_TRACES_CONTEXTVARS:
        return _block_default_at_trace() or _process_default
    block = _block_default.get()
    return block if block is not None else _process_default


# torch.compile reads (and guards on) a ContextVar from torch 2.14 on (checked: a use_backend block around a
# compiled call recompiles); torch 2.11's dynamo cannot trace ContextVar.get at all (fullgraph fails), so there
# the block seen while tracing is taken as a constant: a compiled function keeps the block it was traced in.
_DYNAMO_TRACES_CONTEXTVARS = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)


@torch.compiler.assume_constant_result
def _block_default_at_trace() -> str:
    return _block_default.get() or ""


@contextlib.contextmanager
def use_backend(name: Impl) -> Iterator[None]:
    """Run the enclosed code with another default implementation (this thread / task only), then restore."""
    token = _block_default.set(_checked(name))
    try:
        yield
    finally:
        _block_default.reset(token)


def resolve(impl: object) -> str:
    """The implementation one call runs: ``impl`` itself unless it is ``"auto"``, then the current default.

    Returns ``"auto"`` (compiled kernels by device), ``"reference"`` or ``"triton"``; ValueError naming
    ``impl`` for anything else.
    """
    impl = _checked(impl, "impl")
    return get_backend() if impl == "auto" else impl


set_backend(os.environ.get("PREFRANK_BACKEND", "auto"))
