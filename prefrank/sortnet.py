"""Differentiable sorting networks: argument handling and dispatch of soft_sort / sortnet_rank_loss."""

import math

import torch

from prefrank import _checks, networks, reference

RELAXATIONS = ("logistic", "logistic_phi", "gaussian", "reciprocal", "cauchy", "optimal")
RELAXATION_CODE = {name: code for code, name in enumerate(RELAXATIONS)}
TARGETS = ("block", "permutation")


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
    return reference.soft_sort(x, network=network, relaxation=relaxation, steepness=float(steepness),
                               art_lambda=float(art_lambda), descending=descending, dim=dim,
                               return_permutation=return_permutation)


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
    return reference.sortnet_rank_loss(scores, groups, target=target, network=network, relaxation=relaxation,
                                       steepness=float(steepness), art_lambda=float(art_lambda),
                                       reduction=reduction)

