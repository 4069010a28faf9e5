"""Hypothesis fuzz test per loss (issue #13): random shapes (B = 0 and 1 included), dtypes, groups / rankings /
masks / padding, extreme values (±1e4, ±inf, NaN) against a naive float64 formula written here (the
sorting-network terms use ``prefrank.reference``'s soft sort): the loss equals the formula, or both raise the
same exception type. The formulas encode the documented domain: NaN/+inf log-probs at a scored item, an
undefined reward or margin, a list without two levels, an empty batch → ValueError.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefrank import losses, reference

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False)
HUGE = [1e4, -1e4]
NON_FINITE = [float("nan"), float("inf"), float("-inf")]
DTYPES = [torch.float64, torch.float32]


def tensor(draw, shape, dtype, special=True, huge=True) -> torch.Tensor:
    """Finite values in [-30, 30]; sometimes ±1e4 entries (only if ``huge``) and sometimes one 0/NaN/±inf
    entry, so that most examples are in the loss's domain and the rest probe its errors."""
    n = math.prod(shape)
    flat = draw(st.lists(st.floats(min_value=-30.0, max_value=30.0, allow_nan=False), min_size=n, max_size=n))
    if special and n:
        if huge and draw(st.integers(0, 4)) == 0:
            for index in draw(st.lists(st.integers(0, n - 1), max_size=2)):
                flat[index] = draw(st.sampled_from(HUGE))
        if draw(st.integers(0, 5)) == 0:
            flat[draw(st.integers(0, n - 1))] = draw(st.sampled_from([0.0, *NON_FINITE, *(HUGE if huge else [])]))
    return torch.tensor(flat, dtype=torch.float64).reshape(shape).to(dtype)


def maybe_mask(draw, B, K, keep=()) -> torch.Tensor | None:
    """None or a random (B, K) mask; items ``keep[b]`` stay True (so most lists keep two levels)."""
    if not draw(st.booleans()):
        return None
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=B * K, max_size=B * K)), dtype=torch.bool)
    mask = mask.reshape(B, K)
    for b, items in enumerate(keep):
        mask[b, list(items)] = True
    return mask


def check(got_fn, want_fn, dtype, scale=1.0):
    """Run both; equal (fp64: tight; fp32: relative to the inputs' scale) or the same exception type."""
    try:
        want = want_fn()
    except ValueError:
        with pytest.raises(ValueError):
            got_fn()
        return
    got = got_fn().loss
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5 * (1 + scale))
    torch.testing.assert_close(got.double(), torch.as_tensor(want, dtype=torch.float64), **tol)


def bad_logp(x: torch.Tensor) -> bool:
    return bool((torch.isnan(x) | torch.isposinf(x)).any())


def finite_scale(*tensors: torch.Tensor) -> float:
    finite = [t[torch.isfinite(t)].abs().max().item() for t in tensors if torch.isfinite(t).any()]
    return max(finite, default=0.0)


# ------------------------------------------------------------------------------------------------------------
# dpo_loss
# ------------------------------------------------------------------------------------------------------------

def naive_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    pc, pr, rc, rr = (t.double().reshape(-1) for t in (pc, pr, rc, rr))
    if pc.numel() == 0 or any(bad_logp(t) for t in (pc, pr, rc, rr)):
        raise ValueError
    h = (pc - pr) - (rc - rr)
    if torch.isnan(h).any():
        raise ValueError
    total = 0.0
    for x in h.tolist():
        z = beta * x
        if loss_type == "hinge":
            per = max(0.0, 1 - z)
        elif loss_type == "ipo":
            per = (x - 1 / (2 * beta)) ** 2
        else:
            lose, win = softplus(-z), (softplus(z) if eps else 0.0)
            per = (1 - eps) * lose + eps * win if loss_type == "sigmoid" else ((1 - eps) * lose - eps * win) / (
                1 - 2 * eps)
        total += per
    if math.isnan(total):  # robust: a −inf pair (margin +inf) and a +inf pair (margin −inf) have no mean
        raise ValueError
    return total / h.numel()


def softplus(z: float) -> float:
    return max(z, 0.0) + math.log1p(math.exp(-abs(z))) if math.isfinite(z) else max(z, 0.0)


@FUZZ
@given(data=st.data(), B=st.integers(0, 4), loss_type=st.sampled_from(losses.LOSS_TYPES),
       dtype=st.sampled_from(DTYPES), beta=st.floats(0.01, 3.0), eps=st.sampled_from([0.0, 0.1, 0.3]))
