"""Differentiable sorting networks: ``soft_sort`` and ``sortnet_rank_loss``, and the custom ops behind them.

Which kernel runs (``impl=`` per call; ``"auto"`` follows :mod:`prefrank.backend`):

=================  ====================================================  =============================
impl               CPU tensors                                           CUDA tensors
=================  ====================================================  =============================
``"auto"``         C++ kernels ``torch.ops.prefrank_C.sortnet_*``         Triton kernels
                   (csrc/sortnet_cpu.cpp, needs the compiled extension)  (triton_kernels/sortnet.py)
``"triton"``       the Triton kernels in the interpreter (needs           Triton kernels
                   ``TRITON_INTERPRET=1``; how CI tests them)
``"reference"``    :mod:`prefrank.reference` (pure PyTorch, autograd)     the same
=================  ====================================================  =============================

The kernels sit behind four custom ops, each with a ``cpu`` and a ``cuda`` kernel, a fake kernel (so
``torch.compile`` traces them as single nodes, static or dynamic shapes) and, for the two forward ops,
autograd through the matching backward op; their trailing ``use_triton`` picks the Triton launcher on CPU:

- ``prefrank::sortnet_forward(x, network, relaxation, steepness, art_lambda, with_perm, use_triton)``
  → ``(values, P or an empty tensor, α)`` of the ascending sort of each row of the (lists, n) x;
- ``prefrank::sortnet_backward(grad_values, grad_perm, x, α, …)`` → ∂L/∂x;
- ``prefrank::sortnet_loss_forward(y, sizes, lo, hi, target, network, …)`` → ``(per-list loss, α)`` of the
  compacted lists (see :func:`_compact_lists`);
- ``prefrank::sortnet_loss_backward(grad_loss, y, sizes, lo, hi, α, target, …)`` → ∂L/∂y.

Option codes are ``prefrank._options`` (``Network``, ``Relaxation``, ``Target``). A second-order backward
raises ``RuntimeError("double backward of prefrank.<op> is not implemented")``.

Checks: shapes, dtypes and options are checked on every call (ValueError/TypeError naming the argument).
Value checks — NaN/±inf in ``x`` or in a scored item of ``scores`` (``groups >= 0``), levels below -1,
tied levels under ``target="permutation"`` — run when :func:`prefrank._checks.data_checks_enabled` says so
(CPU tensors, or :func:`prefrank.debug` on any device) and raise ValueError. Otherwise (CUDA by default, and
while compiling) nothing is read back to the host: the kernels never read out of bounds, a non-finite
``x`` comes out as NaN in its list's values and P, and an affected ``sortnet_rank_loss`` list gives NaN.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from prefrank import _checks, _extension, backend, networks, reference
from prefrank._options import Network, Relaxation, Target, code
from prefrank.backend import Impl

# Largest n the Triton kernels take (one list's wires live in one register tile; prefrank.triton_kernels.
# sortnet.MAX_N): longer lists raise a ValueError on that path. The C++ CPU kernels and the reference have
# no limit.
TRITON_MAX_N = 512


def _real(name, value):
    # torch.compile(dynamic=True) passes float arguments as SymFloats: comparisons (guards) work on both
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_options(network, relaxation, steepness, art_lambda):
    """(network code, relaxation code) of valid options; ValueError/TypeError naming the bad one."""
    network_code = code(Network, "network", network)
    relaxation_code = code(Relaxation, "relaxation", relaxation)
    if _real("steepness", steepness) <= 0:
        raise ValueError(f"steepness must be > 0, got {steepness}")
    if _real("art_lambda", art_lambda) < 0:
        raise ValueError(f"art_lambda must be >= 0, got {art_lambda}")
    return network_code, relaxation_code


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _kernel_path(impl, device, n):
    """use_triton for the custom ops (after eager checks that the chosen kernels can run these inputs)."""
    use_triton = impl == "triton"
    if device.type == "cuda" or use_triton:
        if n > TRITON_MAX_N:
            raise ValueError(f"n={n} items exceeds the Triton sorting-network kernels' limit of {TRITON_MAX_N} "
                             f"(use CPU tensors or impl='reference' for longer lists)")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("impl='triton' on CPU tensors runs the Triton interpreter: set TRITON_INTERPRET=1 "
                               "before triton is imported, or use impl='auto'")
    elif device.type == "cpu":
        _extension.require()
    return use_triton


def soft_sort(x: Tensor, *, network: str = "odd_even", relaxation: str = "cauchy", steepness: float = 10.0,
              art_lambda: float = 0.25, descending: bool = False, dim: int = -1, return_permutation: bool = True,
              impl: Impl = "auto") -> tuple[Tensor, Tensor | None]:
    """Relaxed sorting network (Petersen et al.): soft-sorted values and the soft permutation matrix.

    Args:
        x: ``(..., n, ...)`` float tensor, the n ≥ 1 items along ``dim`` (any leading/trailing batch shape,
            any strides; an empty batch gives empty results).
        network: ``"odd_even"`` (n layers) or ``"bitonic"`` (⌈log₂n⌉(⌈log₂n⌉+1)/2 layers), any n ≥ 1.
        relaxation: ``"logistic"``, ``"logistic_phi"`` (ART with ``art_lambda``), ``"gaussian"``,
            ``"reciprocal"``, ``"cauchy"`` or ``"optimal"``: the comparator's sigmoid f.
        steepness: inverse temperature s > 0 of the relaxation.
        descending: put the largest value at position 0 (sorts −x, as diffsort users feed −x).
        dim: the item axis.
        return_permutation: also return P; when False P is neither computed nor stored.
        impl: ``"auto"``, ``"reference"`` or ``"triton"`` (see the module docstring).

    Returns:
        ``(values, P)``: values shaped like ``x`` (sorted along ``dim``) and P of shape
        ``x.shape without dim + (n, n)`` with ``P[..., i, r]`` = weight of input i at output position r, so
        ``values[..., r] = Σ_i x[..., i] P[..., i, r]`` (diffsort's convention: ``soft_sort(x)`` equals
        ``diffsort.DiffSortNet(network, n, steepness=..., distribution=relaxation)(x)``). P is None when
        ``return_permutation=False``. float32 for fp32/fp16/bf16 inputs, float64 for float64.

    Raises ValueError for NaN/±inf in ``x`` where data checks run (CPU tensors, ``prefrank.debug()``);
    on CUDA otherwise the affected list's outputs hold NaN.

    Example::

        >>> values, P = soft_sort(torch.tensor([3.0, 1.0, 2.0]), steepness=50.0)
        >>> values.round(decimals=2)  # cauchy's heavy tails keep a little mass on the neighbours
        tensor([1.0100, 2.0000, 2.9900])
        >>> P.argmax(-1)  # each input's output position
        tensor([2, 0, 1])
    """
    _checks.float_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the items)")
    dim = _checks.normalized_dim("dim", dim, x.dim())
    n = x.shape[dim]
    if n < 1:
        raise ValueError(f"x must have at least one item along dim={dim}, got shape {tuple(x.shape)}")
    network_code, relaxation_code = _check_options(network, relaxation, steepness, art_lambda)
    _check_bool("descending", descending)
    _check_bool("return_permutation", return_permutation)
    impl = backend.resolve(impl)
    if _checks.data_checks_enabled(x) and not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf")
    if impl == "reference":
        return reference.soft_sort(x, network=network, relaxation=relaxation, steepness=float(steepness),
                                   art_lambda=float(art_lambda), descending=descending, dim=dim,
                                   return_permutation=return_permutation)
    use_triton = _kernel_path(impl, x.device, n)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    v = x.movedim(dim, -1).to(acc)
    if descending:
        v = -v
    batch_shape = v.shape[:-1]
    values, perm, _ = sortnet_forward(v.reshape(-1, n).contiguous(), network_code, relaxation_code,
                                      float(steepness), float(art_lambda), return_permutation, use_triton)
    values = values.reshape(batch_shape + (n,))
    if descending:
        values = -values
    return values.movedim(-1, dim), perm.reshape(batch_shape + (n, n)) if return_permutation else None


def sortnet_rank_loss(scores: Tensor, groups: Tensor, *, target: str = "block", network: str = "odd_even",
                      relaxation: str = "cauchy", steepness: float = 10.0, art_lambda: float = 0.25,
                      reduction: str = "mean", impl: Impl = "auto") -> Tensor:
    """Fused ranking loss on the relaxed best-first sort of ``scores`` (P is never written to memory).

    Args:
        scores: ``(..., n)`` float tensor, one list per leading index.
        groups: int tensor shaped like ``scores``: preference level of each item, 0 = most preferred, equal
            levels are ties, -1 = padding. Padding items never enter the sort (their scores may be anything,
            NaN included): each list's valid items, in their original order, are sorted by a network of
            their own size m.
        target: ``"block"``: −(1/m) Σ_i log(mass of item i on the block of positions its group occupies when
            the groups are concatenated best-first) — tie-aware; ``"permutation"``: diffsort's BCE between
            P and the one-hot permutation of the ranking given by ``groups`` (levels must then be distinct
            within a list), averaged over the m² entries of P.
        network, relaxation, steepness, art_lambda: as in :func:`soft_sort`.
        reduction: ``"none"`` (per list, shape ``scores.shape[:-1]``), ``"mean"`` or ``"sum"``.
        impl: ``"auto"``, ``"reference"`` or ``"triton"`` (see the module docstring).

    A list without valid items (n = 0 included) has loss 0. An empty batch gives an empty result for
    ``reduction="none"``, 0 for ``"sum"`` and a ValueError for ``"mean"``. float32 for fp32/fp16/bf16
    scores, float64 for float64. Where data checks run (CPU tensors, ``prefrank.debug()``) NaN/±inf in a
    scored item, levels below -1 and (permutation) tied levels raise ValueError; on CUDA otherwise that
    list's loss is NaN.

    Example::

        >>> scores, groups = torch.tensor([[2.0, 0.5, 1.0]]), torch.tensor([[0, 1, 1]])
        >>> sortnet_rank_loss(scores, groups) < sortnet_rank_loss(-scores, groups)  # item 0 best: lower loss
        tensor(True)
    """
    _checks.float_tensor("scores", scores)
    _checks.int_tensor("groups", groups)
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension (the items)")
    _checks.same_device("scores", scores, groups=groups)
    _checks.same_shape("scores", scores, groups=groups)
    target_code = code(Target, "target", target)
    network_code, relaxation_code = _check_options(network, relaxation, steepness, art_lambda)
    _checks.choice("reduction", reduction, _checks.REDUCTIONS)
    impl = backend.resolve(impl)
    batch_shape, n = scores.shape[:-1], scores.shape[-1]
    if reduction == "mean" and math.prod(batch_shape) == 0:
        raise ValueError(f"scores holds no lists (shape {tuple(scores.shape)}): reduction='mean' of an empty "
                         f"batch is undefined; use reduction='sum' or 'none'")
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    valid = groups >= 0
    checked = _checks.data_checks_enabled(scores, groups)
    if checked:
        if (groups < -1).any():
            raise ValueError("groups must hold levels >= 0, or -1 for padding")
        if (valid & ~torch.isfinite(scores)).any():
            raise ValueError("scores contains NaN or inf at an item with groups >= 0 (padding may hold anything)")
        if target == "permutation" and _tied_lists(groups).any():
            raise ValueError("groups must hold distinct levels within a list for target='permutation' "
                             "(ties need target='block')")
    if n == 0:  # every list is empty: loss 0 (kept differentiable w.r.t. scores)
        loss = scores.sum(-1).to(acc) * 0
    elif impl == "reference":
        loss = reference.sortnet_rank_loss(scores, groups, target=target, network=network, relaxation=relaxation,
                                           steepness=float(steepness), art_lambda=float(art_lambda),
                                           reduction="none")
    else:
        use_triton = _kernel_path(impl, scores.device, n)
        y, sizes, lo, hi = _compact_lists(scores, groups, target)
        loss, _ = sortnet_loss_forward(y, sizes, lo, hi, target_code, network_code, relaxation_code,
                                       float(steepness), float(art_lambda), use_triton)
        loss = loss.reshape(batch_shape)
    if not checked and n > 0:  # no host sync: the lists the checks would have rejected come out as NaN
        bad = ((groups < -1) | (valid & ~torch.isfinite(scores))).any(-1)
        if target == "permutation":
            bad = bad | _tied_lists(groups)
        loss = torch.where(bad, torch.full((), math.nan, dtype=loss.dtype, device=loss.device), loss)
    return _checks.reduce(loss, reduction)


def _tied_lists(groups):
    """Per list: two valid items (levels >= 0) share a level."""
    if groups.shape[-1] < 2:
        return torch.zeros(groups.shape[:-1], dtype=torch.bool, device=groups.device)
    ordered = torch.sort(groups.to(torch.int64), dim=-1).values
    return ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(-1)


def _compact_lists(scores, groups, target):
    """Kernel inputs of the rank losses, one row per list: the valid items first in their original order.

    y = −score (ascending sort of y = best first; 0 for padding), sizes = valid items per list, and per
    compacted item the positions [lo, hi) its group occupies when groups are concatenated best-first
    (permutation target: lo = the item's rank, hi = lo + 1). Every lo, hi lies in [0, size]: the kernels
    never read past a list, whatever ``groups`` holds.
    """
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    n = scores.shape[-1]
    s = scores.reshape(-1, n).to(acc)
    g = groups.reshape(-1, n).to(torch.int64)
    valid = g >= 0
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
    valid = valid.gather(-1, order)
    g = g.gather(-1, order)
    y = torch.where(valid, -s.gather(-1, order), torch.zeros((), dtype=acc, device=s.device)).contiguous()
    keys = torch.where(valid, g, torch.iinfo(torch.int64).max)
    ordered = torch.sort(keys, dim=-1).values.contiguous()
    lo = torch.searchsorted(ordered, keys)
    hi = torch.searchsorted(ordered, keys, right=True) if target == "block" else lo + 1
    zero = torch.zeros((), dtype=torch.int64, device=s.device)
    lo, hi = torch.where(valid, lo, zero).contiguous(), torch.where(valid, hi, zero).contiguous()
    return y, valid.sum(-1), lo, hi


# ------------------------------------------------------------------------------------------------------------
# custom ops
# ------------------------------------------------------------------------------------------------------------

def _triton_kernels():
    from prefrank.triton_kernels import sortnet as triton_sortnet

    return triton_sortnet


def _cpu_kernels(use_triton):
    """The Triton launchers (interpreter) or the C++ kernels: both take and return the same tensors."""
    if use_triton:
        return _triton_kernels()
    _extension.require()
    return torch.ops.prefrank_C


def _num_layers(network_code, n):
    return networks.num_layers(Network(network_code).name, n)


def _no_kernel(op, device):
    return NotImplementedError(f"prefrank::{op} has kernels for CPU and CUDA tensors only, got {device}")


@torch.library.custom_op("prefrank::sortnet_forward", mutates_args=())
def sortnet_forward(x: Tensor, network: int, relaxation: int, steepness: float, art_lambda: float,
                    with_perm: bool, use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(values, P or an empty tensor, α saved for the backward) of the ascending relaxed sort of each row of x."""
    raise _no_kernel("sortnet_forward", x.device)


@sortnet_forward.register_kernel("cpu")
def _(x, network, relaxation, steepness, art_lambda, with_perm, use_triton):
    return _cpu_kernels(use_triton).sortnet_forward(x, network, relaxation, steepness, art_lambda, with_perm)


@sortnet_forward.register_kernel("cuda")
def _(x, network, relaxation, steepness, art_lambda, with_perm, use_triton):
    return _triton_kernels().sortnet_forward(x, network, relaxation, steepness, art_lambda, with_perm)


@sortnet_forward.register_fake
def _(x, network, relaxation, steepness, art_lambda, with_perm, use_triton):
    B, n = x.shape
    perm = x.new_empty((B, n, n) if with_perm else (0,))
    return x.new_empty((B, n)), perm, x.new_empty((B, _num_layers(network, n), n))


@torch.library.custom_op("prefrank::sortnet_backward", mutates_args=())
def sortnet_backward(grad_values: Tensor, grad_perm: Tensor | None, x: Tensor, alpha: Tensor, network: int,
                     relaxation: int, steepness: float, art_lambda: float, use_triton: bool) -> Tensor:
    """∂L/∂x of :func:`sortnet_forward` from ∂L/∂values and ∂L/∂P (None: P was not used)."""
    raise _no_kernel("sortnet_backward", x.device)


@sortnet_backward.register_kernel("cpu")
def _(grad_values, grad_perm, x, alpha, network, relaxation, steepness, art_lambda, use_triton):
    return _cpu_kernels(use_triton).sortnet_backward(grad_values, grad_perm, x, alpha, network, relaxation,
                                                     steepness, art_lambda)


@sortnet_backward.register_kernel("cuda")
def _(grad_values, grad_perm, x, alpha, network, relaxation, steepness, art_lambda, use_triton):
    return _triton_kernels().sortnet_backward(grad_values, grad_perm, x, alpha, network, relaxation, steepness,
                                              art_lambda)


@sortnet_backward.register_fake
def _(grad_values, grad_perm, x, alpha, network, relaxation, steepness, art_lambda, use_triton):
    return x.new_empty(x.shape)


@torch.library.custom_op("prefrank::sortnet_loss_forward", mutates_args=())
def sortnet_loss_forward(y: Tensor, sizes: Tensor, lo: Tensor, hi: Tensor, target: int, network: int,
                         relaxation: int, steepness: float, art_lambda: float,
                         use_triton: bool) -> tuple[Tensor, Tensor]:
    """(per-list loss, α saved for the backward) of the compacted lists (:func:`_compact_lists`)."""
    raise _no_kernel("sortnet_loss_forward", y.device)


@sortnet_loss_forward.register_kernel("cpu")
def _(y, sizes, lo, hi, target, network, relaxation, steepness, art_lambda, use_triton):
    return _cpu_kernels(use_triton).sortnet_loss_forward(y, sizes, lo, hi, target, network, relaxation, steepness,
                                                         art_lambda)


@sortnet_loss_forward.register_kernel("cuda")
def _(y, sizes, lo, hi, target, network, relaxation, steepness, art_lambda, use_triton):
    return _triton_kernels().sortnet_loss_forward(y, sizes, lo, hi, target, network, relaxation, steepness,
                                                  art_lambda)


@sortnet_loss_forward.register_fake
def _(y, sizes, lo, hi, target, network, relaxation, steepness, art_lambda, use_triton):
    B, n = y.shape
    return y.new_empty((B,)), y.new_empty((B, _num_layers(network, n), n))


@torch.library.custom_op("prefrank::sortnet_loss_backward", mutates_args=())
def sortnet_loss_backward(grad_loss: Tensor, y: Tensor, sizes: Tensor, lo: Tensor, hi: Tensor, alpha: Tensor,
                          target: int, network: int, relaxation: int, steepness: float, art_lambda: float,
                          use_triton: bool) -> Tensor:
    """∂(Σ_b grad_loss[b]·loss[b])/∂y of :func:`sortnet_loss_forward`."""
    raise _no_kernel("sortnet_loss_backward", y.device)


@sortnet_loss_backward.register_kernel("cpu")
def _(grad_loss, y, sizes, lo, hi, alpha, target, network, relaxation, steepness, art_lambda, use_triton):
    return _cpu_kernels(use_triton).sortnet_loss_backward(grad_loss, y, sizes, lo, hi, alpha, target, network,
                                                          relaxation, steepness, art_lambda)


@sortnet_loss_backward.register_kernel("cuda")
def _(grad_loss, y, sizes, lo, hi, alpha, target, network, relaxation, steepness, art_lambda, use_triton):
    return _triton_kernels().sortnet_loss_backward(grad_loss, y, sizes, lo, hi, alpha, target, network,
                                                   relaxation, steepness, art_lambda)


@sortnet_loss_backward.register_fake
def _(grad_loss, y, sizes, lo, hi, alpha, target, network, relaxation, steepness, art_lambda, use_triton):
    return y.new_empty(y.shape)


def _forward_setup(ctx, inputs, output):
    x, network, relaxation, steepness, art_lambda, with_perm, use_triton = inputs
    ctx.set_materialize_grads(False)  # an unused P must not cost a backward pass through P
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(x, output[2])
    ctx.options = (network, relaxation, steepness, art_lambda, use_triton)


def _forward_backward(ctx, grad_values, grad_perm, _grad_alpha):
    x, alpha = ctx.saved_tensors
    if grad_values is None:
        grad_values = torch.zeros_like(x)
    if grad_perm is not None and grad_perm.numel() == 0:  # P was not requested (an empty placeholder)
        grad_perm = None
    return (sortnet_backward(grad_values, grad_perm, x, alpha, *ctx.options),) + (None,) * 6


def _loss_setup(ctx, inputs, output):
    y, sizes, lo, hi, target, network, relaxation, steepness, art_lambda, use_triton = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(y, sizes, lo, hi, output[1])
    ctx.options = (target, network, relaxation, steepness, art_lambda, use_triton)


def _loss_backward(ctx, grad_loss, _grad_alpha):
    y, sizes, lo, hi, alpha = ctx.saved_tensors
    return (sortnet_loss_backward(grad_loss, y, sizes, lo, hi, alpha, *ctx.options),) + (None,) * 9


def _no_double_backward(public_op):
    def backward(ctx, *grads):
        raise RuntimeError(f"double backward of prefrank.{public_op} is not implemented (the backward of its "
                           f"custom op is not differentiable); use impl='reference' for higher-order gradients")

    return backward


def _no_setup(ctx, inputs, output):
    pass


sortnet_forward.register_autograd(_forward_backward, setup_context=_forward_setup)
sortnet_loss_forward.register_autograd(_loss_backward, setup_context=_loss_setup)
sortnet_backward.register_autograd(_no_double_backward("soft_sort"), setup_context=_no_setup)
sortnet_loss_backward.register_autograd(_no_double_backward("sortnet_rank_loss"), setup_context=_no_setup)

__all__ = ["soft_sort", "sortnet_rank_loss"]
