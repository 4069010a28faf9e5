"""Input validation shared by every op (errors name the offending argument), and output allocation."""

import os

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
    if compiling():
        return
    if torch.isnan(value).any() or torch.isposinf(value).any():
        raise ValueError(f"{name} contains NaN or +inf")


def reduce(values, reduction):
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return values.mean()
