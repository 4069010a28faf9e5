"""Input validation shared by every op (errors name the offending argument), and output allocation.

Two kinds of checks:
- shape, dtype, device and option checks look only at metadata: always on, on every device, also under
  torch.compile;
- data checks (NaN/+inf scores, label ranges, duplicate ranking entries, lists without two levels) must read
  the tensor's values, which on a GPU is a device→host synchronisation in the training step. They run when
  :func:`data_checks_enabled` says so: eagerly on CPU tensors (no sync cost there), on any device inside
  :func:`debug` / with ``PREFRANK_DEBUG=1``, never while torch.compile traces. On CUDA tensors outside
  debug mode the kernels instead never read out of bounds and produce NaN for an affected list.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch

REDUCTIONS = ("none", "mean", "sum")


def new_output(shape, *, dtype, device):
    """An uninitialised output buffer; NaN-filled when PREFRANK_POISON_OUTPUTS is set (the test suite sets it),
    so an element the code forgets to write fails the tests instead of passing on leftover memory (the
    Python twin of csrc/output_alloc.h)."""
    if os.environ.get("PREFRANK_POISON_OUTPUTS"):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def compiling():
    """True while torch.compile traces: data-dependent checks are skipped there (they would break the graph)."""
    return torch.compiler.is_compiling()


_debug_block: contextvars.ContextVar[bool | None] = contextvars.ContextVar("prefrank_debug", default=None)


@contextlib.contextmanager
def debug(enabled: bool = True) -> Iterator[None]:
    """Run the enclosed code with data checks on every device (``prefrank.debug()``; env ``PREFRANK_DEBUG=1``).

    Outside it, checks that read tensor values run on CPU tensors only, so a CUDA training step never waits
    for the host. Inside it, a CUDA call that would have produced NaN raises the same ValueError as on CPU.
    ``debug(False)`` turns the CUDA data checks off again inside an enclosing debug block. Per thread / task.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    token = _debug_block.set(enabled)
    try:
        yield
    finally:
        _debug_block.reset(token)


def debug_enabled() -> bool:
    """True inside :func:`debug` or when ``PREFRANK_DEBUG`` is set to 1 (and no ``debug(False)`` block)."""
    block = _debug_block.get()
    if block is not None:
        return block
    return os.environ.get("PREFRANK_DEBUG", "0") not in ("", "0")


def data_checks_enabled(*tensors: torch.Tensor | None) -> bool:
    """Whether value-reading checks run for these inputs: not while compiling; in debug mode always; else
    only when every given tensor is on the CPU device (meta tensors are not; a FakeTensorMode trace of CPU
    tensors outside torch.compile would read values, so the fake-tensor tests use CUDA fakes)."""
    if compiling():
        return False
    return all(t is None or t.device.type == "cpu" for t in tensors) or debug_enabled()


def float_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32/float16/bfloat16/float64), "
                        f"got {value.dtype}")
    return value


def int_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64 preferred), got {value.dtype}")
    return value


def bool_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = keep), got {value.dtype}")
    return value


def same_device(reference_name, reference, **others):
    for name, value in others.items():
        if value is not None and value.device != reference.device:
            raise ValueError(f"{name} is on {value.device} but {reference_name} is on {reference.device}")


def same_shape(reference_name, reference, **others):
    for name, value in others.items():
        if value is not None and value.shape != reference.shape:
            raise ValueError(f"{name} must have the shape of {reference_name} {tuple(reference.shape)}, "
                             f"got {tuple(value.shape)}")


def choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def positive_int_or_none(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def normalized_dim(name, dim, ndim):
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a tensor with {ndim} dimension(s)")
    return dim % ndim


def finite_or_neg_inf(name, value):
    """Reject NaN and +inf (silent NaN results otherwise); -inf is a defined strength-0 score."""
    if not data_checks_enabled(value):
        return
    if torch.isnan(value).any() or torch.isposinf(value).any():
        raise ValueError(f"{name} contains NaN or +inf")


def reduce(values, reduction):
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return values.mean()