def test_fuzz_dpo(data, B, loss_type, dtype, beta, eps):
    t = [tensor(data.draw, (B,), dtype) for _ in range(4)]
    check(lambda: losses.dpo_loss(*t, beta=beta, loss_type=loss_type, label_smoothing=eps),
          lambda: naive_dpo(*t, beta, loss_type, eps), dtype, scale=finite_scale(*t) * beta)


# ------------------------------------------------------------------------------------------------------------
# Plackett-Luce: listwise (groups / ranking / best-first, mask, ties, top_k), S-DPO, MISP-DPO
# ------------------------------------------------------------------------------------------------------------

def lse(xs: list[float]) -> float:
    return torch.logsumexp(torch.tensor(xs, dtype=torch.float64), 0).item() if xs else float("-inf")


def naive_pl_list(r: list[float], level: list[int], ties: str, top_k: int | None) -> float:
    """Cox partial likelihood of one list: level -1 = padding, every valid group scored (top_k: the first k)."""
    present = sorted({g for g in level if g >= 0})
    nll = 0.0
    for rank, g in enumerate(present):
        if top_k is not None and rank >= top_k:
            break
        members = [r[k] for k, lv in enumerate(level) if lv == g]
        risk = [r[k] for k, lv in enumerate(level) if lv >= g]
        log_s, log_a = lse(risk), lse(members)
        for ell, r_i in enumerate(members):
            c = ell / len(members) if ties == "efron" else 0.0
            if log_s == float("-inf"):                # all strength 0: the documented limit of equal scores
                nll += math.log(len(risk) - c * len(members))
            else:
                nll += -r_i + log_s + math.log1p(-c * math.exp(log_a - log_s))
    return nll


def valid_rewards(policy, ref, beta, valid):
    """Rewards as fp64 lists; ValueError for the documented bad scored items."""
    p, q = policy.double(), ref.double()
    if bad_logp(p[valid]) or bad_logp(q[valid]):
        raise ValueError
    r = beta * (p - q)
    if bad_logp(r[valid]):
        raise ValueError
    return torch.where(valid, r, 0.0)


@st.composite
def listwise_case(draw):
    B, K = draw(st.integers(0, 4)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(DTYPES))
    policy, ref = tensor(draw, (B, K), dtype), tensor(draw, (B, K), dtype)
    order = draw(st.sampled_from(["groups", "ranking", "none"]))
    ranked = K >= 2 and draw(st.integers(0, 9)) > 0      # mostly: every list keeps two levels
    groups = ranking = None
    keep = [(0, 1)] * B if ranked else []
    if order == "groups":
        groups = torch.tensor(draw(st.lists(st.integers(-1, 3), min_size=B * K, max_size=B * K)),
                              dtype=torch.int64).reshape(B, K)
        if ranked:
            groups[:, 0], groups[:, 1] = 0, 1
    elif order == "ranking":
        rows, keep = [], []
        for _ in range(B):
            perm = draw(st.permutations(range(K)))
            listed = draw(st.integers(2 if ranked else 0, K))
            rows.append(list(perm[:listed]) + [-1] * (K - listed))
            keep.append(tuple(perm[:2]) if ranked else ())
        ranking = torch.tensor(rows, dtype=torch.int64).reshape(B, K)
    return policy, ref, groups, ranking, maybe_mask(draw, B, K, keep)


def levels_of(B, K, groups, ranking, mask) -> torch.Tensor:
    """Raw (uncompacted) levels, -1 for padding, by a loop."""
    level = torch.full((B, K), -1, dtype=torch.int64)
    for b in range(B):
        for k in range(K):
            if groups is not None:
                level[b, k] = groups[b, k]
            elif ranking is not None:
                listed = [int(i) for i in ranking[b]]
                level[b, k] = listed.index(k) if k in listed else -1
            else:
                level[b, k] = k
            if mask is not None and not mask[b, k]:
                level[b, k] = -1
    return level


def naive_listwise_pl(policy, ref, groups, ranking, mask, beta, ties, top_k):
    B, K = policy.shape
    if B == 0 or K < 2:
        raise ValueError
    level = levels_of(B, K, groups, ranking, mask)
    r = valid_rewards(policy, ref, beta, level >= 0)
    per_list = []
    for b in range(B):
        if len({int(g) for g in level[b] if g >= 0}) < 2:
            raise ValueError
        per_list.append(naive_pl_list(r[b].tolist(), level[b].tolist(), ties, top_k))
    return sum(per_list) / B


