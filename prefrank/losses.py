"""Drop-in preference losses on per-sequence log-probs: DPO family, listwise DPO, S-DPO, SMPRO, MISP-DPO.

Every loss takes summed per-sequence log-probs of the policy and of the frozen reference model (from
``prefrank.ops.sequence_logprobs`` or anywhere else), forms the implicit DPO reward

    r = β · (policy_logps − ref_logps)

and returns ``PreferenceLossOutput(loss, metrics)``: ``loss`` is a scalar, the mean over the batch of lists
(pairs), and ``metrics`` a dict of detached tensors a trainer can log. The keys depend only on the loss, its
options and the number of items per list, never on the data:

- ``rewards/group_{g}`` for g = 0 … L−1: mean reward of the valid items at preference level ``g`` (levels
  compacted per list: ``g`` = 0 is each list's best group, 1 the next one present, ...), pooled over the
  batch. L = K (items per list) for ``listwise_dpo_loss`` and ``smpro_loss``, L = 2 for ``dpo_loss``,
  ``sdpo_loss`` and ``misp_dpo_loss`` (chosen / rejected). **NaN when no list of the batch has a level g**
  (e.g. ``group_3`` of a batch whose lists have 3 levels): average such a metric over steps with a NaN-aware
  mean;
- ``rewards/margin``: mean over lists of (mean reward of the best group − mean reward of the other valid
  items); NaN if no list has two levels;
- ``rewards/ranking_accuracy``: fraction of valid item pairs from different levels whose rewards are
  strictly in the preferred order, pooled over the batch; NaN if there is no such pair;
- ``loss/<term>``: every loss term, unweighted, averaged over the batch.

Every metric is computed with tensor ops: a loss call never reads a value back to the host on its default
path (no GPU synchronisation) and traces under ``torch.compile(fullgraph=True)``.

Groups follow the library convention: ``groups[..., k]`` = preference level of item k, 0 = most preferred,
equal levels are ties, -1 = padding. Inputs may be any float dtype (bf16 included); the losses compute in
float32 (float64 if any input is float64) and return that dtype.

Which check runs where (``prefrank._checks``): shape, dtype, device and option checks always run. Checks that
read values — NaN/+inf log-probs of a scored item, an implicit reward that is NaN or +inf (a -inf reference
log-prob), ``groups``/``ranking`` contents, lists without two levels, a list without a positive (SMPRO),
``log_q`` outside (-inf, 0] (MISP-DPO) — raise ValueError naming the argument on CPU tensors and inside
``prefrank.debug()``; on CUDA tensors by default (and while compiling) they are skipped and the affected
list's loss is NaN instead. Padding (``groups`` -1, ``mask`` False, items a ``ranking`` does not list) may
hold anything, NaN included: it never reaches a loss, a gradient or a metric.

Empty batches: every loss raises ValueError naming its first argument when the batch holds no list (B = 0):
a mean over zero lists is undefined and a step on it has nothing to learn.

``impl="auto"|"reference"|"triton"`` (trailing keyword of every loss) is passed to the ops the loss calls
(``prefrank.ops.plackett_luce_nll``, ``prefrank.ops.sortnet_rank_loss``); ``dpo_loss`` calls no op and only
validates it. Second-order gradients: ``dpo_loss`` and MISP-DPO's text term are plain PyTorch (double
backward works); the other terms have whatever the ops provide (implemented, or a RuntimeError).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefrank import _checks, _lists, _options, backend, ops
from prefrank.backend import Impl

__all__ = ["PreferenceLossOutput", "dpo_loss", "listwise_dpo_loss", "sdpo_loss", "smpro_loss",
           "misp_dpo_loss", "DPOLoss", "ListwiseDPOLoss", "SDPOLoss", "SMPROLoss", "MISPDPOLoss"]

LossType = Literal["sigmoid", "hinge", "ipo", "robust"]
Ranker = Literal["plackett_luce", "sortnet"]
LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo", "robust")
RANKERS: tuple[str, ...] = ("plackett_luce", "sortnet")
SORTNET_OPTIONS: tuple[str, ...] = ("target", "network", "relaxation", "steepness", "art_lambda")


class PreferenceLossOutput(NamedTuple):
    """What every loss returns: ``loss`` (scalar tensor, mean over the batch) and ``metrics`` (detached)."""

    loss: Tensor
    metrics: dict[str, Tensor]


# ------------------------------------------------------------------------------------------------------------
# Option validation (metadata only: always on)
# ------------------------------------------------------------------------------------------------------------

def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not -math.inf < value < math.inf:   # not math.isfinite: traceable when compile makes value symbolic
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def _positive_number(name: str, value: object) -> float:
    number = _number(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return number


def _non_negative_number(name: str, value: object) -> float:
    number = _number(name, value)
    if number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return number


def _weighted(weight: float, term: Tensor) -> Tensor:
    """``weight · term`` rounded once, to ``term``'s dtype. A Python weight that the dtype cannot hold (below
    its smallest subnormal, above its max) would round to 0 or inf first, and 0 · inf or inf · 0 is NaN."""
    return (term.double() * weight).to(term.dtype)


def _check_impl(impl: object) -> str:
    if not isinstance(impl, str) or impl not in backend.BACKENDS:
        raise ValueError(f"impl must be one of {backend.BACKENDS}, got {impl!r}")
    return impl


def _check_sortnet_values(options: dict[str, object]) -> None:
    """The values of sorting-network options (what ``sortnet_rank_loss`` would reject), for the modules,
    which fail at construction rather than at the first forward."""
    enums = {"target": _options.Target, "network": _options.Network, "relaxation": _options.Relaxation}
    for name, value in options.items():
        if name in enums:
            _options.code(enums[name], name, value)
        elif name == "steepness":
            _positive_number(name, value)
        else:
            _non_negative_number(name, value)


def _check_listwise_options(ranker: object, ties: object, top_k: object,
                            sortnet_kwargs: dict[str, object], where: str) -> None:
    _checks.choice("ranker", ranker, RANKERS)
    _options.code(_options.Ties, "ties", ties)
    _checks.positive_int_or_none("top_k", top_k)
    unknown = sorted(set(sortnet_kwargs) - set(SORTNET_OPTIONS))
    if unknown:
        raise TypeError(f"{where} got unexpected keyword argument(s) {unknown}; sorting-network options are "
                        f"{SORTNET_OPTIONS}")
    if ranker == "plackett_luce" and sortnet_kwargs:
        raise TypeError(f"{sorted(sortnet_kwargs)} only apply to ranker='sortnet'")
    if ranker == "sortnet" and top_k is not None:
        raise ValueError("top_k applies to ranker='plackett_luce' only; the sortnet block loss ranks every "
                         "group")


def _check_dpo_options(beta: object, loss_type: object, label_smoothing: object) -> tuple[float, float]:
    beta = _positive_number("beta", beta)
    _checks.choice("loss_type", loss_type, LOSS_TYPES)
    label_smoothing = _non_negative_number("label_smoothing", label_smoothing)
    limit_ok = label_smoothing < 0.5 if loss_type == "robust" else label_smoothing <= 0.5
    if not limit_ok:
        bound = "[0, 0.5)" if loss_type == "robust" else "[0, 0.5]"
        raise ValueError(f"label_smoothing must lie in {bound} for loss_type={loss_type!r}, "
                         f"got {label_smoothing}")
    return beta, label_smoothing


# ------------------------------------------------------------------------------------------------------------
# Tensor validation and shared pieces
# ------------------------------------------------------------------------------------------------------------

def _float_inputs(**tensors: Tensor) -> torch.dtype:
    """Validate float tensors on one device; return the accumulation dtype (float64 if any is float64)."""
    items = list(tensors.items())
    for name, value in items:
        _checks.float_tensor(name, value)
    first_name, first = items[0]
    _checks.same_device(first_name, first, **dict(items[1:]))
    return torch.float64 if any(t.dtype == torch.float64 for _, t in items) else torch.float32


def _require_lists(name: str, count: int, what: str = "lists") -> None:
    if count == 0:
        raise ValueError(f"{name} holds no {what} (batch size 0): the mean loss over an empty batch is "
                         f"undefined; skip the step instead")


def _check_scored(valid: Tensor | None, **named: Tensor) -> None:
    """ValueError naming the argument if a scored item holds NaN or +inf (a data check)."""
    for name, value in named.items():
        bad = torch.isnan(value) | torch.isposinf(value)
        if valid is not None:
            bad = bad & valid
        if bad.any():
            raise ValueError(f"{name} contains NaN or +inf at a scored item (list {_lists.first_list(bad)}, "
                             f"flattened batch index); log-probs must be finite or -inf")


def _check_rewards(rewards: Tensor, valid: Tensor | None, policy: str, ref: str, *, finite: bool) -> None:
    """ValueError if r = β·(policy − ref) is undefined at a scored item: NaN (both -inf) or +inf (ref -inf);
    with ``finite`` (sorting-network rankers) also -inf."""
    bad = torch.isnan(rewards) | torch.isposinf(rewards)
    if finite:
        bad = bad | torch.isneginf(rewards)
    if valid is not None:
        bad = bad & valid
    if bad.any():
        need = "finite (the sorting network needs finite rewards)" if finite else "< +inf and not NaN"
        raise ValueError(f"the implicit reward β·({policy} − {ref}) must be {need} at every scored item; "
                         f"list {_lists.first_list(bad)} (flattened batch index) has -inf in {policy} or "
                         f"{ref}")


def _rewards(policy: Tensor, ref: Tensor, beta: float, acc: torch.dtype) -> Tensor:
    return beta * (policy.to(acc) - ref.to(acc))


def _nan_unless(ok: Tensor, per_list: Tensor) -> Tensor:
    """NaN for the lists a skipped data check would have rejected (the CUDA / compiled default path)."""
    return torch.where(ok, per_list, torch.full_like(per_list, float("nan")))


def _reward_metrics(rewards: Tensor, level: Tensor, num_levels: int) -> dict[str, Tensor]:
    """Per-level reward means, best-vs-rest margin and pairwise ranking accuracy (see the module doc).

    ``rewards`` (N, K), ``level`` (N, K) compact levels in [0, num_levels) or -1 for padding.
    """
    with torch.no_grad():
        r = rewards.detach()
        valid = level >= 0
        r_valid = torch.where(valid, r, 0)                       # padding may hold garbage
        slot = torch.where(valid, level, num_levels).reshape(-1)  # padding goes to a scratch slot
        sums = r.new_zeros(num_levels + 1).index_add(0, slot, r_valid.reshape(-1))
        counts = r.new_zeros(num_levels + 1).index_add(0, slot, valid.reshape(-1).to(r.dtype))
        means = sums[:num_levels] / counts[:num_levels]           # 0/0 = NaN: no item at that level
        metrics = {f"rewards/group_{g}": means[g] for g in range(num_levels)}
        best, rest = level == 0, level > 0
        n_best, n_rest = best.sum(-1), rest.sum(-1)
        mean_best = torch.where(best, r, 0).sum(-1) / n_best.clamp(min=1)
        mean_rest = torch.where(rest, r, 0).sum(-1) / n_rest.clamp(min=1)
        both = (n_best > 0) & (n_rest > 0)
        metrics["rewards/margin"] = torch.where(both, mean_best - mean_rest, 0).sum() / both.sum().to(r.dtype)
        ordered = valid[..., :, None] & valid[..., None, :] & (level[..., :, None] < level[..., None, :])
        correct = ordered & (r[..., :, None] > r[..., None, :])
        metrics["rewards/ranking_accuracy"] = (correct.sum().to(r.dtype) / ordered.sum().to(r.dtype))
    return metrics


def _with_prefix(prefix: str, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + key: value for key, value in metrics.items()}


# ------------------------------------------------------------------------------------------------------------
# Pairwise DPO
# ------------------------------------------------------------------------------------------------------------

def _dpo_losses(h: Tensor, beta: float, loss_type: str, label_smoothing: float) -> Tensor:
    """Per-pair loss from h = (π_c − π_r) − (ref_c − ref_r), TRL's formulas.

    −log σ(z) is written softplus(−z) (the same stable function): torch's CPU log_sigmoid launches a parallel
    region even for a handful of elements, which costs milliseconds per call on a busy machine.
    """
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    loss = F.softplus(-beta * h)
    if label_smoothing == 0:    # not "+ 0·softplus(βh)": that is NaN for h = +inf (a -inf rejected logp)
        return loss
    if loss_type == "sigmoid":
        return loss * (1 - label_smoothing) + F.softplus(beta * h) * label_smoothing
    return (loss * (1 - label_smoothing) - F.softplus(beta * h) * label_smoothing) / (1 - 2 * label_smoothing)


def _dpo_pairs(names: tuple[str, str, str, str], tensors: tuple[Tensor, ...], acc: torch.dtype,
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Flattened (N,) pc, pr, rc, rr in ``acc`` and h; the data checks name ``names``."""
    pc, pr, rc, rr = (t.reshape(-1).to(acc) for t in tensors)
    h = (pc - pr) - (rc - rr)
    if _checks.data_checks_enabled(*tensors):
        _check_scored(None, **dict(zip(names, (pc, pr, rc, rr), strict=True)))
        if torch.isnan(h).any():
            raise ValueError(f"the DPO margin ({names[0]} − {names[1]}) − ({names[2]} − {names[3]}) is "
                             f"undefined (-inf − -inf) for pair {_lists.first_list(torch.isnan(h))}")
    return pc, pr, rc, rr, h


