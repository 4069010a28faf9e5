"""Drop-in preference losses on per-sequence log-probs: DPO family, listwise DPO, S-DPO, SMPRO, MISP-DPO.

Every loss takes summed per-sequence log-probs of the policy and of the frozen reference model (from
``prefrank.ops.sequence_logprobs`` or anywhere else), forms the implicit DPO reward

    r = β · (policy_logps − ref_logps)

and returns ``PreferenceLossOutput(loss, metrics)``: ``loss`` is a scalar, the mean over the batch of lists
(pairs), and ``metrics`` a dict of detached tensors a trainer can log:

- ``rewards/group_{g}``: mean reward of the valid items at preference level ``g`` (levels compacted per
  list: ``g`` = 0 is each list's best group, 1 the next one present, ...), pooled over the batch;
- ``rewards/margin``: mean over lists of (mean reward of the best group − mean reward of the other valid
  items); NaN if no list has two levels;
- ``rewards/ranking_accuracy``: fraction of valid item pairs from different levels whose rewards are
  strictly in the preferred order, pooled over the batch; NaN if there is no such pair;
- ``loss/<term>``: every loss term, unweighted, averaged over the batch.

Groups follow the library convention: ``groups[..., k]`` = preference level of item k, 0 = most preferred,
equal levels are ties, -1 = padding. Inputs may be any float dtype (bf16 included); the losses compute in
float32 (float64 if any input is float64) and return that dtype.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from prefrank import _checks, ops, plackett_luce, sortnet

__all__ = ["PreferenceLossOutput", "dpo_loss", "listwise_dpo_loss", "sdpo_loss", "smpro_loss",
           "misp_dpo_loss", "DPOLoss", "ListwiseDPOLoss", "SDPOLoss", "SMPROLoss", "MISPDPOLoss"]

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
RANKERS = ("plackett_luce", "sortnet")
SORTNET_OPTIONS = ("target", "network", "relaxation", "steepness", "art_lambda")


class PreferenceLossOutput(NamedTuple):
    """What every loss returns: ``loss`` (scalar tensor, mean over the batch) and ``metrics`` (detached)."""

    loss: torch.Tensor
    metrics: dict


# ------------------------------------------------------------------------------------------------------------
# Validation and shared pieces
# ------------------------------------------------------------------------------------------------------------

def _positive_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _non_negative_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def _float_inputs(**tensors):
    """Validate float tensors on one device; return the accumulation dtype (float64 if any is float64)."""
    items = list(tensors.items())
    for name, value in items:
        _checks.float_tensor(name, value)
    first_name, first = items[0]
    _checks.same_device(first_name, first, **dict(items[1:]))
    return torch.float64 if any(t.dtype == torch.float64 for _, t in items) else torch.float32


def _rewards(policy, ref, beta, acc):
    return beta * (policy.to(acc) - ref.to(acc))


def _item_levels(scores, *, ranking=None, groups=None, mask=None):
    """Per-item compact preference level (N, K) int64 (0 = best level present, -1 = padding)."""
    order, level = plackett_luce.canonical_order(scores.shape, scores.device, ranking=ranking, groups=groups,
                                                 mask=mask)
    return torch.empty_like(level).scatter_(1, order, level)


def _ranking_metrics(rewards, level):
    """The per-level reward means, best-vs-rest margin and pairwise ranking accuracy (see module doc)."""
    with torch.no_grad():
        r = rewards.detach()
        K = level.shape[-1]
        valid = level >= 0
        r_valid = torch.where(valid, r, 0)
        # per-level sums and counts in one scatter (padding goes to a scratch slot K)
        slot = torch.where(valid, level, K).reshape(-1)
        sums = r.new_zeros(K + 1).index_add_(0, slot, r_valid.reshape(-1))
        counts = torch.zeros(K + 1, dtype=torch.int64, device=r.device)
        counts.index_add_(0, slot, torch.ones_like(slot))
        present = counts[:K].nonzero().flatten().tolist()     # compact levels: present = 0 .. L-1
        metrics = {f"rewards/group_{g}": sums[g] / counts[g] for g in present}
        best, rest = level == 0, level > 0
        n_best, n_rest = best.sum(-1), rest.sum(-1)
        mean_best = torch.where(best, r, 0).sum(-1) / n_best.clamp(min=1)
        mean_rest = torch.where(rest, r, 0).sum(-1) / n_rest.clamp(min=1)
        both = (n_best > 0) & (n_rest > 0)
        metrics["rewards/margin"] = torch.where(both, mean_best - mean_rest, 0).sum() / both.sum()
        # pairs (i better than j) per list = (n² − Σ_g n_g²) / 2; a padding item gets level K and reward
        # +inf so it is never the better item nor beaten, and never counted as correct
        per_level = torch.zeros(level.shape[:-1] + (K + 1,), dtype=torch.int64, device=r.device)
        per_level.scatter_add_(-1, torch.where(valid, level, K), torch.ones_like(level))
        n = valid.sum(-1)
        pairs = (n * n - (per_level[..., :K] ** 2).sum(-1)).sum() // 2
        lv = torch.where(valid, level, K)
        rv = torch.where(valid, r, float("inf"))
        better_level = (lv[..., :, None] < lv[..., None, :]).view(torch.uint8)
        correct = better_level.mul_((rv[..., :, None] > rv[..., None, :]).view(torch.uint8)).count_nonzero()
        metrics["rewards/ranking_accuracy"] = correct.to(r.dtype) / pairs
    return metrics


def _with_prefix(prefix, metrics):
    return {prefix + key: value for key, value in metrics.items()}


def _require_ranked_lists(level, what):
    """ValueError if a list has no two valid items at different levels (nothing to rank there)."""
    if _checks.compiling():
        return
    bad = level.amax(-1) < 1   # amax, not max(dim): the latter opens a parallel region even for tiny inputs
    if bad.any():
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"{what}: list {index} (flattened batch index) has no two valid items at different "
                         f"levels (all padding, a single item, or all in one group, e.g. all positives): "
                         f"there is nothing to rank; drop such lists")


# ------------------------------------------------------------------------------------------------------------
# Pairwise DPO
# ------------------------------------------------------------------------------------------------------------

def _dpo_losses(h, beta, loss_type, label_smoothing):
    """Per-pair loss from h = (π_c − π_r) − (ref_c − ref_r), TRL's formulas.

    −log σ(z) is written softplus(−z) (the same stable function): torch's CPU log_sigmoid launches a parallel
    region even for a handful of elements, which costs milliseconds per call on a busy machine.
    """
    if loss_type == "sigmoid":
        return F.softplus(-beta * h) * (1 - label_smoothing) + F.softplus(beta * h) * label_smoothing
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    return (F.softplus(-beta * h) * (1 - label_smoothing)
            - F.softplus(beta * h) * label_smoothing) / (1 - 2 * label_smoothing)


def _check_dpo_options(beta, loss_type, label_smoothing):
    beta = _positive_number("beta", beta)
    _checks.choice("loss_type", loss_type, LOSS_TYPES)
    label_smoothing = _non_negative_number("label_smoothing", label_smoothing)
    limit_ok = label_smoothing < 0.5 if loss_type == "robust" else label_smoothing <= 0.5
    if not limit_ok:
        bound = "[0, 0.5)" if loss_type == "robust" else "[0, 0.5]"
        raise ValueError(f"label_smoothing must lie in {bound} for loss_type={loss_type!r}, "
                         f"got {label_smoothing}")
    return beta, label_smoothing


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0):
    """Pairwise DPO and its TRL variants.

    With h = (policy_chosen − policy_rejected) − (ref_chosen − ref_rejected) (TRL's ``logits``; positive
    when the policy prefers the chosen response more than the reference does) and ε = label_smoothing:

    - ``"sigmoid"`` (DPO; cDPO when ε > 0): −log σ(βh)·(1 − ε) − log σ(−βh)·ε
    - ``"hinge"`` (RSO/SLiC): relu(1 − βh)
    - ``"ipo"`` (IPO eq. 17, β plays τ): (h − 1/(2β))². TRL feeds IPO *length-averaged* log-probs; pass
      ``sequence_logprobs(..., reduction="mean")`` outputs to reproduce that, summed ones otherwise.
    - ``"robust"`` (Chowdhury et al. robust DPO): (−log σ(βh)·(1 − ε) + log σ(−βh)·ε) / (1 − 2ε)

    ``label_smoothing`` is used by sigmoid (ε ∈ [0, 0.5]) and robust (ε ∈ [0, 0.5)) and ignored by hinge and
    ipo, exactly as TRL does.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: float tensors of one shape (usually (B,)),
            summed log-probs of each response under the policy / the reference model.
        beta: > 0.
        loss_type: one of ``LOSS_TYPES``.
        label_smoothing: ε above.

    Returns:
        ``PreferenceLossOutput``: loss = mean over pairs; metrics = the module-level ones (group 0 = chosen,
        group 1 = rejected), ``loss/dpo``, and TRL's names ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``.
    """
    beta, label_smoothing = _check_dpo_options(beta, loss_type, label_smoothing)
    acc = _float_inputs(policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                        ref_rejected=ref_rejected)
    _checks.same_shape("policy_chosen", policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                       ref_rejected=ref_rejected)
    return _dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing,
                acc)


def _dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing, acc):
    pc, pr, rc, rr = (t.to(acc) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    h = (pc - pr) - (rc - rr)
    loss = _dpo_losses(h, beta, loss_type, label_smoothing).mean()
    with torch.no_grad():
        chosen, rejected = beta * (pc - rc), beta * (pr - rr)
        rewards = torch.stack([chosen.reshape(-1), rejected.reshape(-1)], dim=-1)
        level = torch.tensor([0, 1], device=rewards.device).expand(rewards.shape)
        metrics = {"loss/dpo": loss.detach(), **_ranking_metrics(rewards, level),
                   "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                   "rewards/margins": (chosen - rejected).mean(),
                   "rewards/accuracies": (chosen > rejected).to(acc).mean(),
                   "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()}
    return PreferenceLossOutput(loss, metrics)


# ------------------------------------------------------------------------------------------------------------
# Listwise DPO (Plackett-Luce or sorting-network ranker), S-DPO
# ------------------------------------------------------------------------------------------------------------

def _check_ranking_input(ranking, policy_logps):
    _checks.int_tensor("ranking", ranking)
    _checks.same_device("policy_logps", policy_logps, ranking=ranking)
    if ranking.shape[:-1] != policy_logps.shape[:-1] or ranking.dim() != policy_logps.dim():
        raise ValueError(f"ranking must have the shape of policy_logps {tuple(policy_logps.shape)} (the "
                         f"place axis may be shorter), got {tuple(ranking.shape)}")
    plackett_luce._check_ranking(ranking, policy_logps.shape[-1])


def _listwise_inputs(policy_logps, ref_logps, groups, ranking, mask):
    """Validate the (…, K) list inputs; return them flattened to (N, K) (views where possible)."""
    acc = _float_inputs(policy_logps=policy_logps, ref_logps=ref_logps)
    _checks.same_shape("policy_logps", policy_logps, ref_logps=ref_logps)
    if policy_logps.dim() == 0:
        raise ValueError("policy_logps must have at least one dimension (the items of each list)")
    if ranking is not None and groups is not None:
        raise ValueError("pass either ranking or groups, not both")
    flat = lambda t: None if t is None else t.reshape(-1, t.shape[-1])  # noqa: E731
    if groups is not None:
        _checks.int_tensor("groups", groups)
        _checks.same_device("policy_logps", policy_logps, groups=groups)
        _checks.same_shape("policy_logps", policy_logps, groups=groups)
        plackett_luce._check_groups(groups)
    if ranking is not None:
        _check_ranking_input(ranking, policy_logps)
    if mask is not None:
        _checks.bool_tensor("mask", mask)
        _checks.same_device("policy_logps", policy_logps, mask=mask)
        _checks.same_shape("policy_logps", policy_logps, mask=mask)
    return flat(policy_logps), flat(ref_logps), flat(groups), flat(ranking), flat(mask), acc


def listwise_dpo_loss(policy_logps, ref_logps, *, groups=None, ranking=None, mask=None, beta=0.1,
                      ranker="plackett_luce", ties="breslow", top_k=None, **sortnet_kwargs):
    """Listwise DPO over (B, K) lists of responses: a ranking loss on the rewards r = β·(policy − ref).

    The order of each list comes from ``groups`` (levels, ties allowed, -1 padding), or ``ranking``
    (best-first item indices, -1 tail padding), or neither (items already best-first); ``mask`` False drops
    an item everywhere (ragged lists).

    ``ranker="plackett_luce"`` (Rafailov et al. App. A.3, LiPO/PRO-style): loss per list =
    ``plackett_luce_nll(r, groups|ranking, mask, top_k, ties)``, i.e. Σ over scored places of
    −r_i + log Σ_{j still in the pool} e^{r_j}; tied groups by Breslow/Efron; with ``groups`` every group is
    scored, the last one included (``top_k = number of groups − 1`` leaves a tied bottom group unscored).
    K = 2 with groups [0, 1] is exactly ``dpo_loss(loss_type="sigmoid")``. S-DPO (one positive ≻ K
    unordered negatives) is ``groups=[0, 1, …, 1], top_k=1`` — also available as :func:`sdpo_loss`.

    ``ranker="sortnet"``: ``sortnet_rank_loss(r, levels, target="block", **sortnet_kwargs)`` — a relaxed
    sorting network sorts the rewards best-first and each valid item pays −log of its mass on the block of
    positions its group should occupy, averaged over the list (tie-aware). ``sortnet_kwargs``: ``network``,
    ``relaxation``, ``steepness``, ``art_lambda``, ``target`` (see ``prefrank.ops.sortnet_rank_loss``);
    ``ties`` and ``top_k`` are Plackett-Luce options (``top_k`` must stay None here).

    Every list must hold two valid items at different levels (ValueError otherwise: an all-positive or
    single-item list carries no preference).

    Returns ``PreferenceLossOutput`` with loss = mean over lists of the per-list loss and metrics
    ``loss/listwise`` + the module-level reward metrics.
    """
    beta = _positive_number("beta", beta)
    _checks.choice("ranker", ranker, RANKERS)
    _checks.choice("ties", ties, plackett_luce.TIES)
    _checks.positive_int_or_none("top_k", top_k)
    unknown = sorted(set(sortnet_kwargs) - set(SORTNET_OPTIONS))
    if unknown:
        raise TypeError(f"listwise_dpo_loss got unexpected keyword argument(s) {unknown}; sorting-network "
                        f"options are {SORTNET_OPTIONS}")
    if ranker == "plackett_luce" and sortnet_kwargs:
        raise TypeError(f"{sorted(sortnet_kwargs)} only apply to ranker='sortnet'")
    if ranker == "sortnet" and top_k is not None:
        raise ValueError("top_k applies to ranker='plackett_luce' only; the sortnet block loss ranks every "
                         "group")
    policy, ref, groups, ranking, mask, acc = _listwise_inputs(policy_logps, ref_logps, groups, ranking, mask)
    level = _item_levels(policy, ranking=ranking, groups=groups, mask=mask)
    # padding may hold garbage (NaN logps): keep it out of the ops and the metrics
    rewards = torch.where(level >= 0, _rewards(policy, ref, beta, acc), 0)
    _require_ranked_lists(level, "listwise_dpo_loss")
    if ranker == "plackett_luce":
        per_list = ops.plackett_luce_nll(rewards, ranking=ranking, groups=groups, mask=mask, top_k=top_k,
                                         ties=ties)
    else:
        per_list = ops.sortnet_rank_loss(rewards, level, reduction="none", **sortnet_kwargs)
    loss = per_list.mean()
    metrics = {"loss/listwise": loss.detach(), **_ranking_metrics(rewards, level)}
    return PreferenceLossOutput(loss, metrics)


def _top1_pl(r_pos, r_negs, mask):
    """Per-list −log softmax of the positive among {pos} ∪ valid negatives = softplus(LSE_k(r_neg_k − r_pos)).

    Computed by the Plackett-Luce op (top_k=1 over groups [0, 1, …, 1]); returns (per_list, scores, groups).
    """
    groups = _top1_groups(r_negs, mask)
    if mask is not None:
        r_negs = torch.where(mask, r_negs, 0)  # padding may hold garbage (NaN logps); keep it out of the op
    scores = torch.cat([r_pos[:, None], r_negs], dim=-1)
    return ops.plackett_luce_nll(scores, groups=groups, top_k=1), scores, groups


def _top1_groups(r_negs, mask):
    """Levels of [positive, negatives…]: 0 for the positive, 1 for every valid negative, -1 for padding."""
    groups = torch.ones(r_negs.shape[0], r_negs.shape[1] + 1, dtype=torch.int64, device=r_negs.device)
    groups[:, 0] = 0
    if mask is not None:
        groups[:, 1:] = torch.where(mask, groups[:, 1:], -1)
    return groups


def _pos_negs_inputs(pos, negs, mask):
    """Validate (…,) positives and (…, K) negatives (dicts name → tensor, policy first); return them
    flattened to (N,) and (N, K)."""
    acc = _float_inputs(**pos, **negs)
    pos_names, neg_names = list(pos), list(negs)
    pos, negs = list(pos.values()), list(negs.values())
    _checks.same_shape(pos_names[0], pos[0], **{pos_names[1]: pos[1]})
    _checks.same_shape(neg_names[0], negs[0], **{neg_names[1]: negs[1]})
    if negs[0].dim() != pos[0].dim() + 1 or negs[0].shape[:-1] != pos[0].shape:
        raise ValueError(f"{neg_names[0]} must have shape {tuple(pos[0].shape)} + (K,) (the shape of "
                         f"{pos_names[0]} plus a negatives axis), got {tuple(negs[0].shape)}")
    if negs[0].shape[-1] == 0:
        raise ValueError(f"{neg_names[0]} has no negatives (K = 0)")
    if mask is not None:
        _checks.bool_tensor("mask", mask)
        _checks.same_device(neg_names[0], negs[0], mask=mask)
        _checks.same_shape(neg_names[0], negs[0], mask=mask)
        mask = mask.reshape(-1, mask.shape[-1])
    K = negs[0].shape[-1]
    return [t.reshape(-1) for t in pos], [t.reshape(-1, K) for t in negs], mask, acc


def sdpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta=0.1, mask=None):
    """S-DPO (Chen et al. 2024): one chosen response ≻ K unordered rejected ones (top-1 Plackett-Luce).

    loss per list = −log( e^{r_c} / (e^{r_c} + Σ_k e^{r_k}) ) = softplus(logsumexp_k(r_k − r_c)), with
    r = β·(policy − ref). K = 1 is ``dpo_loss(loss_type="sigmoid")``. Equivalent call:
    ``listwise_dpo_loss(cat([chosen[:, None], rejected], -1), …, groups=[0, 1, …, 1], top_k=1)``.

    Args:
        policy_chosen, ref_chosen: (B,) log-probs of the chosen response.
        policy_rejected, ref_rejected: (B, K) log-probs of the rejected responses.
        mask: optional (B, K) bool, False = padding negative (ragged K). A list whose negatives are all
            padding contributes a loss of exactly 0 (the chosen response has no competitor).
        beta: > 0.

    Returns ``PreferenceLossOutput`` with loss = mean over lists, metrics ``loss/sdpo`` + reward metrics
    (group 0 = chosen, group 1 = rejected).
    """
    beta = _positive_number("beta", beta)
    (pc, rc), (pr, rr), mask, acc = _pos_negs_inputs(
        {"policy_chosen": policy_chosen, "ref_chosen": ref_chosen},
        {"policy_rejected": policy_rejected, "ref_rejected": ref_rejected}, mask)
    r_pos, r_negs = _rewards(pc, rc, beta, acc), _rewards(pr, rr, beta, acc)
    per_list, scores, groups = _top1_pl(r_pos, r_negs, mask)
    loss = per_list.mean()
    metrics = {"loss/sdpo": loss.detach(), **_ranking_metrics(scores, groups)}
    return PreferenceLossOutput(loss, metrics)


# ------------------------------------------------------------------------------------------------------------
# SMPRO
# ------------------------------------------------------------------------------------------------------------

def _within_group_term(rewards, level, ranking, valid, sort_options):
    """Per-list within-group loss: each group with ≥ 2 items sorted on its own against its internal order.

    The internal order comes from ``ranking`` (best-first item indices, consistent with the groups): the
    i-th listed item of group c is at within-group place i. Every group's sub-list goes through
    ``sortnet_rank_loss`` with all-distinct levels (= −mean log P[item, its place]); the per-list term is
    the mean over that list's groups with ≥ 2 items (0 if it has none).
    """
    N, K = rewards.shape
    place = _item_levels(rewards, ranking=ranking)
    if not _checks.compiling():
        if ((place >= 0) != valid).any():
            raise ValueError("ranking must list exactly the valid items of every list (groups >= 0 and "
                             "mask True)")
        # levels along the ranking must not decrease: it refines the groups, it cannot contradict them
        by_place = torch.full((N, K + 1), -1, dtype=torch.int64, device=rewards.device)
        by_place.scatter_(1, torch.where(valid, place, K), torch.where(valid, level, -1))
        along = by_place[:, :K]
        if ((along[:, 1:] < along[:, :-1]) & (along[:, 1:] >= 0)).any():
            raise ValueError("ranking contradicts groups: an item of a worse group is ranked above an item "
                             "of a better one")
    # within-group place = place − number of valid items in better groups (groups are contiguous in ranking)
    better = (valid[:, None, :] & (level[:, None, :] < level[:, :, None])).sum(-1)
    within = torch.where(valid, place - better, -1)
    levels = torch.arange(K, device=rewards.device)
    member = valid[:, None, :] & (level[:, None, :] == levels[None, :, None])            # (N, C=K, K)
    sub_groups = torch.where(member, within[:, None, :], -1)
    multi = member.sum(-1) >= 2                                                         # (N, C)
    term = torch.zeros(N, dtype=rewards.dtype, device=rewards.device)
    if not multi.any():
        return term
    rows = multi.nonzero()
    sub_loss = ops.sortnet_rank_loss(rewards[rows[:, 0]], sub_groups[rows[:, 0], rows[:, 1]],
                                     target="block", reduction="none", **sort_options)
    term = term.index_add(0, rows[:, 0], sub_loss.to(rewards.dtype))
    return term / multi.sum(-1).clamp(min=1)


def smpro_loss(policy_logps, ref_logps, groups, *, beta=0.1, network="odd_even", relaxation="cauchy",
               steepness=10.0, within_weight=0.0, anchor_weight=1.0, mask=None, ranking=None):
    """SMPRO-style group-ranking loss (our formulation; SMPRO's exact equations are not public).

    SMPRO (Swetha et al., AAAI-26) ranks *groups* of responses with a differentiable sorting network and
    "strengthens the positives"; its paper body, code and equations were not available (see papers.md §2).
    What this function computes — a documented reconstruction, not the paper's verified method — with
    r = β·(policy_logps − ref_logps) and valid items (groups ≥ 0, mask True) of each list:

    - across-group term: ``sortnet_rank_loss(r, groups, target="block", network, relaxation, steepness)``.
      The rewards are soft-sorted best-first; B_g = the block of positions group g should occupy (groups
      concatenated best-first); L_across = −(1/n) Σ_i log Σ_{p ∈ B_{g(i)}} P[i, p]. Invariant to the order
      inside a group (ties) and to adding a constant to every reward. A list whose items are all in one
      group has L_across = 0 (its block is every position).
    - within-group term (``within_weight`` > 0, needs ``ranking``): when groups have an internal order
      (e.g. corruption severity inside the negatives), pass it as ``ranking`` (B, K): best-first item
      indices listing exactly the valid items, consistent with ``groups``. Each group with ≥ 2 items is
      soft-sorted on its own and pays −mean log P[i, its within-group place]; averaged over such groups.
    - anchor term (``anchor_weight``): L_anchor = mean over the positive group (level 0) of
      softplus(−r_i) = −log σ(r_i), pushing positives above the reference (π > π_ref), which a shift-invariant
      ranking loss cannot do (papers.md §2.3 option b, mDPO-style anchor with δ = 0).

    loss = mean over lists of L_across + within_weight·L_within + anchor_weight·L_anchor. Every list needs
    at least one valid item in group 0 (ValueError otherwise). Metrics: ``loss/across``, ``loss/within``
    (when within_weight > 0), ``loss/anchor`` (unweighted), plus the reward metrics.

    Args:
        policy_logps, ref_logps: (B, K) (or (…, K)) float log-probs.
        groups: int (B, K): 0 = positive group, 1, 2, … worse groups, -1 padding.
        mask: optional bool (B, K), False = padding.
        ranking: optional best-first order refining ``groups``, only used by the within-group term.
    """
    beta = _positive_number("beta", beta)
    within_weight = _non_negative_number("within_weight", within_weight)
    anchor_weight = _non_negative_number("anchor_weight", anchor_weight)
    if groups is None:
        raise TypeError("smpro_loss needs groups (0 = positive group, 1, 2, … worse groups, -1 padding)")
    if within_weight > 0 and ranking is None:
        raise ValueError("within_weight > 0 needs ranking: the internal order of the groups")
    policy, ref, groups_f, _, mask_f, acc = _listwise_inputs(policy_logps, ref_logps, groups, None, mask)
    if ranking is not None:
        _check_ranking_input(ranking, policy_logps)
        ranking_f = ranking.reshape(-1, ranking.shape[-1])
    level = _item_levels(policy, groups=groups_f, mask=mask_f)
    valid = level >= 0
    rewards = torch.where(valid, _rewards(policy, ref, beta, acc), 0)  # padding may hold garbage
    positive = valid & (groups_f == 0)
    if not _checks.compiling() and (~positive.any(-1)).any():
        index = int((~positive.any(-1)).nonzero()[0, 0])
        raise ValueError(f"smpro_loss: list {index} (flattened batch index) has no valid item in group 0 "
                         f"(the positive group)")
    sort_options = {"network": network, "relaxation": relaxation, "steepness": steepness}
    across = ops.sortnet_rank_loss(rewards, level, target="block", reduction="none", **sort_options).to(acc)
    anchor = torch.where(positive, F.softplus(-rewards), 0).sum(-1) / positive.sum(-1).clamp(min=1)
    per_list = across + anchor_weight * anchor
    terms = {"loss/across": across, "loss/anchor": anchor}
    if within_weight > 0:
        within = _within_group_term(rewards, level, ranking_f, valid, sort_options)
        per_list = per_list + within_weight * within
        terms["loss/within"] = within
    loss = per_list.mean()
    metrics = {name: term.detach().mean() for name, term in terms.items()}
    metrics.update(_ranking_metrics(rewards, level))
    return PreferenceLossOutput(loss, metrics)


# ------------------------------------------------------------------------------------------------------------
# MISP-DPO
# ------------------------------------------------------------------------------------------------------------

def misp_dpo_loss(policy_pos, ref_pos, policy_negs, ref_negs, *, log_q=None, beta=0.5, mask=None, text=None,
                  text_weight=1.0):
    """MISP-DPO (Li et al., ICLR 2026): multi-negative image-side DPO with importance sampling.

    Image side: one response y scored under the preferred image (``policy_pos``/``ref_pos``, (B,)) and
    under K sampled negative images (``policy_negs``/``ref_negs``, (B, K)). With r = β·(policy − ref),
    a_k = r_neg_k − r_pos and K_b = number of valid negatives of list b:

        L_img = softplus( logsumexp_k( a_k − log(K_b · q_k) ) )

    the top-1 Plackett-Luce loss of the positive image among {positive} ∪ negatives, with the sampled-softmax
    importance correction for negatives drawn from the proposal q (``log_q`` (B, K) = log q_k). ``log_q``
    None means uniform sampling: no correction (log(K·1/K) = 0). This is the well-defined estimator of
    papers.md §3.2 (the paper's own normaliser is not public). ``mask`` (B, K) bool: False = padding
    negative (ragged K, ignored by K_b too); a list with no valid negative has L_img = 0.

    Text side (``text`` = (policy_chosen, policy_rejected, ref_chosen, ref_rejected), each (B,)): adds
    ``text_weight`` · sigmoid DPO with the same β (positive image fixed, chosen vs rejected response).

    K = 1, log_q None and no text is exactly ``dpo_loss`` on (positive image, negative image).

    Returns ``PreferenceLossOutput``: loss = mean over the batch of L_img + text_weight·L_text; metrics
    ``loss/image``, ``loss/text`` (when text is given), the reward metrics of the image side (group 0 =
    positive image, group 1 = negative images, uncorrected rewards) and the text DPO metrics under
    ``text/``.
    """
    beta = _positive_number("beta", beta)
    text_weight = _non_negative_number("text_weight", text_weight)
    (pp, rp), (pn, rn), mask, acc = _pos_negs_inputs(
        {"policy_pos": policy_pos, "ref_pos": ref_pos}, {"policy_negs": policy_negs, "ref_negs": ref_negs},
        mask)
    r_pos, r_negs = _rewards(pp, rp, beta, acc), _rewards(pn, rn, beta, acc)
    corrected = r_negs
    if log_q is not None:
        _checks.float_tensor("log_q", log_q)
        _checks.same_device("policy_negs", policy_negs, log_q=log_q)
        _checks.same_shape("policy_negs", policy_negs, log_q=log_q)
        log_q = log_q.reshape(r_negs.shape).to(acc)
        if mask is None:
            n_valid = torch.full_like(r_pos, r_negs.shape[-1])
        else:
            n_valid = mask.sum(-1).to(acc)
            log_q = torch.where(mask, log_q, 0)      # padding's log_q is arbitrary (may be -inf / NaN)
        if not _checks.compiling():
            check = log_q if mask is None else log_q[mask]
            if (torch.isnan(check) | (check == float("inf"))).any():
                raise ValueError("log_q contains NaN or +inf on a valid negative")
        corrected = r_negs - (torch.log(n_valid)[:, None] + log_q)
    image, _, groups = _top1_pl(r_pos, corrected, mask)
    per_list = image
    metrics = {"loss/image": image.detach().mean(),
               **_ranking_metrics(torch.cat([r_pos[:, None], r_negs], dim=-1), groups)}
    if text is not None:
        if not isinstance(text, (tuple, list)) or len(text) != 4:
            raise TypeError("text must be a tuple (policy_chosen, policy_rejected, ref_chosen, ref_rejected)")
        named = {"text[0] (policy_chosen)": text[0], "text[1] (policy_rejected)": text[1],
                 "text[2] (ref_chosen)": text[2], "text[3] (ref_rejected)": text[3]}
        text_acc = _float_inputs(**named)
        _checks.same_shape("policy_pos", policy_pos, **named)
        _checks.same_device("policy_pos", policy_pos, **named)
        acc = torch.promote_types(acc, text_acc)
        pc, pr, rc, rr = (t.reshape(-1).to(acc) for t in text)
        text_losses = _dpo_losses((pc - pr) - (rc - rr), beta, "sigmoid", 0.0)
        per_list = per_list.to(acc) + text_weight * text_losses
        text_metrics = _dpo(pc, pr, rc, rr, beta, "sigmoid", 0.0, acc).metrics
        metrics["loss/text"] = text_losses.detach().mean()
        metrics.update(_with_prefix("text/", {k: v for k, v in text_metrics.items() if k != "loss/dpo"}))
    return PreferenceLossOutput(per_list.mean(), metrics)


# ------------------------------------------------------------------------------------------------------------
# nn.Module wrappers: hold the hyper-parameters, take the tensors
# ------------------------------------------------------------------------------------------------------------

class DPOLoss(nn.Module):
    """``DPOLoss(beta=0.1, loss_type="sigmoid", label_smoothing=0.0)(policy_chosen, policy_rejected,
    ref_chosen, ref_rejected)`` → :func:`dpo_loss`."""

    def __init__(self, beta=0.1, loss_type="sigmoid", label_smoothing=0.0):
        super().__init__()
        self.beta, self.label_smoothing = _check_dpo_options(beta, loss_type, label_smoothing)
        self.loss_type = loss_type

    def forward(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.beta,
                        loss_type=self.loss_type, label_smoothing=self.label_smoothing)

    def extra_repr(self):
        return f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}"


class ListwiseDPOLoss(nn.Module):
    """``ListwiseDPOLoss(beta=0.1, ranker="plackett_luce", ties="breslow", top_k=None, **sortnet_kwargs)
    (policy_logps, ref_logps, groups=None, ranking=None, mask=None)`` → :func:`listwise_dpo_loss`."""

    def __init__(self, beta=0.1, ranker="plackett_luce", ties="breslow", top_k=None, **sortnet_kwargs):
        super().__init__()
        self.beta = _positive_number("beta", beta)
        self.ranker = _checks.choice("ranker", ranker, RANKERS)
        self.ties = _checks.choice("ties", ties, plackett_luce.TIES)
        self.top_k = _checks.positive_int_or_none("top_k", top_k)
        self.sortnet_kwargs = dict(sortnet_kwargs)

    def forward(self, policy_logps, ref_logps, groups=None, ranking=None, mask=None):
        return listwise_dpo_loss(policy_logps, ref_logps, groups=groups, ranking=ranking, mask=mask,
                                 beta=self.beta, ranker=self.ranker, ties=self.ties, top_k=self.top_k,
                                 **self.sortnet_kwargs)

    def extra_repr(self):
        return (f"beta={self.beta}, ranker={self.ranker!r}, ties={self.ties!r}, top_k={self.top_k}"
                + "".join(f", {k}={v!r}" for k, v in self.sortnet_kwargs.items()))


class SDPOLoss(nn.Module):
    """``SDPOLoss(beta=0.1)(policy_chosen, policy_rejected, ref_chosen, ref_rejected, mask=None)`` →
    :func:`sdpo_loss`."""

    def __init__(self, beta=0.1):
        super().__init__()
        self.beta = _positive_number("beta", beta)

    def forward(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected, mask=None):
        return sdpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.beta, mask=mask)

    def extra_repr(self):
        return f"beta={self.beta}"


class SMPROLoss(nn.Module):
    """``SMPROLoss(beta=0.1, network="odd_even", relaxation="cauchy", steepness=10.0, within_weight=0.0,
    anchor_weight=1.0)(policy_logps, ref_logps, groups, mask=None, ranking=None)`` → :func:`smpro_loss`."""

    def __init__(self, beta=0.1, network="odd_even", relaxation="cauchy", steepness=10.0, within_weight=0.0,
                 anchor_weight=1.0):
        super().__init__()
        self.beta = _positive_number("beta", beta)
        self.within_weight = _non_negative_number("within_weight", within_weight)
        self.anchor_weight = _non_negative_number("anchor_weight", anchor_weight)
        sortnet._check_options(network, relaxation, steepness, 0.25)  # fail at construction, not mid-run
        self.network, self.relaxation, self.steepness = network, relaxation, steepness

    def forward(self, policy_logps, ref_logps, groups, mask=None, ranking=None):
        return smpro_loss(policy_logps, ref_logps, groups, beta=self.beta, network=self.network,
                          relaxation=self.relaxation, steepness=self.steepness,
                          within_weight=self.within_weight, anchor_weight=self.anchor_weight, mask=mask,
                          ranking=ranking)

    def extra_repr(self):
        return (f"beta={self.beta}, network={self.network!r}, relaxation={self.relaxation!r}, "
                f"steepness={self.steepness}, within_weight={self.within_weight}, "
                f"anchor_weight={self.anchor_weight}")


class MISPDPOLoss(nn.Module):
    """``MISPDPOLoss(beta=0.5, text_weight=1.0)(policy_pos, ref_pos, policy_negs, ref_negs, log_q=None,
    mask=None, text=None)`` → :func:`misp_dpo_loss`."""

    def __init__(self, beta=0.5, text_weight=1.0):
        super().__init__()
        self.beta = _positive_number("beta", beta)
        self.text_weight = _non_negative_number("text_weight", text_weight)

    def forward(self, policy_pos, ref_pos, policy_negs, ref_negs, log_q=None, mask=None, text=None):
        return misp_dpo_loss(policy_pos, ref_pos, policy_negs, ref_negs, log_q=log_q, beta=self.beta,
                             mask=mask, text=text, text_weight=self.text_weight)

    def extra_repr(self):
        return f"beta={self.beta}, text_weight={self.text_weight}"