@FUZZ
@given(case=listwise_case(), beta=st.floats(0.01, 2.0), ties=st.sampled_from(["breslow", "efron"]),
       top_k=st.sampled_from([None, 1, 2]))
def test_fuzz_listwise_plackett_luce(case, beta, ties, top_k):
    policy, ref, groups, ranking, mask = case
    check(lambda: losses.listwise_dpo_loss(policy, ref, groups=groups, ranking=ranking, mask=mask, beta=beta,
                                           ties=ties, top_k=top_k),
          lambda: naive_listwise_pl(policy, ref, groups, ranking, mask, beta, ties, top_k), policy.dtype,
          scale=finite_scale(policy, ref) * beta * policy.shape[-1])


@st.composite
def top1_case(draw):
    B, K = draw(st.integers(0, 4)), draw(st.integers(1, 4))
    dtype = draw(st.sampled_from(DTYPES))
    pos = [tensor(draw, (B,), dtype) for _ in range(2)]
    negs = [tensor(draw, (B, K), dtype) for _ in range(2)]
    return pos, negs, maybe_mask(draw, B, K)


def naive_top1(pos, negs, mask, beta, log_q=None):
    """Per list −log softmax of the positive among {pos} ∪ valid negatives (log_q: the sampled-softmax
    correction log(K_b·q_k)); a list without a valid negative scores 0."""
    (pp, rp), (pn, rn) = pos, negs
    B, K = pn.shape
    if B == 0:
        raise ValueError
    valid = torch.ones(B, K, dtype=torch.bool) if mask is None else mask
    r_pos = valid_rewards(pp, rp, beta, torch.ones(B, dtype=torch.bool))
    r_negs = valid_rewards(pn, rn, beta, valid)
    if log_q is not None:
        q = log_q.double()
        if (~(torch.isfinite(q) & (q <= 0)) & valid).any():
            raise ValueError
    total = 0.0
    for b in range(B):
        keep = [k for k in range(K) if valid[b, k]]
        positive = r_pos[b].item()
        # r_k − log(K_b·q_k): the negatives' corrected rewards
        negatives = [r_negs[b, k].item() - (0.0 if log_q is None else math.log(len(keep)) + log_q[b, k].item())
                     for k in keep]
        if not keep:
            continue                           # no competitor: 0
        if positive == float("-inf") and all(r_negs[b, k] == float("-inf") for k in keep):
            total += math.log(1 + len(keep))   # every strength 0: PL's documented limit of equal scores
        else:  # −log(e^{r_c} / (e^{r_c} + Σ_k e^{r_k})): +inf when only the positive has strength 0
            total += lse([positive, *negatives]) - positive
    return total / B


@FUZZ
@given(case=top1_case(), beta=st.floats(0.01, 2.0))
def test_fuzz_sdpo(case, beta):
    (pc, rc), (pr, rr), mask = case
    check(lambda: losses.sdpo_loss(pc, pr, rc, rr, beta=beta, mask=mask),
          lambda: naive_top1((pc, rc), (pr, rr), mask, beta), pc.dtype,
          scale=finite_scale(pc, rc, pr, rr) * beta)


@FUZZ
@given(data=st.data(), case=top1_case(), beta=st.floats(0.01, 2.0), with_log_q=st.booleans(),
       with_text=st.booleans(), text_weight=st.floats(0.0, 2.0))
def test_fuzz_misp(data, case, beta, with_log_q, with_text, text_weight):
    (pp, rp), (pn, rn), mask = case
    B, K = pn.shape
    log_q = None
    if with_log_q:
        log_q = torch.log_softmax(tensor(data.draw, (B, K), torch.float64, special=False), -1)
        if B * K and data.draw(st.booleans()):               # an out-of-domain entry (maybe in padding)
            log_q = log_q.clone()
            log_q.view(-1)[data.draw(st.integers(0, B * K - 1))] = data.draw(st.sampled_from(
                [3.0, float("nan"), float("-inf")]))
    text = tuple(tensor(data.draw, (B,), pp.dtype) for _ in range(4)) if with_text else None

    def want():
        image = naive_top1((pp, rp), (pn, rn), mask, beta, log_q)
        if text is None:
            return image
        text_term = naive_dpo(*text, beta, "sigmoid", 0.0)  # validates the text tensors like the loss
        return image if text_weight == 0 else image + text_weight * text_term  # weight 0: the term is off

    check(lambda: losses.misp_dpo_loss(pp, rp, pn, rn, log_q=log_q, beta=beta, mask=mask, text=text,
                                       text_weight=text_weight),
          want, pp.dtype, scale=finite_scale(pp, rp, pn, rn, *(text or ())) * beta * (1 + text_weight) + 10)