def _dpo_metrics(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, beta: float) -> dict[str, Tensor]:
    with torch.no_grad():
        chosen, rejected = beta * (pc - rc).detach(), beta * (pr - rr).detach()
        rewards = torch.stack([chosen, rejected], dim=-1)
        level = torch.arange(2, device=rewards.device).expand(rewards.shape)
        return {**_reward_metrics(rewards, level, 2),
                "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                "rewards/margins": (chosen - rejected).mean(),
                "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
                "logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean()}


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
             beta: float = 0.1, loss_type: LossType = "sigmoid", label_smoothing: float = 0.0,
             impl: Impl = "auto") -> PreferenceLossOutput:
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
            summed log-probs of each response under the policy / the reference model. NaN or +inf (and an
            undefined margin, -inf − -inf) → ValueError on CPU tensors, a NaN loss on CUDA.
        beta: > 0.
        loss_type: one of ``LOSS_TYPES``.
        label_smoothing: ε above.
        impl: validated for a uniform signature; dpo_loss is plain PyTorch and calls no op.

    Returns:
        ``PreferenceLossOutput``: loss = mean over pairs; metrics = the module-level ones (group 0 = chosen,
        group 1 = rejected), ``loss/dpo``, and TRL's names ``rewards/chosen``, ``rewards/rejected``,
        ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``.

    Example::

        >>> import torch
        >>> from prefrank.losses import dpo_loss
        >>> out = dpo_loss(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]),
        ...                torch.tensor([-4.0]), beta=0.5)
        >>> round(out.loss.item(), 4), out.metrics["rewards/margins"].item()
        (0.3133, 1.0)
    """
    beta, label_smoothing = _check_dpo_options(beta, loss_type, label_smoothing)
    _check_impl(impl)
    tensors = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    names = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
    acc = _float_inputs(**dict(zip(names, tensors, strict=True)))
    _checks.same_shape("policy_chosen", policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen,
                       ref_rejected=ref_rejected)
    _require_lists("policy_chosen", policy_chosen.numel(), "pairs")
    pc, pr, rc, rr, h = _dpo_pairs(names, tensors, acc)
    per_pair = _dpo_losses(h, beta, loss_type, label_smoothing)
    loss = per_pair.mean()
    if _checks.data_checks_enabled(*tensors) and torch.isnan(loss):
        # the robust loss is −ε/(1−2ε)·∞ = −∞ at a margin of +∞ and +∞ at −∞: a batch with both has no mean
        raise ValueError(f"the {loss_type} DPO loss is -inf for pair {_lists.first_list(per_pair == -torch.inf)} "
                         f"(margin +inf) and +inf for pair {_lists.first_list(per_pair == torch.inf)} (margin -inf): "
                         "their mean is undefined")
    metrics = {"loss/dpo": loss.detach(), **_dpo_metrics(pc, pr, rc, rr, beta)}
    return PreferenceLossOutput(loss, metrics)


# ------------------------------------------------------------------------------------------------------------
# Listwise DPO (Plackett-Luce or sorting-network ranker)
# ------------------------------------------------------------------------------------------------------------

def _check_ranking_shape(ranking: Tensor, policy_logps: Tensor, policy_name: str) -> None:
    _checks.int_tensor("ranking", ranking)
    _checks.same_device(policy_name, policy_logps, ranking=ranking)
    if ranking.shape != policy_logps.shape:
        raise ValueError(f"ranking must have the shape of {policy_name} {tuple(policy_logps.shape)} (one place "
                         f"per item), got {tuple(ranking.shape)}: pad a list that ranks fewer items with -1 "
                         f"(absent items); for a partial top-k observation list the k observed items first, "
                         f"then the others in any order, and pass top_k=k (unlisted items are padding, not "
                         f"'ranked below')")


def _list_inputs(policy_logps: Tensor, ref_logps: Tensor, groups: Tensor | None, ranking: Tensor | None,
                 mask: Tensor | None) -> torch.dtype:
    """Metadata checks of the (…, K) list inputs; returns the accumulation dtype."""
    acc = _float_inputs(policy_logps=policy_logps, ref_logps=ref_logps)
    _checks.same_shape("policy_logps", policy_logps, ref_logps=ref_logps)
    if policy_logps.dim() == 0:
        raise ValueError("policy_logps must have at least one dimension (the items of each list)")
    _require_lists("policy_logps", math.prod(policy_logps.shape[:-1]))
    if ranking is not None and groups is not None:
        raise ValueError("pass either ranking or groups, not both")
    if groups is not None:
        _checks.int_tensor("groups", groups)
        _checks.same_device("policy_logps", policy_logps, groups=groups)
        _checks.same_shape("policy_logps", policy_logps, groups=groups)
    if ranking is not None:
        _check_ranking_shape(ranking, policy_logps, "policy_logps")
    if mask is not None:
        _checks.bool_tensor("mask", mask)
        _checks.same_device("policy_logps", policy_logps, mask=mask)
        _checks.same_shape("policy_logps", policy_logps, mask=mask)
    return acc


def _flat(t: Tensor | None) -> Tensor | None:
    """(…, K) → (N, K), a view where possible."""
    return None if t is None else t.reshape(-1, t.shape[-1])


def _require_ranked_lists(level: Tensor, what: str) -> None:
    """ValueError if a list has no two valid items at different levels (a data check)."""
    bad = level.amax(-1) < 1   # amax, not max(dim): the latter opens a parallel region even for tiny inputs
    if bad.any():
        raise ValueError(f"{what}: list {_lists.first_list(bad)} (flattened batch index) has no two valid items "
                         f"at different levels (all padding, a single item, or all in one group, e.g. all "
                         f"positives): there is nothing to rank; drop such lists")


def listwise_dpo_loss(policy_logps: Tensor, ref_logps: Tensor, *, groups: Tensor | None = None,
                      ranking: Tensor | None = None, mask: Tensor | None = None, beta: float = 0.1,
                      ranker: Ranker = "plackett_luce", ties: str = "breslow", top_k: int | None = None,
                      impl: Impl = "auto", **sortnet_kwargs: str | float) -> PreferenceLossOutput:
    """Listwise DPO over (B, K) lists of responses: a ranking loss on the rewards r = β·(policy − ref).

    The order of each list comes from ``groups`` (levels, ties allowed, -1 padding), or ``ranking``
    (best-first item indices, -1 tail padding, the items' length: shape (B, K)), or neither (items already
    best-first); ``mask`` False drops an item everywhere (ragged lists).

    ``ranker="plackett_luce"`` (Rafailov et al. App. A.3, LiPO/PRO-style): loss per list =
    ``plackett_luce_nll(r, groups|ranking, mask, top_k, ties)``, i.e. Σ over scored places of
    −r_i + log Σ_{j still in the pool} e^{r_j}; tied groups by Breslow/Efron; with ``groups`` every group is
    scored, the last one included (``top_k = number of groups − 1`` leaves a tied bottom group unscored).
    K = 2 with groups [0, 1] is exactly ``dpo_loss(loss_type="sigmoid")``. S-DPO (one positive ≻ K
    unordered negatives) is ``groups=[0, 1, …, 1], top_k=1`` — also available as :func:`sdpo_loss`.
    A partial top-k observation: ``ranking`` lists the k observed items first, then the others in any
    order, with ``top_k=k`` (the others stay in the denominators).

    ``ranker="sortnet"``: ``sortnet_rank_loss(r, levels, target="block", **sortnet_kwargs)`` — a relaxed
    sorting network sorts the rewards best-first and each valid item pays −log of its mass on the block of
    positions its group should occupy, averaged over the list (tie-aware). ``sortnet_kwargs``: ``network``,
    ``relaxation``, ``steepness``, ``art_lambda``, ``target`` (see ``prefrank.ops.sortnet_rank_loss``);
    ``ties`` and ``top_k`` are Plackett-Luce options (``top_k`` must stay None here).

    Every list must hold two valid items at different levels (ValueError on CPU tensors: an all-positive or
    single-item list carries no preference; NaN loss for that list on CUDA). Rewards of scored items must
    not be NaN or +inf (sortnet: must be finite).

    Returns ``PreferenceLossOutput`` with loss = mean over lists of the per-list loss and metrics
    ``loss/listwise`` + the module-level reward metrics (``rewards/group_0`` … ``rewards/group_{K-1}``).

    Example::

        >>> import torch
        >>> from prefrank.losses import listwise_dpo_loss
        >>> policy = torch.tensor([[-1.0, -2.0, -3.0]])
        >>> out = listwise_dpo_loss(policy, torch.full_like(policy, -2.0), groups=torch.tensor([[0, 1, 1]]))
        >>> round(out.loss.item(), 4), out.metrics["rewards/ranking_accuracy"].item()
        (2.3907, 1.0)
    """
    beta = _positive_number("beta", beta)
    _check_listwise_options(ranker, ties, top_k, sortnet_kwargs, "listwise_dpo_loss")
    _check_impl(impl)
    acc = _list_inputs(policy_logps, ref_logps, groups, ranking, mask)
    K = policy_logps.shape[-1]
    if K < 2:
        raise ValueError(f"policy_logps has {K} item(s) per list: a list needs two items at different levels")
    policy, ref, groups_f, ranking_f, mask_f = (_flat(t) for t in (policy_logps, ref_logps, groups, ranking,
                                                                    mask))
    level = _lists.item_levels(policy.shape, policy.device, groups=groups_f, ranking=ranking_f, mask=mask_f)
    valid = level >= 0
    raw = _rewards(policy, ref, beta, acc)
    checking = _checks.data_checks_enabled(policy_logps, ref_logps, groups, ranking, mask)
    if checking:
        if ranker == "sortnet":   # the PL op checks groups/ranking itself; sortnet sees derived levels
            if groups_f is not None:
                _lists.check_groups("groups", groups_f)
            if ranking_f is not None:
                _lists.check_ranking("ranking", ranking_f)
        _check_scored(valid, policy_logps=policy, ref_logps=ref)
        _check_rewards(raw, valid, "policy_logps", "ref_logps", finite=ranker == "sortnet")
    rewards = torch.where(valid, raw, 0)  # padding may hold garbage (NaN logps): keep it out of the ops
    if ranker == "plackett_luce":
        per_list = ops.plackett_luce_nll(rewards, ranking=ranking_f, groups=groups_f, mask=mask_f, top_k=top_k,
                                         ties=ties, impl=impl)
    else:
        per_list = ops.sortnet_rank_loss(rewards, level, reduction="none", **sortnet_kwargs, impl=impl)
    ranked = level.amax(-1) >= 1
    if checking:
        _require_ranked_lists(level, "listwise_dpo_loss")
    loss = _nan_unless(ranked, per_list.to(acc)).mean()
    metrics = {"loss/listwise": loss.detach(), **_reward_metrics(rewards, level, K)}
    return PreferenceLossOutput(loss, metrics)


# ------------------------------------------------------------------------------------------------------------
# S-DPO and MISP-DPO: one positive against K unordered negatives (top-1 Plackett-Luce)
# ------------------------------------------------------------------------------------------------------------

def _pos_negs_inputs(pos: dict[str, Tensor], negs: dict[str, Tensor], mask: Tensor | None,
                     ) -> tuple[list[Tensor], list[Tensor], Tensor | None, torch.dtype]:
    """Validate (…,) positives and (…, K) negatives (dicts name → tensor, policy first); return them
    flattened to (N,) and (N, K)."""
    acc = _float_inputs(**pos, **negs)
    pos_names, neg_names = list(pos), list(negs)
    pos_t, negs_t = list(pos.values()), list(negs.values())
    _checks.same_shape(pos_names[0], pos_t[0], **{pos_names[1]: pos_t[1]})
    _checks.same_shape(neg_names[0], negs_t[0], **{neg_names[1]: negs_t[1]})
    if negs_t[0].dim() != pos_t[0].dim() + 1 or negs_t[0].shape[:-1] != pos_t[0].shape:
        raise ValueError(f"{neg_names[0]} must have shape {tuple(pos_t[0].shape)} + (K,) (the shape of "
                         f"{pos_names[0]} plus a negatives axis), got {tuple(negs_t[0].shape)}")
    _require_lists(pos_names[0], pos_t[0].numel())
    if negs_t[0].shape[-1] == 0:
        raise ValueError(f"{neg_names[0]} has no negatives (K = 0)")
    if mask is not None:
        _checks.bool_tensor("mask", mask)
        _checks.same_device(neg_names[0], negs_t[0], mask=mask)
        _checks.same_shape(neg_names[0], negs_t[0], mask=mask)
        mask = mask.reshape(-1, mask.shape[-1])
    K = negs_t[0].shape[-1]
    return [t.reshape(-1) for t in pos_t], [t.reshape(-1, K) for t in negs_t], mask, acc


def _top1_levels(r_negs: Tensor, mask: Tensor | None) -> Tensor:
    """Levels of [positive, negatives…]: 0 for the positive, 1 for every valid negative, -1 for padding."""
    negatives = torch.ones_like(r_negs, dtype=torch.int64)
    if mask is not None:
        negatives = torch.where(mask, negatives, -1)
    return torch.cat([torch.zeros_like(negatives[:, :1]), negatives], dim=-1)


def _top1_pl(r_pos: Tensor, r_negs: Tensor, levels: Tensor, impl: str) -> Tensor:
    """Per-list −log softmax of the positive among {pos} ∪ valid negatives = softplus(LSE_k(r_neg_k − r_pos)),
    by the Plackett-Luce op (top_k=1 over levels [0, 1, …, 1]). A list without a valid negative scores 0."""
    r_negs = torch.where(levels[:, 1:] >= 0, r_negs, 0)  # padding may hold garbage; keep it out of the op
    scores = torch.cat([r_pos[:, None], r_negs], dim=-1)
    return ops.plackett_luce_nll(scores, groups=levels, top_k=1, impl=impl)


def _check_pos_negs(pos_names: tuple[str, str], neg_names: tuple[str, str], pos: tuple[Tensor, Tensor],
                    negs: tuple[Tensor, Tensor], r_pos: Tensor, r_negs: Tensor, mask: Tensor | None) -> None:
    _check_scored(None, **dict(zip(pos_names, pos, strict=True)))
    _check_scored(mask, **dict(zip(neg_names, negs, strict=True)))
    _check_rewards(r_pos, None, *pos_names, finite=False)
    _check_rewards(r_negs, mask, *neg_names, finite=False)


def sdpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
              beta: float = 0.1, mask: Tensor | None = None, impl: Impl = "auto") -> PreferenceLossOutput:
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
        impl: passed to ``prefrank.ops.plackett_luce_nll``.

    Returns ``PreferenceLossOutput`` with loss = mean over lists, metrics ``loss/sdpo`` + reward metrics
    (group 0 = chosen, group 1 = rejected).

    Example::

        >>> import torch
        >>> from prefrank.losses import sdpo_loss
        >>> out = sdpo_loss(torch.tensor([-1.0]), torch.tensor([[-3.0, -4.0]]), torch.tensor([-2.0]),
        ...                 torch.tensor([[-2.0, -2.0]]), beta=1.0)
        >>> round(out.loss.item(), 4)
        0.1698
    """
    beta = _positive_number("beta", beta)
    _check_impl(impl)
    pos_names, neg_names = ("policy_chosen", "ref_chosen"), ("policy_rejected", "ref_rejected")
    (pc, rc), (pr, rr), mask, acc = _pos_negs_inputs(dict(zip(pos_names, (policy_chosen, ref_chosen))),
                                                     dict(zip(neg_names, (policy_rejected, ref_rejected))),
                                                     mask)
    r_pos, r_negs = _rewards(pc, rc, beta, acc), _rewards(pr, rr, beta, acc)
    if _checks.data_checks_enabled(policy_chosen, policy_rejected, ref_chosen, ref_rejected, mask):
        _check_pos_negs(pos_names, neg_names, (pc, rc), (pr, rr), r_pos, r_negs, mask)
    levels = _top1_levels(r_negs, mask)
    per_list = _top1_pl(r_pos, r_negs, levels, impl).to(acc)
    loss = per_list.mean()
    rewards = torch.cat([r_pos[:, None], r_negs], dim=-1)
    metrics = {"loss/sdpo": loss.detach(), **_reward_metrics(rewards, levels, 2)}
    return PreferenceLossOutput(loss, metrics)


