"""Plackett-Luce negative log-likelihood: argument handling, dispatch and autograd registration.

The compiled kernels (``prefrank::plackett_luce_nll_fwd/bwd``, csrc/plackett_luce_*) score lists that are
already in preference order; this module turns the three ways of saying the order (place along ``dim``,
``ranking``, ``groups``) plus ``mask`` into that canonical form:

- ``order[b, p]`` = index of the item at place ``p``: valid items first, best first, stable within ties;
- ``level[b, p]`` = compact group index of that place (0 = best, +1 per distinct level), -1 for padding.
"""

import torch

from prefrank import _checks, _extension, backend, reference

TIES = ("breslow", "efron")
_TIES_CODE = {"breslow": 0, "efron": 1}


def _item_keys(shape, device, ranking, groups, mask):
    """Per-item sort key (B, K) int64: its place/level; items that are padding get a key past every level."""
    B, K = shape
    pad = torch.iinfo(torch.int64).max
    if groups is not None:
        keys = groups.to(torch.int64)
        keep = keys >= 0
    elif ranking is not None:
        ranking = ranking.to(torch.int64)
        listed = ranking >= 0
        keys = torch.full((B, K), pad, dtype=torch.int64, device=device)
        places = torch.arange(ranking.shape[-1], device=device).expand_as(ranking)
        # unlisted places write into a scratch column K that is dropped
        keys = torch.cat([keys, keys[:, :1]], dim=1)
        keys.scatter_(1, torch.where(listed, ranking, K), torch.where(listed, places, pad))
        keys = keys[:, :K]
        keep = keys != pad
    else:
        keys = torch.arange(K, device=device).expand(B, K)
        keep = torch.ones((B, K), dtype=torch.bool, device=device)
    if mask is not None:
        keep = keep & mask
    return torch.where(keep, keys, pad), keep


