"""Differentiable sorting networks: argument handling and dispatch of soft_sort / sortnet_rank_loss."""

import math

import torch

from prefrank import _checks, _extension, backend, networks, reference

RELAXATIONS = ("logistic", "logistic_phi", "gaussian", "reciprocal", "cauchy", "optimal")
RELAXATION_CODE = {name: code for code, name in enumerate(RELAXATIONS)}
TARGETS = ("block", "permutation")
TARGET_CODE = {"block": 0, "permutation": 1}
# Largest n the Triton kernels take (one list's wires live in one register tile; prefrank.triton_kernels.
# sortnet.MAX_N): longer lists raise a ValueError on that path. The C++ CPU kernels and the reference have
# no limit.
TRITON_MAX_N = 512


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_options(network, relaxation, steepness, art_lambda):
    _checks.choice("network", network, networks.NETWORKS)
    _checks.choice("relaxation", relaxation, RELAXATIONS)
    if _real("steepness", steepness) <= 0:
        raise ValueError(f"steepness must be > 0, got {steepness}")
    if _real("art_lambda", art_lambda) < 0:
        raise ValueError(f"art_lambda must be >= 0, got {art_lambda}")


def _check_finite(name, value, where=None):
    if _checks.compiling():
        return
    bad = ~torch.isfinite(value)
    if where is not None:
        bad = bad & where
    if bad.any():
        raise ValueError(f"{name} contains NaN or inf")


def soft_sort(x, *, network="odd_even", relaxation="cauchy", steepness=10.0, art_lambda=0.25,
              descending=False, dim=-1, return_permutation=True):
    """Relaxed sorting network (Petersen et al.): soft-sorted values and the soft permutation matrix.

    Args:
        x: ``(..., n, ...)`` float tensor, the n items along ``dim`` (any leading/trailing batch shape).
        network: ``"odd_even"`` (n layers) or ``"bitonic"`` (⌈log₂n⌉(⌈log₂n⌉+1)/2 layers), any n ≥ 1.
        relaxation: ``"logistic"``, ``"logistic_phi"`` (ART with ``art_lambda``), ``"gaussian"``,
            ``"reciprocal"``, ``"cauchy"`` or ``"optimal"``: the comparator's sigmoid f.
        steepness: inverse temperature s > 0 of the relaxation.
        descending: put the largest value at position 0 (sorts −x, as diffsort users feed −x).
        dim: the item axis.
        return_permutation: also return P; when False P is neither computed nor stored.

    Returns:
        ``(values, P)``: values shaped like ``x`` (sorted along ``dim``) and P of shape
        ``x.shape without dim + (n, n)`` with ``P[..., i, r]`` = weight of input i at output position r, so
        ``values[..., r] = Σ_i x[..., i] P[..., i, r]`` (diffsort's convention: ``soft_sort(x)`` equals
        ``diffsort.DiffSortNet(network, n, steepness=..., distribution=relaxation)(x)``). P is None when
        ``return_permutation=False``. float32 for fp32/fp16/bf16 inputs, float64 for float64.
    """
    _checks.float_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the items)")
    dim = _checks.normalized_dim("dim", dim, x.dim())
    if x.shape[dim] < 1:
        raise ValueError(f"x must have at least one item along dim={dim}")
    _check_options(network, relaxation, steepness, art_lambda)
    if not isinstance(descending, bool):
        raise TypeError(f"descending must be a bool, got {type(descending).__name__}")
    if not isinstance(return_permutation, bool):
        raise TypeError(f"return_permutation must be a bool, got {type(return_permutation).__name__}")
    _check_finite("x", x)
    kernels = _kernels(x.device)
    if kernels == "triton":
        _check_triton_size(x.shape[dim])
    if kernels == "reference" or x.numel() == 0:
        return reference.soft_sort(x, network=network, relaxation=relaxation, steepness=float(steepness),
                                   art_lambda=float(art_lambda), descending=descending, dim=dim,
                                   return_permutation=return_permutation)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    v = x.movedim(dim, -1).to(acc)
    if descending:
        v = -v
    batch_shape, n = v.shape[:-1], v.shape[-1]
    args = (v.reshape(-1, n), networks.NETWORK_CODE[network], RELAXATION_CODE[relaxation], float(steepness),
            float(art_lambda), return_permutation)
    if kernels == "triton":
        from prefrank.triton_kernels import sortnet as triton_sortnet
        values, perm = triton_sortnet.soft_sort(*args)
    else:
        values, perm, _ = torch.ops.prefrank.sortnet_forward(*args)
    values = values.reshape(batch_shape + (n,))
    if descending:
        values = -values
    return values.movedim(-1, dim), perm.reshape(batch_shape + (n, n)) if return_permutation else None