# ------------------------------------------------------------------------------------------------------------
# SMPRO
# ------------------------------------------------------------------------------------------------------------

def _within_group_term(rewards: Tensor, level: Tensor, ranking: Tensor, valid: Tensor, checking: bool,
                       sort_options: dict[str, object], impl: str) -> Tensor:
    """Per-list within-group loss: each group with ≥ 2 items sorted on its own against its internal order.

    The internal order comes from ``ranking`` (best-first item indices, consistent with the groups): the
    i-th listed item of group c is at within-group place i. Every (list, group) sub-list goes through
    ``sortnet_rank_loss`` with all-distinct levels (= −mean log P[item, its place]; a sub-list of 0 or 1
    items scores 0); the per-list term is the mean over that list's groups with ≥ 2 items (0 if it has none).
    All N·K sub-lists are scored (fixed shapes: no host read of which groups exist).
    """
    N, K = rewards.shape
    place = _lists.item_levels(rewards.shape, rewards.device, ranking=ranking)
    if checking:
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
    sub_loss = ops.sortnet_rank_loss(rewards[:, None, :].expand(N, K, K).reshape(N * K, K),
                                     sub_groups.reshape(N * K, K), target="block", reduction="none",
                                     **sort_options, impl=impl).reshape(N, K).to(rewards.dtype)
    return torch.where(multi, sub_loss, 0).sum(-1) / multi.sum(-1).clamp(min=1)


def smpro_loss(policy_logps: Tensor, ref_logps: Tensor, groups: Tensor, *, beta: float = 0.1,
               network: str = "odd_even", relaxation: str = "cauchy", steepness: float = 10.0,
               within_weight: float = 0.0, anchor_weight: float = 1.0, mask: Tensor | None = None,
               ranking: Tensor | None = None, impl: Impl = "auto") -> PreferenceLossOutput:
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
      indices listing exactly the valid items, consistent with ``groups``, -1 padding to length K. Each
      group with ≥ 2 items is soft-sorted on its own and pays −mean log P[i, its within-group place];
      averaged over such groups.
    - anchor term (``anchor_weight``): L_anchor = mean over the positive group (level 0) of
      softplus(−r_i) = −log σ(r_i), pushing positives above the reference (π > π_ref), which a shift-invariant
      ranking loss cannot do (papers.md §2.3 option b, mDPO-style anchor with δ = 0).

    loss = mean over lists of L_across + within_weight·L_within + anchor_weight·L_anchor. Every list needs
    at least one valid item in group 0 (ValueError on CPU tensors, NaN for that list on CUDA). Rewards of
    valid items must be finite. Metrics: ``loss/across``, ``loss/within`` (when within_weight > 0),
    ``loss/anchor`` (unweighted), plus the reward metrics.

    Args:
        policy_logps, ref_logps: (B, K) (or (…, K)) float log-probs.
        groups: int (B, K): 0 = positive group, 1, 2, … worse groups, -1 padding.
        mask: optional bool (B, K), False = padding.
        ranking: optional best-first order refining ``groups``, only used by the within-group term.
        impl: passed to ``prefrank.ops.sortnet_rank_loss``.

    Example::

        >>> import torch
        >>> from prefrank.losses import smpro_loss
        >>> policy = torch.tensor([[-1.0, -1.5, -4.0, -5.0]])
        >>> out = smpro_loss(policy, torch.full_like(policy, -3.0), torch.tensor([[0, 0, 1, 1]]), beta=1.0)
        >>> sorted(k for k in out.metrics if k.startswith("loss/"))
        ['loss/across', 'loss/anchor']
    """
    beta = _positive_number("beta", beta)
    within_weight = _non_negative_number("within_weight", within_weight)
    anchor_weight = _non_negative_number("anchor_weight", anchor_weight)
    _check_impl(impl)
    if groups is None:
        raise TypeError("smpro_loss needs groups (0 = positive group, 1, 2, … worse groups, -1 padding)")
    if within_weight > 0 and ranking is None:
        raise ValueError("within_weight > 0 needs ranking: the internal order of the groups")
    acc = _list_inputs(policy_logps, ref_logps, groups, None, mask)
    if ranking is not None:
        _check_ranking_shape(ranking, policy_logps, "policy_logps")
    K = policy_logps.shape[-1]
    policy, ref, groups_f, ranking_f, mask_f = (_flat(t) for t in (policy_logps, ref_logps, groups, ranking,
                                                                    mask))
    level = _lists.item_levels(policy.shape, policy.device, groups=groups_f, mask=mask_f)
    valid = level >= 0
    positive = valid & (groups_f == 0)
    has_positive = positive.any(-1)
    raw = _rewards(policy, ref, beta, acc)
    checking = _checks.data_checks_enabled(policy_logps, ref_logps, groups, mask, ranking)
    if checking:
        _lists.check_groups("groups", groups_f)
        if ranking_f is not None:
            _lists.check_ranking("ranking", ranking_f)
        if not has_positive.all():
            raise ValueError(f"smpro_loss: list {_lists.first_list(~has_positive)} (flattened batch index) has "
                             f"no valid item in group 0 (the positive group)")
        _check_scored(valid, policy_logps=policy, ref_logps=ref)
        _check_rewards(raw, valid, "policy_logps", "ref_logps", finite=True)
    rewards = torch.where(valid, raw, 0)  # padding may hold garbage
    sort_options = {"network": network, "relaxation": relaxation, "steepness": steepness}
    across = ops.sortnet_rank_loss(rewards, level, target="block", reduction="none", **sort_options,
                                   impl=impl).to(acc)
    anchor = torch.where(positive, F.softplus(-rewards), 0).sum(-1) / positive.sum(-1).clamp(min=1)
    per_list = across + _weighted(anchor_weight, anchor)
    terms = {"loss/across": across, "loss/anchor": anchor}
    if within_weight > 0:
        within = _within_group_term(rewards, level, ranking_f, valid, checking, sort_options, impl)
        per_list = per_list + _weighted(within_weight, within)
        terms["loss/within"] = within
    loss = _nan_unless(has_positive, per_list).mean()
    metrics = {name: term.detach().mean() for name, term in terms.items()}
    metrics.update(_reward_metrics(rewards, level, K))
    return PreferenceLossOutput(loss, metrics)


# ------------------------------------------------------------------------------------------------------------
# MISP-DPO
# ------------------------------------------------------------------------------------------------------------

def misp_dpo_loss(policy_pos: Tensor, ref_pos: Tensor, policy_negs: Tensor, ref_negs: Tensor, *,
                  log_q: Tensor | None = None, beta: float = 0.5, mask: Tensor | None = None,
                  text: tuple[Tensor, Tensor, Tensor, Tensor] | None = None, text_weight: float = 1.0,
                  impl: Impl = "auto") -> PreferenceLossOutput:
    """MISP-DPO (Li et al., ICLR 2026): multi-negative image-side DPO with importance sampling.

    Image side: one response y scored under the preferred image (``policy_pos``/``ref_pos``, (B,)) and
    under K sampled negative images (``policy_negs``/``ref_negs``, (B, K)). With r = β·(policy − ref),
    a_k = r_neg_k − r_pos and K_b = number of valid negatives of list b:

        L_img = softplus( logsumexp_k( a_k − log(K_b · q_k) ) )

    the top-1 Plackett-Luce loss of the positive image among {positive} ∪ negatives, with the sampled-softmax
    importance correction for negatives drawn from the proposal q (``log_q`` (B, K) = log q_k, a
    log-probability: finite and ≤ 0 at every valid negative, ValueError otherwise on CPU tensors). ``log_q``
    None means uniform sampling: no correction (log(K·1/K) = 0). This is the well-defined estimator of
    papers.md §3.2 (the paper's own normaliser is not public). ``mask`` (B, K) bool: False = padding
    negative (ragged K, ignored by K_b too); a list with no valid negative has L_img = 0.

    Text side (``text`` = (policy_chosen, policy_rejected, ref_chosen, ref_rejected), each (B,)): adds
    ``text_weight`` · sigmoid DPO with the same β (positive image fixed, chosen vs rejected response); its
    inputs are checked like ``dpo_loss``'s (NaN/+inf → ValueError naming ``text[i]``).

    K = 1, log_q None and no text is exactly ``dpo_loss`` on (positive image, negative image).

    Returns ``PreferenceLossOutput``: loss = mean over the batch of L_img + text_weight·L_text; metrics
    ``loss/image``, ``loss/text`` (when text is given), the reward metrics of the image side (group 0 =
    positive image, group 1 = negative images, uncorrected rewards) and the text DPO metrics under
    ``text/``.

    Example::

        >>> import torch
        >>> from prefrank.losses import misp_dpo_loss
        >>> out = misp_dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([[-3.0, -4.0]]),
        ...                     torch.tensor([[-2.0, -2.0]]), beta=1.0)
        >>> round(out.loss.item(), 4)
        0.1698
    """
    beta = _positive_number("beta", beta)
    text_weight = _non_negative_number("text_weight", text_weight)
    _check_impl(impl)
    pos_names, neg_names = ("policy_pos", "ref_pos"), ("policy_negs", "ref_negs")
    (pp, rp), (pn, rn), mask, acc = _pos_negs_inputs(dict(zip(pos_names, (policy_pos, ref_pos))),
                                                     dict(zip(neg_names, (policy_negs, ref_negs))), mask)
    if log_q is not None:
        _checks.float_tensor("log_q", log_q)
        _checks.same_device("policy_negs", policy_negs, log_q=log_q)
        _checks.same_shape("policy_negs", policy_negs, log_q=log_q)
    text_parts = None
    if text is not None:
        if not isinstance(text, (tuple, list)) or len(text) != 4:
            raise TypeError("text must be a tuple (policy_chosen, policy_rejected, ref_chosen, ref_rejected)")
        text_names = ("text[0] (policy_chosen)", "text[1] (policy_rejected)", "text[2] (ref_chosen)",
                      "text[3] (ref_rejected)")
        named = dict(zip(text_names, text, strict=True))
        acc = torch.promote_types(acc, _float_inputs(**named))
        _checks.same_shape("policy_pos", policy_pos, **named)
        _checks.same_device("policy_pos", policy_pos, **named)
        text_parts = _dpo_pairs(text_names, tuple(text), acc)
    r_pos, r_negs = _rewards(pp, rp, beta, acc), _rewards(pn, rn, beta, acc)
    if _checks.data_checks_enabled(policy_pos, ref_pos, policy_negs, ref_negs, mask, log_q):
        _check_pos_negs(pos_names, neg_names, (pp, rp), (pn, rn), r_pos, r_negs, mask)
        if log_q is not None:
            q = log_q.reshape(r_negs.shape)
            bad = ~(torch.isfinite(q) & (q <= 0))
            if mask is not None:
                bad = bad & mask
            if bad.any():
                raise ValueError(f"log_q must be a log-probability, finite and <= 0, at every valid negative; "
                                 f"list {_lists.first_list(bad)} (flattened batch index) holds "
                                 f"{float(q[bad][0])}")
    corrected = r_negs
    if log_q is not None:
        q = log_q.reshape(r_negs.shape).to(acc)
        if mask is None:
            n_valid = torch.full_like(r_pos, r_negs.shape[-1])
        else:
            n_valid = mask.sum(-1).to(acc)
            q = torch.where(mask, q, 0)      # padding's log_q is arbitrary (may be -inf / NaN)
        corrected = r_negs - (torch.log(n_valid)[:, None] + q)
    levels = _top1_levels(r_negs, mask)
    image = _top1_pl(r_pos.to(acc), corrected.to(acc), levels, impl).to(acc)
    per_list = image
    metrics = {"loss/image": image.detach().mean(),
               **_reward_metrics(torch.cat([r_pos[:, None], r_negs], dim=-1), levels, 2)}
    if text_parts is not None:
        pc, pr, rc, rr, h = text_parts
        text_losses = _dpo_losses(h, beta, "sigmoid", 0.0)
        if text_weight > 0:  # weight 0 switches the term off (0 · inf would be NaN)
            per_list = per_list + _weighted(text_weight, text_losses)
        metrics["loss/text"] = text_losses.detach().mean()
        metrics.update(_with_prefix("text/", _dpo_metrics(pc, pr, rc, rr, beta)))
    return PreferenceLossOutput(per_list.mean(), metrics)


# ------------------------------------------------------------------------------------------------------------
# nn.Module wrappers: hold the hyper-parameters (validated at construction), take the tensors
# ------------------------------------------------------------------------------------------------------------

class DPOLoss(nn.Module):
    """``DPOLoss(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, impl="auto")(policy_chosen,
    policy_rejected, ref_chosen, ref_rejected)`` → :func:`dpo_loss`."""

    def __init__(self, beta: float = 0.1, loss_type: LossType = "sigmoid", label_smoothing: float = 0.0,
                 impl: Impl = "auto") -> None:
        super().__init__()
        self.beta, self.label_smoothing = _check_dpo_options(beta, loss_type, label_smoothing)
        self.loss_type = loss_type
        self.impl = _check_impl(impl)

    def forward(self, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                ref_rejected: Tensor) -> PreferenceLossOutput:
        return dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.beta,
                        loss_type=self.loss_type, label_smoothing=self.label_smoothing, impl=self.impl)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}"


class ListwiseDPOLoss(nn.Module):
    """``ListwiseDPOLoss(beta=0.1, ranker="plackett_luce", ties="breslow", top_k=None, impl="auto",
    **sortnet_kwargs)(policy_logps, ref_logps, groups=None, ranking=None, mask=None)`` →
    :func:`listwise_dpo_loss`. Unknown or misplaced options raise TypeError/ValueError here, not at forward."""

    def __init__(self, beta: float = 0.1, ranker: Ranker = "plackett_luce", ties: str = "breslow",
                 top_k: int | None = None, impl: Impl = "auto", **sortnet_kwargs: str | float) -> None:
        super().__init__()
        self.beta = _positive_number("beta", beta)
        _check_listwise_options(ranker, ties, top_k, sortnet_kwargs, "ListwiseDPOLoss")
        _check_sortnet_values(sortnet_kwargs)
        self.ranker, self.ties, self.top_k = ranker, ties, top_k
        self.impl = _check_impl(impl)
        self.sortnet_kwargs = dict(sortnet_kwargs)

    def forward(self, policy_logps: Tensor, ref_logps: Tensor, groups: Tensor | None = None,
                ranking: Tensor | None = None, mask: Tensor | None = None) -> PreferenceLossOutput:
        return listwise_dpo_loss(policy_logps, ref_logps, groups=groups, ranking=ranking, mask=mask,
                                 beta=self.beta, ranker=self.ranker, ties=self.ties, top_k=self.top_k,
                                 impl=self.impl, **self.sortnet_kwargs)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, ranker={self.ranker!r}, ties={self.ties!r}, top_k={self.top_k}"
                + "".join(f", {k}={v!r}" for k, v in self.sortnet_kwargs.items()))


class SDPOLoss(nn.Module):
    """``SDPOLoss(beta=0.1, impl="auto")(policy_chosen, policy_rejected, ref_chosen, ref_rejected, mask=None)``
    → :func:`sdpo_loss`."""

    def __init__(self, beta: float = 0.1, impl: Impl = "auto") -> None:
        super().__init__()
        self.beta = _positive_number("beta", beta)
        self.impl = _check_impl(impl)

    def forward(self, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
                mask: Tensor | None = None) -> PreferenceLossOutput:
        return sdpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.beta, mask=mask,
                         impl=self.impl)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


class SMPROLoss(nn.Module):
    """``SMPROLoss(beta=0.1, network="odd_even", relaxation="cauchy", steepness=10.0, within_weight=0.0,
    anchor_weight=1.0, impl="auto")(policy_logps, ref_logps, groups, mask=None, ranking=None)`` →
    :func:`smpro_loss`."""

    def __init__(self, beta: float = 0.1, network: str = "odd_even", relaxation: str = "cauchy",
                 steepness: float = 10.0, within_weight: float = 0.0, anchor_weight: float = 1.0,
                 impl: Impl = "auto") -> None:
        super().__init__()
        self.beta = _positive_number("beta", beta)
        self.within_weight = _non_negative_number("within_weight", within_weight)
        self.anchor_weight = _non_negative_number("anchor_weight", anchor_weight)
        _check_sortnet_values({"network": network, "relaxation": relaxation, "steepness": steepness})
        self.network, self.relaxation, self.steepness = network, relaxation, steepness
        self.impl = _check_impl(impl)

    def forward(self, policy_logps: Tensor, ref_logps: Tensor, groups: Tensor, mask: Tensor | None = None,
                ranking: Tensor | None = None) -> PreferenceLossOutput:
        return smpro_loss(policy_logps, ref_logps, groups, beta=self.beta, network=self.network,
                          relaxation=self.relaxation, steepness=self.steepness,
                          within_weight=self.within_weight, anchor_weight=self.anchor_weight, mask=mask,
                          ranking=ranking, impl=self.impl)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, network={self.network!r}, relaxation={self.relaxation!r}, "
                f"steepness={self.steepness}, within_weight={self.within_weight}, "
                f"anchor_weight={self.anchor_weight}")


class MISPDPOLoss(nn.Module):
    """``MISPDPOLoss(beta=0.5, text_weight=1.0, impl="auto")(policy_pos, ref_pos, policy_negs, ref_negs,
    log_q=None, mask=None, text=None)`` → :func:`misp_dpo_loss`."""

    def __init__(self, beta: float = 0.5, text_weight: float = 1.0, impl: Impl = "auto") -> None:
        super().__init__()
        self.beta = _positive_number("beta", beta)
        self.text_weight = _non_negative_number("text_weight", text_weight)
        self.impl = _check_impl(impl)

    def forward(self, policy_pos: Tensor, ref_pos: Tensor, policy_negs: Tensor, ref_negs: Tensor,
                log_q: Tensor | None = None, mask: Tensor | None = None,
                text: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> PreferenceLossOutput:
        return misp_dpo_loss(policy_pos, ref_pos, policy_negs, ref_negs, log_q=log_q, beta=self.beta,
                             mask=mask, text=text, text_weight=self.text_weight, impl=self.impl)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, text_weight={self.text_weight}"