def canonical_order(shape, device, *, ranking=None, groups=None, mask=None):
    """(order, level) of every list, see the module docstring. Inputs are (B, K) with the item axis last."""
    B, K = shape
    if ranking is None and groups is None and mask is None:  # already best-first, every item its own place
        places = torch.arange(K, device=device).expand(B, K).contiguous()
        return places, places.clone()
    keys, keep = _item_keys(shape, device, ranking, groups, mask)
    sorted_keys, order = torch.sort(keys, dim=-1, stable=True)
    valid = torch.gather(keep, 1, order)
    new_level = torch.ones_like(valid)
    new_level[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    level = torch.cumsum(new_level & valid, dim=-1) - 1
    return order.contiguous(), torch.where(valid, level, -1).contiguous()


def _check_ranking(ranking, K):
    if ranking.shape[-1] > K:
        raise ValueError(f"ranking lists {ranking.shape[-1]} places but there are only {K} items")
    if _checks.compiling():
        return
    if ((ranking < -1) | (ranking >= K)).any():
        raise ValueError(f"ranking entries must be item indices in [0, {K}) or -1 (padding)")
    if ((ranking[..., :-1] < 0) & (ranking[..., 1:] >= 0)).any():
        raise ValueError("ranking may hold -1 only as padding at the tail of each list")
    counts = torch.zeros(ranking.shape[:-1] + (K + 1,), dtype=torch.int64, device=ranking.device)
    counts.scatter_add_(-1, torch.where(ranking >= 0, ranking, K), torch.ones_like(ranking))
    if (counts[..., :K] > 1).any():
        raise ValueError("ranking contains the same item twice in one list")


def _check_groups(groups):
    if not _checks.compiling() and (groups < -1).any():
        raise ValueError("groups must hold levels >= 0, or -1 for padding")


def plackett_luce_nll(scores, *, ranking=None, groups=None, mask=None, top_k=None, ties="breslow", dim=-1,
                      reduction="none"):
    """Negative log-likelihood of an observed order under Plackett-Luce with log-strengths ``scores``.

    Args:
        scores: ``(..., K, ...)`` float tensor (fp32/fp16/bf16/fp64), items along ``dim``.
        ranking: int tensor, ``ranking[..., j]`` = index of the item at place ``j`` (best first), -1 pads the
            tail. Items not listed are padding. Shape of ``scores`` (the place axis at ``dim`` may be shorter).
        groups: int tensor shaped like ``scores``: preference level of every item, 0 = most preferred, equal
            levels are ties, -1 = padding.
        mask: bool tensor shaped like ``scores``; False removes the item from every term.
        top_k: score only the first ``k`` places (with ``groups``: the first ``k`` groups); the rest stay in
            the denominators (the exact partial-ranking marginal).
        ties: ``"breslow"`` or ``"efron"``: the Cox partial-likelihood tie rule for ``groups``.
        dim: the item axis.
        reduction: ``"none"`` (per list, shape ``scores.shape`` without ``dim``), ``"mean"`` or ``"sum"``.

    Without ``ranking`` and ``groups`` the items are already best-first along ``dim``. With ``groups`` the
    result is exactly the negative Cox partial log-likelihood with linear predictor ``scores`` and event time
    = level (every group scored, the last included). Stable for scores of ±1e4. A valid item with score -inf
    has strength 0: scoring it while a finite item competes gives +inf; a group whose whole risk set has
    strength 0 is scored as the limit of equal scores (a constant). NaN/+inf scores raise ValueError.

    Returns float32 (float64 for float64 scores).
    """
    _checks.float_tensor("scores", scores)
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension (the items)")
    _checks.choice("ties", ties, TIES)
    _checks.choice("reduction", reduction, _checks.REDUCTIONS)
    _checks.positive_int_or_none("top_k", top_k)
    if ranking is not None and groups is not None:
        raise ValueError("pass either ranking or groups, not both")
    dim = _checks.normalized_dim("dim", dim, scores.dim())
    if ranking is not None:
        _checks.int_tensor("ranking", ranking)
        _checks.same_device("scores", scores, ranking=ranking)
        if ranking.dim() != scores.dim() or any(
                r != s for i, (r, s) in enumerate(zip(ranking.shape, scores.shape)) if i != dim):
            raise ValueError(f"ranking must have the shape of scores {tuple(scores.shape)} (the place axis may "
                             f"be shorter), got {tuple(ranking.shape)}")
    if groups is not None:
        _checks.int_tensor("groups", groups)
        _checks.same_device("scores", scores, groups=groups)
        _checks.same_shape("scores", scores, groups=groups)
    if mask is not None:
        _checks.bool_tensor("mask", mask)
        _checks.same_device("scores", scores, mask=mask)
        _checks.same_shape("scores", scores, mask=mask)
    _checks.finite_or_neg_inf("scores", scores)

    scores_l, ranking_l, groups_l, mask_l = (
        None if t is None else t.movedim(dim, -1) for t in (scores, ranking, groups, mask))
    if ranking_l is not None:
        _check_ranking(ranking_l, scores_l.shape[-1])
    if groups_l is not None:
        _check_groups(groups_l)

    if backend.get_backend() == "reference":
        nll = reference.plackett_luce_nll(scores_l, ranking=ranking_l, groups=groups_l, mask=mask_l,
                                          top_k=top_k, ties=ties)
        return _checks.reduce(nll, reduction)

    _extension.require()
    if scores.is_cuda and not _extension.has_cuda_kernels():
        raise ImportError("prefrank._C was built without CUDA kernels; rebuild on a machine with nvcc and a "
                          "CUDA build of torch (PREFRANK_CUDA=1 make build)")
    batch_shape = scores_l.shape[:-1]
    flat = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731  (a view when possible)
    flat_scores = flat(scores_l)
    order, level = canonical_order(flat_scores.shape, scores.device, ranking=flat(ranking_l),
                                   groups=flat(groups_l), mask=flat(mask_l))
    nll = torch.ops.prefrank.plackett_luce_nll_fwd(flat_scores, order, level, -1 if top_k is None else top_k,
                                                    _TIES_CODE[ties])
    return _checks.reduce(nll.reshape(batch_shape), reduction)


def _register():
    """Fake (meta) kernels and autograd for the compiled ops, so torch.compile traces them as single nodes."""

    @torch.library.register_fake("prefrank::plackett_luce_nll_fwd")
    def _fwd_fake(scores, order, level, top_k, ties):
        out_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
        return scores.new_empty(scores.shape[0], dtype=out_dtype)

    @torch.library.register_fake("prefrank::plackett_luce_nll_bwd")
    def _bwd_fake(grad_nll, scores, order, level, top_k, ties):
        return torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)

    def setup_context(ctx, inputs, output):
        scores, order, level, top_k, ties = inputs
        ctx.save_for_backward(scores, order, level)
        ctx.top_k, ctx.ties = top_k, ties

    def backward(ctx, grad_nll):
        scores, order, level = ctx.saved_tensors
        grad = torch.ops.prefrank.plackett_luce_nll_bwd(grad_nll, scores, order, level, ctx.top_k, ctx.ties)
        return grad, None, None, None, None

    torch.library.register_autograd("prefrank::plackett_luce_nll_fwd", backward, setup_context=setup_context)


if _extension.available():
    _register()