def sortnet_rank_loss(scores, groups, *, target="block", network="odd_even", relaxation="cauchy",
                      steepness=10.0, art_lambda=0.25, reduction="mean"):
    """Fused ranking loss on the relaxed best-first sort of ``scores`` (P is never written to memory).

    Args:
        scores: ``(..., n)`` float tensor, one list per leading index.
        groups: int tensor shaped like ``scores``: preference level of each item, 0 = most preferred, equal
            levels are ties, -1 = padding. Padding items never enter the sort: each list's valid items, in
            their original order, are sorted by a network of their own size m.
        target: ``"block"``: −(1/m) Σ_i log(mass of item i on the block of positions its group occupies when
            the groups are concatenated best-first) — tie-aware; ``"permutation"``: diffsort's BCE between
            P and the one-hot permutation of the ranking given by ``groups`` (levels must then be distinct
            within a list), averaged over the m² entries of P.
        network, relaxation, steepness, art_lambda: as in :func:`soft_sort`.
        reduction: ``"none"`` (per list, shape ``scores.shape[:-1]``), ``"mean"`` or ``"sum"``.

    A list without valid items has loss 0. float32 for fp32/fp16/bf16 scores, float64 for float64.
    """
    _checks.float_tensor("scores", scores)
    _checks.int_tensor("groups", groups)
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension (the items)")
    _checks.same_device("scores", scores, groups=groups)
    _checks.same_shape("scores", scores, groups=groups)
    _checks.choice("target", target, TARGETS)
    _check_options(network, relaxation, steepness, art_lambda)
    _checks.choice("reduction", reduction, _checks.REDUCTIONS)
    if not _checks.compiling():
        if (groups < -1).any():
            raise ValueError("groups must hold levels >= 0, or -1 for padding")
        _check_finite("scores", scores, where=groups >= 0)
        if target == "permutation" and scores.shape[-1] > 1:
            ordered = torch.sort(groups, dim=-1).values
            if ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any():
                raise ValueError("groups must hold distinct levels within a list for target='permutation' "
                                 "(ties need target='block')")
    kernels = _kernels(scores.device)
    if kernels == "triton":
        _check_triton_size(scores.shape[-1])
    if kernels == "reference" or scores.numel() == 0:
        return reference.sortnet_rank_loss(scores, groups, target=target, network=network,
                                           relaxation=relaxation, steepness=float(steepness),
                                           art_lambda=float(art_lambda), reduction=reduction)
    y, sizes, lo, hi = _compact_lists(scores, groups, target)
    args = (y, sizes, lo, hi, TARGET_CODE[target], networks.NETWORK_CODE[network],
            RELAXATION_CODE[relaxation], float(steepness), float(art_lambda))
    if kernels == "triton":
        from prefrank.triton_kernels import sortnet as triton_sortnet
        loss = triton_sortnet.rank_loss(*args)
    else:
        loss, _ = torch.ops.prefrank.sortnet_loss_forward(*args)
    return _checks.reduce(loss.reshape(scores.shape[:-1]), reduction)


def _kernels(device):
    """Which implementation runs: "reference", "triton" (CUDA tensors, or backend "triton") or "cpu" (C++)."""
    selected = backend.get_backend()
    if selected == "reference":
        return "reference"
    if device.type == "cuda" or selected == "triton":
        return "triton"
    _extension.require()
    return "cpu"


def _check_triton_size(n):
    if n > TRITON_MAX_N:
        raise ValueError(f"n={n} items exceeds the Triton sorting-network kernels' limit of {TRITON_MAX_N} "
                         f"(use CPU tensors or prefrank.ops.set_backend('reference') for longer lists)")


def _compact_lists(scores, groups, target):
    """Kernel inputs of the rank losses, one row per list: the valid items first in their original order.

    y = −score (ascending sort of y = best first; 0 for padding), sizes = valid items per list, and per
    compacted item the positions [lo, hi) its group occupies when groups are concatenated best-first
    (permutation target: lo = the item's rank, hi = lo + 1).
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


def _register():
    """Fake (meta) kernels and autograd for the C++ ops, so torch.compile traces them as single nodes."""

    @torch.library.register_fake("prefrank::sortnet_forward")
    def _forward_fake(x, network, relaxation, steepness, art_lambda, with_perm):
        B, n = x.shape
        layers = networks.num_layers(networks.NETWORKS[network], n)
        perm = x.new_empty((B, n, n) if with_perm else (0,))
        return x.new_empty(B, n), perm, x.new_empty(B, layers, n)

    @torch.library.register_fake("prefrank::sortnet_backward")
    def _backward_fake(grad_values, grad_perm, x, alpha, network, relaxation, steepness, art_lambda):
        return torch.empty_like(x)

    @torch.library.register_fake("prefrank::sortnet_loss_forward")
    def _loss_forward_fake(y, sizes, lo, hi, target, network, relaxation, steepness, art_lambda):
        B, n = y.shape
        return y.new_empty(B), y.new_empty(B, networks.num_layers(networks.NETWORKS[network], n), n)

    @torch.library.register_fake("prefrank::sortnet_loss_backward")
    def _loss_backward_fake(grad_loss, y, sizes, lo, hi, alpha, target, network, relaxation, steepness,
                            art_lambda):
        return torch.empty_like(y)

    def forward_setup(ctx, inputs, output):
        x, network, relaxation, steepness, art_lambda, with_perm = inputs
        ctx.save_for_backward(x, output[2])
        ctx.options = (network, relaxation, steepness, art_lambda)

    def forward_backward(ctx, grad_values, grad_perm, _grad_alpha):
        x, alpha = ctx.saved_tensors
        if grad_values is None:
            grad_values = torch.zeros_like(x)
        grad = torch.ops.prefrank.sortnet_backward(grad_values, grad_perm, x, alpha, *ctx.options)
        return grad, None, None, None, None, None

    torch.library.register_autograd("prefrank::sortnet_forward", forward_backward,
                                    setup_context=forward_setup)

    def loss_setup(ctx, inputs, output):
        y, sizes, lo, hi, target, network, relaxation, steepness, art_lambda = inputs
        ctx.save_for_backward(y, sizes, lo, hi, output[1])
        ctx.options = (target, network, relaxation, steepness, art_lambda)

    def loss_backward(ctx, grad_loss, _grad_alpha):
        y, sizes, lo, hi, alpha = ctx.saved_tensors
        grad = torch.ops.prefrank.sortnet_loss_backward(grad_loss, y, sizes, lo, hi, alpha, *ctx.options)
        return grad, None, None, None, None, None, None, None, None

    torch.library.register_autograd("prefrank::sortnet_loss_forward", loss_backward, setup_context=loss_setup)


if _extension.available():
    _register()

