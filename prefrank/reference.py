"""Pure-PyTorch references of every prefrank op: the oracles the kernels are tested against.

Written for clarity, not speed: each follows the defining formula directly, runs in float64 when given
float64 (so ``torch.autograd.gradcheck`` applies) and is differentiable by autograd. Inputs are assumed
valid (``prefrank.ops`` validates before dispatching here), except ``plackett_luce_nll``, which checks its
arguments exactly like the op, and the log-prob references, which run the same data checks as the kernels
(label range, NaN/+inf at a labelled token: ValueError where ``prefrank._checks.data_checks_enabled``), so
every impl fails alike. Results are float32 for fp32/fp16/bf16 inputs and float64 for float64 inputs, like
the kernels.
"""

import torch

from prefrank import _checks


def _accumulation_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------------------
# Plackett-Luce
# ------------------------------------------------------------------------------------------------------------

def _pl_item_levels(scores, ranking, groups, mask):
    """(level, valid): each item's preference level (smaller = better; only compared, never indexed)."""
    K = scores.shape[-1]
    valid = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if groups is not None:
        level = groups.to(torch.int64)
        valid = level >= 0
    elif ranking is not None:
        ranking = ranking.to(torch.int64)
        places = torch.arange(ranking.shape[-1], device=scores.device).expand_as(ranking)
        hit = (ranking[..., :, None] == torch.arange(K, device=scores.device)) & (ranking >= 0)[..., None]
        valid = hit.any(-2)
        level = torch.where(hit, places[..., :, None], 0).sum(-2)
    else:
        level = torch.arange(K, device=scores.device).expand(scores.shape)
    if mask is not None:
        valid = valid & mask
    return level, valid


def plackett_luce_nll(scores, *, ranking=None, groups=None, mask=None, top_k=None, ties="breslow", dim=-1,
                      reduction="none"):
    """The oracle of ``prefrank.ops.plackett_luce_nll``, with the same argument and value checks (the same
    ValueError/TypeError for bad input; value checks where ``prefrank._checks.data_checks_enabled``)."""
    from prefrank import _checks, plackett_luce

    s, r, g, m, _ = plackett_luce.checked_arguments(scores, ranking, groups, mask, top_k, ties, dim, reduction)
    if _checks.data_checks_enabled(s, r, g, m):
        plackett_luce.check_values(s, r, g, m)
    nll = plackett_luce_nll_unchecked(s, ranking=r, groups=g, mask=m, top_k=top_k, ties=ties)
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.mean()
    return nll


def plackett_luce_nll_unchecked(scores, *, ranking=None, groups=None, mask=None, top_k=None, ties="breslow"):
    """Plackett-Luce / Cox partial-likelihood NLL by its definition over dense risk sets (O(K²) per list).

    Inputs valid and item axis last; returns the per-list NLL.

    For every valid item i with level g(i): risk set R(i) = {j valid: g(j) ≥ g(i)}, its group
    G(i) = {j valid: g(j) = g(i)} of size d, and ℓ(i) = its index inside G(i). The NLL is

        Σ_{i scored} −s_i + log(S(i) − (ℓ(i)/d)·A(i))   (Efron)   or   −s_i + log S(i)   (Breslow)

    with S(i) = Σ_{R(i)} e^s, A(i) = Σ_{G(i)} e^s. Item i is scored when fewer than ``top_k`` distinct
    valid levels are better than g(i). A risk set of -inf scores only is scored as the limit of equal
    scores: log(|R(i)| − ℓ(i)) (Efron) or log|R(i)| (Breslow). See ``prefrank.ops.plackett_luce_nll``.
    """
    acc = _accumulation_dtype(scores)
    level, valid = _pl_item_levels(scores, ranking, groups, mask)
    s = torch.where(valid, scores.to(acc), 0.0)  # padding takes no part (NaN there must not leak into grads)

    li, lj = level[..., :, None], level[..., None, :]
    vj = valid[..., None, :]
    # rows of padding items are dropped at the end; they get the item itself as risk set and group, so no
    # empty log-sum-exp (NaN in the backward, also under the where) is ever formed
    itself = torch.eye(s.shape[-1], dtype=torch.bool, device=s.device)
    vi = valid[..., :, None]
    in_risk = torch.where(vi, vj & (lj >= li), itself)          # [.., i, j]: j in R(i)
    in_group = torch.where(vi, vj & (lj == li), itself)         # j in G(i)
    earlier_in_group = in_group & torch.ones_like(in_group).tril(-1).bool()
    group_size = in_group.sum(-1).to(acc)
    tie_index = earlier_in_group.sum(-1).to(acc)
    n_risk = in_risk.sum(-1).to(acc)

    # number of distinct valid levels strictly better than g(i): Σ_j [g(j) < g(i)] / multiplicity(g(j))
    multiplicity = (valid[..., :, None] & valid[..., None, :] & (li == lj)).sum(-1).clamp(min=1).to(acc)
    better = (vj & (lj < li)).to(acc) / multiplicity[..., None, :]
    groups_before = better.sum(-1).round()
    scored = valid if top_k is None else valid & (groups_before < top_k)

    s_j = s[..., None, :].expand(in_risk.shape)
    zero_strength = ~(in_risk & (s_j > float("-inf"))).any(-1)     # the whole risk set has score -inf
    neg_inf = torch.tensor(float("-inf"), dtype=acc, device=s.device)
    safe = lambda members: torch.where(zero_strength[..., None], 0.0,  # noqa: E731
                                       torch.where(members, s_j, neg_inf))
    log_risk = torch.logsumexp(safe(in_risk), dim=-1)
    log_group = torch.logsumexp(safe(in_group), dim=-1)
    c = tie_index / group_size.clamp(min=1) if ties == "efron" else torch.zeros_like(tie_index)
    term = -s + log_risk + torch.log1p(-c * torch.exp(log_group - log_risk))
    limit = torch.log((n_risk - (tie_index if ties == "efron" else 0.0)).clamp(min=1))
    term = torch.where(zero_strength, limit, term)
    return torch.where(scored, term, torch.zeros_like(term)).sum(-1)