# ------------------------------------------------------------------------------------------------------------
# Sorting-network losses: listwise ranker="sortnet", SMPRO
# ------------------------------------------------------------------------------------------------------------

def naive_block(r: list[float], level: list[int], steepness: float, relaxation: str) -> float:
    """−mean_i log Σ_{p in block of g(i)} P[i, p] over the valid items (in item order) of one list."""
    idx = [k for k, g in enumerate(level) if g >= 0]
    if len(idx) < 2:
        return 0.0
    x = torch.tensor([r[k] for k in idx], dtype=torch.float64)
    lv = [level[k] for k in idx]
    _, P = reference.soft_sort(x, relaxation=relaxation, steepness=steepness, descending=True)
    terms = []
    for i in range(len(idx)):
        start = sum(g < lv[i] for g in lv)
        stop = start + sum(g == lv[i] for g in lv)
        terms.append(-math.log(max(P[i, start:stop].sum().item(), torch.finfo(torch.float64).tiny)))
    return sum(terms) / len(terms)


def finite_rewards(policy, ref, beta, valid):
    r = valid_rewards(policy, ref, beta, valid)
    if torch.isneginf(r[valid]).any():                     # a sorting network needs finite rewards
        raise ValueError
    return r


@st.composite
def sortnet_case(draw):
    B, K = draw(st.integers(0, 4)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(DTYPES))
    # ±1e4 in float64 only: a near-hard float32 sort legitimately loses the tiny off-block masses
    huge = dtype == torch.float64
    policy, ref = tensor(draw, (B, K), dtype, huge=huge), tensor(draw, (B, K), dtype, huge=huge)
    groups = torch.tensor(draw(st.lists(st.integers(-1, 2), min_size=B * K, max_size=B * K)),
                          dtype=torch.int64).reshape(B, K)
    ranked = K >= 2 and draw(st.integers(0, 9)) > 0      # mostly: a positive and a second level per list
    if ranked:
        groups[:, 0], groups[:, 1] = 0, 1
    return policy, ref, groups, maybe_mask(draw, B, K, [(0, 1)] * B if ranked else [])


@FUZZ
@given(case=sortnet_case(), beta=st.floats(0.01, 2.0), steepness=st.floats(0.5, 20.0),
       relaxation=st.sampled_from(["cauchy", "optimal"]))
def test_fuzz_listwise_sortnet(case, beta, steepness, relaxation):
    policy, ref, groups, mask = case
    B, K = policy.shape

    def want():
        if B == 0 or K < 2:
            raise ValueError
        level = levels_of(B, K, groups, None, mask)
        r = finite_rewards(policy, ref, beta, level >= 0)
        if any(len({int(g) for g in level[b] if g >= 0}) < 2 for b in range(B)):
            raise ValueError
        return sum(naive_block(r[b].tolist(), level[b].tolist(), steepness, relaxation) for b in range(B)) / B

    check(lambda: losses.listwise_dpo_loss(policy, ref, groups=groups, mask=mask, beta=beta, ranker="sortnet",
                                           steepness=steepness, relaxation=relaxation),
          want, policy.dtype, scale=100.0)


@FUZZ
@given(case=sortnet_case(), beta=st.floats(0.01, 2.0), steepness=st.floats(0.5, 20.0),
       anchor_weight=st.floats(0.0, 2.0))
def test_fuzz_smpro(case, beta, steepness, anchor_weight):
    policy, ref, groups, mask = case
    B, K = policy.shape

    def want():
        if B == 0:
            raise ValueError
        level = levels_of(B, K, groups, None, mask)
        valid = level >= 0
        positive = valid & (groups == 0)
        if not positive.any(-1).all():
            raise ValueError
        r = finite_rewards(policy, ref, beta, valid)
        total = 0.0
        for b in range(B):
            anchor = [softplus(-r[b, k].item()) for k in range(K) if positive[b, k]]
            total += naive_block(r[b].tolist(), level[b].tolist(), steepness, "cauchy")
            total += anchor_weight * sum(anchor) / len(anchor)
        return total / B

    check(lambda: losses.smpro_loss(policy, ref, groups, mask=mask, beta=beta, steepness=steepness,
                                    anchor_weight=anchor_weight),
          want, policy.dtype, scale=100.0 + finite_scale(policy, ref) * beta * anchor_weight)