# ------------------------------------------------------------------------------------------------------------
# Sequence log-probs (logprobs family)
# ------------------------------------------------------------------------------------------------------------

def sequence_logprobs(logits, labels, *, segment_ids=None, num_segments=None, ignore_index=-100,
                      temperature=1.0, reduction="sum"):
    """The naive way: materialise log_softmax(logits/temperature) in fp32 (fp64 for fp64), gather, sum.

    Token t counts when labels[t] != ignore_index (and segment_ids[t] >= 0). "sum"/"mean" reduce per row
    (or per segment slot); "none" returns the per-token logps with 0 at skipped tokens.
    """
    acc = _accumulation_dtype(logits)
    logp_all = torch.log_softmax(logits.to(acc) / temperature, dim=-1)
    labels = labels.to(torch.int64)
    active = labels != ignore_index
    if segment_ids is not None:
        active = active & (segment_ids >= 0)
    V = logits.shape[-1]
    checks = _checks.data_checks_enabled(logits, labels)
    if checks and bool((active & ((labels < 0) | (labels >= V))).any()):
        raise ValueError(f"labels must lie in [0, {V}) (the vocabulary) or equal ignore_index={ignore_index}")
    picked = logp_all.gather(-1, torch.where(active, labels, 0).clamp(0, max(V - 1, 0)).unsqueeze(-1)).squeeze(-1)
    if checks and bool((active & torch.isnan(picked)).any()):  # NaN/+inf (or only -inf) in a labelled row
        raise ValueError("logits (divided by temperature) contain NaN or +inf (or only -inf) at a labelled token")
    token_logp = torch.where(active, picked, torch.zeros_like(picked))
    if reduction == "none":
        return token_logp
    if segment_ids is None:
        sums, counts = token_logp.sum(-1), active.sum(-1)
    else:
        slots = segment_ids[active].to(torch.int64)
        sums = torch.zeros(num_segments, dtype=acc, device=logits.device).index_add(
            0, slots, token_logp[active])
        counts = torch.zeros(num_segments, dtype=torch.int64, device=logits.device).index_add(
            0, slots, torch.ones_like(slots))
    if reduction == "mean":
        return sums / counts.clamp(min=1).to(acc)
    return sums


def linear_sequence_logprobs(hidden, weight, labels, *, bias=None, segment_ids=None, num_segments=None,
                             ignore_index=-100, temperature=1.0, reduction="sum", chunk_size=None):
    """``sequence_logprobs(hidden @ weight.T + bias, ...)`` with the full logits materialised."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return sequence_logprobs(logits, labels, segment_ids=segment_ids, num_segments=num_segments,
                             ignore_index=ignore_index, temperature=temperature, reduction=reduction)


# ------------------------------------------------------------------------------------------------------------
# Sorting networks (sortnet family)
# ------------------------------------------------------------------------------------------------------------

def soft_sort(x, *, network="odd_even", relaxation="cauchy", steepness=10.0, art_lambda=0.25,
              descending=False, dim=-1, return_permutation=True):
    """Relaxed sorting network, one layer at a time (see ``prefrank.networks`` for the comparator rule).

    Every wire w with partner p updates as ``x_w ← own·x_w + other·x_p`` with ``α = f(x_hi − x_lo)``
    (lo/hi = the smaller/larger of w, p) and ``(own, other) = (α, 1−α)``, swapped when the comparator sends
    the minimum to hi; P's columns mix the same way, ``P[:, w] ← own·P[:, w] + other·P[:, p]``, from P = I.
    descending=True sorts −x and negates the values back (P unchanged), which is what feeding −x to
    diffsort does. Returns (values, P or None) with values shaped like ``x`` and P shaped
    ``x.shape without dim + (n, n)``.
    """
    from prefrank import networks

    acc = _accumulation_dtype(x)
    v = x.movedim(dim, -1).to(acc)
    if descending:
        v = -v
    n = v.shape[-1]
    partner, receives_min = networks.torch_tables(network, n, v.device)
    wires = torch.arange(n, device=v.device)
    P = None
    if return_permutation:
        P = torch.eye(n, dtype=acc, device=v.device).expand(v.shape[:-1] + (n, n))
    for layer in range(partner.shape[0]):
        p = partner[layer]
        xp = v[..., p]
        alpha = networks.relaxed_alpha(torch.where(p > wires, xp - v, v - xp), relaxation, steepness, art_lambda)
        own, other = networks.mix_weights(alpha, receives_min[layer] != (wires < p), p == wires)
        v = own * v + other * xp
        if P is not None:
            P = own[..., None, :] * P + other[..., None, :] * P[..., :, p]
    if descending:
        v = -v
    return v.movedim(-1, dim), P


def sortnet_rank_loss(scores, groups, *, target="block", network="odd_even", relaxation="cauchy",
                      steepness=10.0, art_lambda=0.25, reduction="mean"):
    """Ranking loss on the relaxed best-first sort of each list's valid items (one list at a time).

    For every list: keep the items with ``groups >= 0`` in their original order (m of them; padding never
    enters the sort), ``P = soft_sort(scores_valid, descending=True)`` (position 0 = best). The block of
    item i is the positions its group occupies when groups are concatenated best-first:
    ``[#{j: g_j < g_i}, #{j: g_j ≤ g_i})``.

    - "block": ``−(1/m) Σ_i log(Σ_{r in block(i)} P[i, r])`` (mass clamped at the dtype's smallest normal);
    - "permutation": ``BCE(P, Q)`` averaged over the m² entries, Q the one-hot of every item's rank (torch's
      ``binary_cross_entropy``: logs clamped at −100; P clamped into [0, 1] against rounding).

    A list without valid items scores 0. Per-list result for reduction="none".
    """
    acc = _accumulation_dtype(scores)
    batch_shape, n = scores.shape[:-1], scores.shape[-1]
    flat_scores = scores.reshape(-1, n).to(acc)
    flat_groups = groups.reshape(-1, n)
    losses = [flat_scores[:0].sum()]  # a 0 placeholder (dropped below): stack and graph for an empty batch
    for s_row, g_row in zip(flat_scores, flat_groups, strict=True):
        valid = g_row >= 0
        m = int(valid.sum())
        if m == 0:  # 0, connected to the scores (padding may hold NaN: never multiplied)
            losses.append(torch.where(valid, s_row, 0).sum())
            continue
        s, g = s_row[valid], g_row[valid]
        _, P = soft_sort(s, network=network, relaxation=relaxation, steepness=steepness,
                         art_lambda=art_lambda, descending=True)
        before = (g[None, :] < g[:, None]).sum(-1)
        if target == "block":
            upto = (g[None, :] <= g[:, None]).sum(-1)
            r = torch.arange(m, device=s.device)
            in_block = (r >= before[:, None]) & (r < upto[:, None])
            mass = (P * in_block).sum(-1)
            losses.append(-torch.log(mass.clamp_min(torch.finfo(acc).tiny)).mean())
        else:
            Q = torch.nn.functional.one_hot(before, m).to(acc)
            losses.append(torch.nn.functional.binary_cross_entropy(P.clamp(0, 1), Q))
    loss = torch.stack(losses)[1:].reshape(batch_shape)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss
