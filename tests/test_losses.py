"""Preference losses: reductions between methods, formulas vs straightforward re-implementations written here
(forward and gradients), dtypes, backend parity, a tiny optimisation per loss, metrics and bad input."""

import math

import pytest
import torch

from prefrank import losses, ops

F64 = torch.float64


def leaf(*shape, dtype=F64, scale=1.0):
    return (scale * torch.randn(*shape, dtype=dtype)).requires_grad_()


def grads(value, tensors):
    return torch.autograd.grad(value, tensors, allow_unused=True)


def assert_close_grads(a, b, **tol):
    for x, y in zip(a, b, strict=True):
        assert x is not None and y is not None
        torch.testing.assert_close(x, y, **tol)


# ------------------------------------------------------------------------------------------------------------
# Straightforward implementations (the oracles of this file): loops and textbook formulas
# ------------------------------------------------------------------------------------------------------------

def log_sigmoid(x):
    return -torch.log1p(torch.exp(-x))


def naive_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    h = (pc - rc) - (pr - rr)     # chosen log-ratio minus rejected log-ratio (same value as TRL's logits)
    if loss_type == "sigmoid":
        per = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    elif loss_type == "hinge":
        per = torch.clamp(1 - beta * h, min=0)
    elif loss_type == "ipo":
        per = (h - 1 / (2 * beta)) ** 2
    else:
        per = (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps)
    return per.mean()


def naive_pl_groups(r, groups, ties="breslow", top_k=None):
    """Cox partial likelihood per list by a loop over the distinct levels."""
    total = []
    for b in range(r.shape[0]):
        nll = r.new_zeros(())
        levels = sorted({int(g) for g in groups[b] if g >= 0})
        for rank, lev in enumerate(levels):
            if top_k is not None and rank >= top_k:
                break
            members = [k for k in range(r.shape[1]) if groups[b, k] == lev]
            risk = [k for k in range(r.shape[1]) if groups[b, k] >= lev]
            S = sum(torch.exp(r[b, k]) for k in risk)
            A = sum(torch.exp(r[b, k]) for k in members)
            for ell, k in enumerate(members):
                c = ell / len(members) if ties == "efron" else 0.0
                nll = nll - r[b, k] + torch.log(S - c * A)
        total.append(nll)
    return torch.stack(total).mean()


def naive_pl_ranking(r, ranking):
    total = []
    for b in range(r.shape[0]):
        order = [int(i) for i in ranking[b] if i >= 0]
        nll = r.new_zeros(())
        for j, item in enumerate(order):
            nll = nll - r[b, item] + torch.log(sum(torch.exp(r[b, i]) for i in order[j:]))
        total.append(nll)
    return torch.stack(total).mean()


def naive_top1(r_pos, r_negs, mask=None, log_q=None):
    total = []
    for b in range(r_pos.shape[0]):
        keep = [k for k in range(r_negs.shape[1]) if mask is None or mask[b, k]]
        denominator = torch.exp(r_pos[b])
        for k in keep:
            correction = 0.0 if log_q is None else math.log(len(keep)) + log_q[b, k]
            denominator = denominator + torch.exp(r_negs[b, k] - correction)
        total.append(-torch.log(torch.exp(r_pos[b]) / denominator))
    return torch.stack(total)


# ------------------------------------------------------------------------------------------------------------
# dpo_loss
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_formulas_forward_and_gradients(seed, loss_type, eps):
    tensors = [leaf(7, scale=3.0) for _ in range(4)]
    out = losses.dpo_loss(*tensors, beta=0.3, loss_type=loss_type, label_smoothing=eps)
    want = naive_dpo(*tensors, 0.3, loss_type, eps)
    assert out.loss.dtype == F64 and out.loss.shape == ()
    torch.testing.assert_close(out.loss, want)
    assert_close_grads(grads(out.loss, tensors), grads(want, tensors))


def test_dpo_label_smoothing_sign_conventions():
    # policy prefers chosen (h > 0): cDPO smoothing raises the loss, robust DPO lowers it below cDPO's
    pc, pr, rc, rr = torch.tensor([2.0]), torch.tensor([-1.0]), torch.zeros(1), torch.zeros(1)
    plain = losses.dpo_loss(pc, pr, rc, rr, beta=1.0).loss
    cdpo = losses.dpo_loss(pc, pr, rc, rr, beta=1.0, label_smoothing=0.1).loss
    robust = losses.dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="robust", label_smoothing=0.1).loss
    h = torch.tensor(3.0)
    softplus = torch.nn.functional.softplus
    torch.testing.assert_close(plain, softplus(-h))
    torch.testing.assert_close(cdpo, 0.9 * softplus(-h) + 0.1 * softplus(h))
    torch.testing.assert_close(robust, (0.9 * softplus(-h) - 0.1 * softplus(h)) / 0.8)
    assert cdpo > plain > robust


def test_dpo_robust_infinite_margins():
    """Robust DPO is −ε/(1−2ε)·∞ = −∞ at a margin of +∞ (as TRL's formula): one such pair gives −inf; with a
    +∞ pair (margin −∞) beside it the mean is undefined: ValueError naming both pairs, not a silent NaN."""
    inf = float("inf")
    zeros = torch.zeros(2)
    kw = dict(beta=1.0, loss_type="robust", label_smoothing=0.1)
    assert losses.dpo_loss(torch.tensor([0.0, 1.0]), torch.tensor([-inf, 0.0]), zeros, zeros, **kw).loss == -inf
    with pytest.raises(ValueError, match=r"-inf for pair 0 \(margin \+inf\) and \+inf for pair 1"):
        losses.dpo_loss(torch.tensor([0.0, -inf]), torch.tensor([-inf, 0.0]), zeros, zeros, **kw)


def test_dpo_metrics_match_trl_names(seed):
    pc, pr, rc, rr = (torch.randn(6) for _ in range(4))
    m = losses.dpo_loss(pc, pr, rc, rr, beta=0.5).metrics
    chosen, rejected = 0.5 * (pc - rc), 0.5 * (pr - rr)
    torch.testing.assert_close(m["rewards/chosen"], chosen.mean())
    torch.testing.assert_close(m["rewards/group_0"], chosen.mean())
    torch.testing.assert_close(m["rewards/group_1"], rejected.mean())
    torch.testing.assert_close(m["rewards/margins"], (chosen - rejected).mean())
    torch.testing.assert_close(m["rewards/margin"], (chosen - rejected).mean())
    torch.testing.assert_close(m["rewards/accuracies"], (chosen > rejected).float().mean())
    torch.testing.assert_close(m["rewards/ranking_accuracy"], (chosen > rejected).float().mean())
    torch.testing.assert_close(m["logps/rejected"], pr.mean())
    assert all(not v.requires_grad for v in m.values())


# ------------------------------------------------------------------------------------------------------------
# Reductions between methods
# ------------------------------------------------------------------------------------------------------------

def test_listwise_pl_k2_equals_sigmoid_dpo(seed):
    pc, pr, rc, rr = (leaf(9) for _ in range(4))
    dpo = losses.dpo_loss(pc, pr, rc, rr, beta=0.2).loss
    groups = torch.tensor([[0, 1]]).expand(9, 2)
    pl = losses.listwise_dpo_loss(torch.stack([pc, pr], -1), torch.stack([rc, rr], -1), groups=groups,
                                  beta=0.2).loss
    torch.testing.assert_close(pl, dpo)
    assert_close_grads(grads(pl, [pc, pr]), grads(dpo, [pc, pr]))
    # the same through a ranking, and with the items already best-first
    best_first = losses.listwise_dpo_loss(torch.stack([pc, pr], -1), torch.stack([rc, rr], -1), beta=0.2).loss
    swapped = losses.listwise_dpo_loss(torch.stack([pr, pc], -1), torch.stack([rr, rc], -1), beta=0.2,
                                       ranking=torch.tensor([[1, 0]]).expand(9, 2)).loss
    torch.testing.assert_close(best_first, dpo)
    torch.testing.assert_close(swapped, dpo)


def test_sdpo_one_negative_equals_dpo(seed):
    pc, pr, rc, rr = (leaf(8) for _ in range(4))
    dpo = losses.dpo_loss(pc, pr, rc, rr, beta=0.7).loss
    sdpo = losses.sdpo_loss(pc, pr[:, None], rc, rr[:, None], beta=0.7).loss
    torch.testing.assert_close(sdpo, dpo)
    assert_close_grads(grads(sdpo, [pc, pr]), grads(dpo, [pc, pr]))


def test_misp_one_uniform_negative_equals_dpo(seed):
    pp, pn, rp, rn = (leaf(8) for _ in range(4))
    dpo = losses.dpo_loss(pp, pn, rp, rn, beta=0.5).loss
    misp = losses.misp_dpo_loss(pp, rp, pn[:, None], rn[:, None]).loss
    torch.testing.assert_close(misp, dpo)
    assert_close_grads(grads(misp, [pp, pn]), grads(dpo, [pp, pn]))
    # a uniform proposal over one negative is log q = 0: the correction log(K q) vanishes
    uniform = losses.misp_dpo_loss(pp, rp, pn[:, None], rn[:, None], log_q=torch.zeros(8, 1, dtype=F64)).loss
    torch.testing.assert_close(uniform, dpo)


def test_sdpo_equals_listwise_top1_call(seed):
    pc, rc = torch.randn(5), torch.randn(5)
    pr, rr = torch.randn(5, 3), torch.randn(5, 3)
    sdpo = losses.sdpo_loss(pc, pr, rc, rr, beta=0.4).loss
    groups = torch.tensor([[0, 1, 1, 1]]).expand(5, 4)
    listwise = losses.listwise_dpo_loss(torch.cat([pc[:, None], pr], -1), torch.cat([rc[:, None], rr], -1),
                                        groups=groups, top_k=1, beta=0.4).loss
    torch.testing.assert_close(sdpo, listwise)


def test_misp_uniform_log_q_is_no_correction(seed):
    pp, rp, pn, rn = torch.randn(4), torch.randn(4), torch.randn(4, 3), torch.randn(4, 3)
    plain = losses.misp_dpo_loss(pp, rp, pn, rn).loss
    uniform = losses.misp_dpo_loss(pp, rp, pn, rn, log_q=torch.full((4, 3), -math.log(3))).loss
    torch.testing.assert_close(uniform, plain)
    torch.testing.assert_close(plain, losses.sdpo_loss(pp, pn, rp, rn, beta=0.5).loss)


# ------------------------------------------------------------------------------------------------------------
# Formulas vs the straightforward implementations
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_listwise_pl_groups_vs_loop(seed, ties, top_k):
    B, K = 4, 6
    policy, ref = leaf(B, K, scale=2.0), leaf(B, K, scale=2.0)
    groups = torch.randint(-1, 3, (B, K))
    groups[:, 0], groups[:, 1] = 0, 2          # every list has two levels
    out = losses.listwise_dpo_loss(policy, ref, groups=groups, beta=0.8, ties=ties, top_k=top_k)
    want = naive_pl_groups(0.8 * (policy - ref), groups, ties, top_k)
    torch.testing.assert_close(out.loss, want)
    assert_close_grads(grads(out.loss, [policy, ref]), grads(want, [policy, ref]))


def test_listwise_pl_ranking_and_mask_vs_loop(seed):
    B, K = 3, 5
    policy, ref = leaf(B, K, scale=2.0), leaf(B, K, scale=2.0)
    ranking = torch.stack([torch.randperm(K) for _ in range(B)])
    ranking[1, 3:] = -1                         # ragged: list 1 ranks 3 items
    out = losses.listwise_dpo_loss(policy, ref, ranking=ranking, beta=0.3)
    want = naive_pl_ranking(0.3 * (policy - ref), ranking)
    torch.testing.assert_close(out.loss, want)
    assert_close_grads(grads(out.loss, [policy, ref]), grads(want, [policy, ref]))
    # mask False = the item is gone: same as a ranking that does not list it
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[0, ranking[0, 2]] = False
    masked = losses.listwise_dpo_loss(policy, ref, ranking=ranking, mask=mask, beta=0.3).loss
    shorter = ranking.clone()
    shorter[0] = torch.cat([ranking[0, :2], ranking[0, 3:], torch.tensor([-1])])
    torch.testing.assert_close(masked, naive_pl_ranking(0.3 * (policy - ref), shorter))


def test_sdpo_ragged_negatives_vs_formula(seed):
    pc, rc = leaf(5), leaf(5)
    pr, rr = leaf(5, 4), leaf(5, 4)
    mask = torch.rand(5, 4) > 0.4
    mask[0] = False                              # no negative at all: documented zero loss
    out = losses.sdpo_loss(pc, pr, rc, rr, beta=0.6, mask=mask)
    per_list = naive_top1(0.6 * (pc - rc), 0.6 * (pr - rr), mask)
    assert per_list[0] == 0
    want = per_list.mean()
    torch.testing.assert_close(out.loss, want)
    assert_close_grads(grads(out.loss, [pc, pr, rc]), grads(want, [pc, pr, rc]))


def test_misp_importance_correction_and_text_vs_formula(seed):
    B, K = 5, 3
    pp, rp, pn, rn = leaf(B), leaf(B), leaf(B, K), leaf(B, K)
    log_q = torch.log_softmax(torch.randn(B, K, dtype=F64), -1)
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[2, 1] = False
    log_q[2, 1] = float("nan")                   # a padding entry's proposal is never read
    text = tuple(leaf(B) for _ in range(4))
    out = losses.misp_dpo_loss(pp, rp, pn, rn, log_q=log_q, beta=0.5, mask=mask, text=text, text_weight=0.7)
    image = naive_top1(0.5 * (pp - rp), 0.5 * (pn - rn), mask, log_q)
    h = (text[0] - text[2]) - (text[1] - text[3])
    text_loss = -log_sigmoid(0.5 * h)
    want = (image + 0.7 * text_loss).mean()
    torch.testing.assert_close(out.loss, want)
    inputs = [pp, pn, text[0], text[1]]
    assert_close_grads(grads(out.loss, inputs), grads(want, inputs))
    torch.testing.assert_close(out.metrics["loss/image"], image.mean().detach())
    torch.testing.assert_close(out.metrics["loss/text"], text_loss.mean().detach())


@pytest.mark.parametrize("text_weight", [2.2250738585e-313, 1e39])   # 0 / inf once rounded to float32
def test_misp_text_weight_outside_float32_is_not_rounded_first(text_weight):
    """The weight multiplies the term in one rounding: a positive weight that float32 flushes to 0 still
    carries an infinite text loss (found by test_fuzz_misp: 0 · inf gave NaN), one float32 overflows to inf
    still gives 0 for a zero text loss."""
    zeros, negs = torch.zeros(3), torch.zeros(3, 1)
    chosen = torch.tensor([float("-inf"), 1e4, 1e4])            # text losses: inf, 0, 0 in float32
    text = (chosen, zeros, zeros, zeros)
    out = losses.misp_dpo_loss(zeros, zeros, negs, negs, beta=1.0, text=text, text_weight=text_weight)
    text_loss = -log_sigmoid(chosen.double())
    want = (math.log(2) + torch.where(text_loss == 0, 0.0, text_weight * text_loss)).mean()
    torch.testing.assert_close(out.loss.double(), want)
    finite_text = (chosen[1:],) + (zeros[1:],) * 3
    finite = losses.misp_dpo_loss(zeros[1:], zeros[1:], negs[1:], negs[1:], beta=1.0, text=finite_text,
                                  text_weight=text_weight)
    torch.testing.assert_close(finite.loss.double(), torch.tensor(math.log(2), dtype=F64))


def test_misp_image_term_matches_softplus_lse_form(seed):
    # the DESIGN formula literally: softplus(logsumexp_k(r_neg_k − r_pos − log(K q_k)))
    pp, rp, pn, rn = torch.randn(6), torch.randn(6), torch.randn(6, 3), torch.randn(6, 3)
    log_q = torch.log_softmax(torch.randn(6, 3), -1)
    r_pos, r_neg = 0.5 * (pp - rp), 0.5 * (pn - rn)
    want = torch.nn.functional.softplus(torch.logsumexp(r_neg - r_pos[:, None] - (math.log(3) + log_q), -1))
    torch.testing.assert_close(losses.misp_dpo_loss(pp, rp, pn, rn, log_q=log_q).loss, want.mean())


def test_listwise_gradcheck_float64(seed):
    policy, ref = leaf(2, 4), leaf(2, 4)
    groups = torch.tensor([[0, 1, 1, 2], [0, 0, 1, -1]])
    fn = lambda p, r: losses.listwise_dpo_loss(p, r, groups=groups, ties="efron").loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, (policy, ref))


# ------------------------------------------------------------------------------------------------------------
# dtypes, backends, padding, inputs untouched
# ------------------------------------------------------------------------------------------------------------

def _all_losses(dtype, device="cpu"):
    """(name, fn(tensors) -> output, tensors) for every loss on small random data."""
    B, K = 4, 5
    r = lambda *s: torch.randn(*s).to(device=device, dtype=dtype)  # noqa: E731
    groups = torch.tensor([[0, 0, 1, 2, -1]] * B, device=device)
    log_q = torch.log_softmax(torch.ones(B, 3), -1).to(device)
    return [
        ("dpo", lambda t: losses.dpo_loss(*t, beta=0.2), [r(B), r(B), r(B), r(B)]),
        ("listwise", lambda t: losses.listwise_dpo_loss(*t, groups=groups, ties="efron"), [r(B, K), r(B, K)]),
        ("sdpo", lambda t: losses.sdpo_loss(*t), [r(B), r(B, 3), r(B), r(B, 3)]),
        ("misp", lambda t: losses.misp_dpo_loss(*t, log_q=log_q), [r(B), r(B), r(B, 3), r(B, 3)]),
    ]


@pytest.mark.parametrize("index", range(4))
def test_bf16_logps_accepted(seed, index):
    name, fn, tensors = _all_losses(torch.bfloat16)[index]
    out = fn(tensors)
    assert out.loss.dtype == torch.float32, name
    want = fn([t.float() for t in tensors])
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
    leaves = [t.clone().requires_grad_() for t in tensors]
    g = grads(fn(leaves).loss, leaves)
    assert all(x.dtype == torch.bfloat16 and torch.isfinite(x).all() for x in g), name


@pytest.mark.parametrize("index", range(4))
def test_backends_agree(seed, index):
    name, fn, tensors = _all_losses(torch.float32)[index]
    a = [t.clone().requires_grad_() for t in tensors]
    b = [t.clone().requires_grad_() for t in tensors]
    kernels = fn(a)
    with ops.use_backend("reference"):
        reference = fn(b)
    torch.testing.assert_close(kernels.loss, reference.loss)
    assert_close_grads(grads(kernels.loss, a), grads(reference.loss, b))
    assert kernels.metrics.keys() == reference.metrics.keys()


def test_padding_is_ignored_even_if_garbage(seed):
    policy, ref = torch.randn(3, 4), torch.randn(3, 4)
    groups = torch.tensor([[0, 1, 2, -1], [0, 1, -1, 1], [1, 0, 0, -1]])
    clean = losses.listwise_dpo_loss(policy, ref, groups=groups)
    dirty_policy = torch.where(groups < 0, float("nan"), policy)
    dirty = losses.listwise_dpo_loss(dirty_policy, ref, groups=groups)
    torch.testing.assert_close(dirty.loss, clean.loss)
    for key in clean.metrics:
        torch.testing.assert_close(dirty.metrics[key], clean.metrics[key], equal_nan=True)
    mask = torch.tensor([[True, True, False, True]] * 4)
    negs = torch.where(mask, torch.randn(4, 4), float("nan"))
    out = losses.sdpo_loss(torch.randn(4), negs, torch.randn(4), torch.zeros(4, 4), mask=mask)
    assert torch.isfinite(out.loss)


def test_inputs_not_modified(seed):
    for _, fn, tensors in _all_losses(torch.float32):
        before = [t.clone() for t in tensors]
        fn(tensors)
        for t, b in zip(tensors, before, strict=True):
            assert torch.equal(t, b)


def test_metrics_on_a_hand_built_list():
    # rewards (beta=1, ref=0): list 0 levels [0, 0, 1, 2], list 1 levels [0, 1] + padding
    policy = torch.tensor([[3.0, 1.0, 2.0, -1.0], [0.0, 1.0, 5.0, 5.0]])
    groups = torch.tensor([[0, 0, 1, 2], [0, 3, -1, -1]])       # list 1's level 3 is its second level
    m = losses.listwise_dpo_loss(policy, torch.zeros_like(policy), groups=groups, beta=1.0).metrics
    torch.testing.assert_close(m["rewards/group_0"], torch.tensor((3 + 1 + 0) / 3))
    torch.testing.assert_close(m["rewards/group_1"], torch.tensor((2 + 1) / 2))
    torch.testing.assert_close(m["rewards/group_2"], torch.tensor(-1.0))
    assert torch.isnan(m["rewards/group_3"])                    # fixed keys: level 3 is absent → NaN
    # list 0: best mean 2 vs rest mean 0.5 → 1.5; list 1: 0 − 1 → −1
    torch.testing.assert_close(m["rewards/margin"], torch.tensor(0.25))
    # pairs: list 0 (3,2)(3,-1)(1,2)x(1,-1)(2,-1) → 4 of 5; list 1 (0,1)x → 0 of 1
    torch.testing.assert_close(m["rewards/ranking_accuracy"], torch.tensor(4 / 6))


# ------------------------------------------------------------------------------------------------------------
# Tiny optimisation: gradient descent on free per-item scores ranks the items the right way round
# ------------------------------------------------------------------------------------------------------------

def _descend(loss_fn, params, steps=150, lr=0.1):
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().loss.backward()
        opt.step()
    return loss_fn().metrics


@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
def test_dpo_optimisation_ranks(seed, loss_type):
    chosen, rejected = torch.randn(6).requires_grad_(), torch.randn(6).requires_grad_()
    ref = torch.randn(6), torch.randn(6)
    m = _descend(lambda: losses.dpo_loss(chosen, rejected, *ref, beta=0.5, loss_type=loss_type,
                                         label_smoothing=0.1 if loss_type in ("sigmoid", "robust") else 0.0),
                 [chosen, rejected])
    assert m["rewards/ranking_accuracy"] == 1.0


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_listwise_pl_optimisation_ranks(seed, ties):
    scores = torch.randn(4, 6).requires_grad_()
    groups = torch.tensor([[0, 0, 1, 1, 2, -1], [2, 1, 0, 3, 4, 5], [0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 2, 2]])
    m = _descend(lambda: losses.listwise_dpo_loss(scores, torch.zeros(4, 6), groups=groups, beta=1.0,
                                                  ties=ties), [scores])
    assert m["rewards/ranking_accuracy"] == 1.0


def test_sdpo_optimisation_ranks(seed):
    chosen, rejected = torch.randn(5).requires_grad_(), torch.randn(5, 3).requires_grad_()
    m = _descend(lambda: losses.sdpo_loss(chosen, rejected, torch.zeros(5), torch.zeros(5, 3), beta=1.0),
                 [chosen, rejected])
    assert m["rewards/ranking_accuracy"] == 1.0


def test_misp_optimisation_ranks(seed):
    pos, negs = torch.randn(5).requires_grad_(), torch.randn(5, 3).requires_grad_()
    log_q = torch.log_softmax(torch.randn(5, 3), -1)
    m = _descend(lambda: losses.misp_dpo_loss(pos, torch.zeros(5), negs, torch.zeros(5, 3), log_q=log_q),
                 [pos, negs])
    assert m["rewards/ranking_accuracy"] == 1.0


# ------------------------------------------------------------------------------------------------------------
# Module wrappers
# ------------------------------------------------------------------------------------------------------------

def test_modules_equal_functional(seed):
    pc, pr, rc, rr = (torch.randn(4) for _ in range(4))
    negs, ref_negs = torch.randn(4, 3), torch.randn(4, 3)
    lists, ref_lists = torch.randn(4, 3), torch.randn(4, 3)
    groups = torch.tensor([[0, 1, 1]] * 4)
    pairs = [
        (losses.DPOLoss(beta=0.3, loss_type="robust", label_smoothing=0.1)(pc, pr, rc, rr),
         losses.dpo_loss(pc, pr, rc, rr, beta=0.3, loss_type="robust", label_smoothing=0.1)),
        (losses.ListwiseDPOLoss(beta=0.3, top_k=1)(lists, ref_lists, groups),
         losses.listwise_dpo_loss(lists, ref_lists, groups=groups, beta=0.3, top_k=1)),
        (losses.SDPOLoss(beta=0.3)(pc, negs, rc, ref_negs),
         losses.sdpo_loss(pc, negs, rc, ref_negs, beta=0.3)),
        (losses.MISPDPOLoss(beta=0.3, text_weight=0.5)(pc, rc, negs, ref_negs, text=(pc, pr, rc, rr)),
         losses.misp_dpo_loss(pc, rc, negs, ref_negs, beta=0.3, text=(pc, pr, rc, rr), text_weight=0.5)),
    ]
    for module_out, functional_out in pairs:
        torch.testing.assert_close(module_out.loss, functional_out.loss)
    with pytest.raises(ValueError, match="beta"):
        losses.SMPROLoss(beta=0.0)
    with pytest.raises(ValueError, match="relaxation"):
        losses.SMPROLoss(relaxation="sigmoid")
    with pytest.raises(ValueError, match="loss_type"):
        losses.DPOLoss(loss_type="kto")


# ------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------

def test_bad_input_dpo():
    t = torch.randn(4)
    with pytest.raises(ValueError, match="policy_rejected"):
        losses.dpo_loss(t, torch.randn(5), t, t)
    with pytest.raises(ValueError, match="loss_type"):
        losses.dpo_loss(t, t, t, t, loss_type="sigmoidd")
    for beta in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="beta"):
            losses.dpo_loss(t, t, t, t, beta=beta)
    with pytest.raises(TypeError, match="beta"):
        losses.dpo_loss(t, t, t, t, beta="0.1")
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(t, t, t, t, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(TypeError, match="ref_chosen"):
        losses.dpo_loss(t, t, t.long(), t)


def test_bad_input_listwise():
    p = torch.randn(3, 4)
    groups = torch.tensor([[0, 1, 1, 2]] * 3)
    with pytest.raises(ValueError, match="ref_logps"):
        losses.listwise_dpo_loss(p, torch.randn(3, 5), groups=groups)
    with pytest.raises(ValueError, match="groups"):
        losses.listwise_dpo_loss(p, p, groups=groups[:, :3])
    with pytest.raises(ValueError, match="beta"):
        losses.listwise_dpo_loss(p, p, groups=groups, beta=-1.0)
    with pytest.raises(ValueError, match="ranker"):
        losses.listwise_dpo_loss(p, p, groups=groups, ranker="neuralsort")
    with pytest.raises(TypeError, match="ranker='sortnet'"):
        losses.listwise_dpo_loss(p, p, groups=groups, steepness=5.0)
    with pytest.raises(TypeError, match="unexpected"):
        losses.listwise_dpo_loss(p, p, groups=groups, ranker="sortnet", steepnes=5.0)
    with pytest.raises(ValueError, match="either ranking or groups"):
        losses.listwise_dpo_loss(p, p, groups=groups, ranking=groups)
    all_positive = groups.clone()
    all_positive[1] = 0
    with pytest.raises(ValueError, match="list 1 .*nothing to rank"):
        losses.listwise_dpo_loss(p, p, groups=all_positive)
    no_valid = groups.clone()
    no_valid[2] = -1
    with pytest.raises(ValueError, match="list 2"):
        losses.listwise_dpo_loss(p, p, groups=no_valid)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, 1:] = False                          # one valid item left
    with pytest.raises(ValueError, match="list 0"):
        losses.listwise_dpo_loss(p, p, groups=groups, mask=mask)


def test_bad_input_sdpo_misp():
    pos, negs = torch.randn(4), torch.randn(4, 3)
    with pytest.raises(ValueError, match="policy_rejected"):
        losses.sdpo_loss(pos, torch.randn(5, 3), pos, torch.randn(5, 3))
    with pytest.raises(ValueError, match="ref_negs"):
        losses.misp_dpo_loss(pos, pos, negs, torch.randn(4, 2))
    with pytest.raises(ValueError, match="log_q"):
        losses.misp_dpo_loss(pos, pos, negs, negs, log_q=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="log_q"):
        losses.misp_dpo_loss(pos, pos, negs, negs, log_q=torch.full((4, 3), float("nan")))
    with pytest.raises(ValueError, match="mask"):
        losses.misp_dpo_loss(pos, pos, negs, negs, mask=torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="text"):
        losses.misp_dpo_loss(pos, pos, negs, negs, text=(pos, pos))
    with pytest.raises(ValueError, match="text"):
        losses.misp_dpo_loss(pos, pos, negs, negs, text=(pos, pos, pos, torch.randn(3)))
    with pytest.raises(ValueError, match="beta"):
        losses.misp_dpo_loss(pos, pos, negs, negs, beta=0)
    with pytest.raises(ValueError, match="text_weight"):
        losses.misp_dpo_loss(pos, pos, negs, negs, text_weight=-1.0)


# ------------------------------------------------------------------------------------------------------------
# Sorting-network losses (SMPRO, listwise ranker="sortnet") vs diffsort + the block formula written out
# ------------------------------------------------------------------------------------------------------------

def naive_block_loss(r, levels, network="odd_even", relaxation="cauchy", steepness=10.0):
    """Per list: diffsort on the valid items (in item order) sorted best-first (ascending sort of −r), then
    −mean_i log Σ_{p in block of g(i)} P[i, p], the block = positions after every better valid item."""
    diffsort = pytest.importorskip("diffsort")
    per_list = []
    for b in range(r.shape[0]):
        idx = [k for k in range(r.shape[1]) if levels[b, k] >= 0]
        x, lv = r[b, idx], levels[b, idx]
        if len(idx) == 1:
            per_list.append(r.new_zeros(()))
            continue
        sorter = diffsort.DiffSortNet(network, len(idx), steepness=steepness, distribution=relaxation)
        P = sorter(-x[None])[1][0]
        terms = []
        for i in range(len(idx)):
            start = int((lv < lv[i]).sum())
            stop = start + int((lv == lv[i]).sum())
            terms.append(-torch.log(P[i, start:stop].sum()))
        per_list.append(torch.stack(terms).mean())
    return torch.stack(per_list)


def naive_smpro(r, groups, anchor_weight, within_weight=0.0, ranking=None, **sort_options):
    levels = torch.full_like(groups, -1)
    for b in range(groups.shape[0]):
        present = sorted({int(g) for g in groups[b] if g >= 0})
        for k in range(groups.shape[1]):
            if groups[b, k] >= 0:
                levels[b, k] = present.index(int(groups[b, k]))
    across = naive_block_loss(r, levels, **sort_options)
    positive = groups == 0
    anchor = torch.stack([-log_sigmoid(r[b][positive[b]]).mean() for b in range(r.shape[0])])
    total = across + anchor_weight * anchor
    if within_weight:
        within = []
        for b in range(r.shape[0]):
            place = {int(item): j for j, item in enumerate(ranking[b]) if item >= 0}
            sub_losses = []
            for lev in range(int(levels[b].max()) + 1):
                members = [k for k in range(r.shape[1]) if levels[b, k] == lev]
                if len(members) < 2:
                    continue
                order = sorted(members, key=lambda k: place[k])
                sub_levels = torch.tensor([[order.index(k) for k in members]])
                sub_losses.append(naive_block_loss(r[b, members][None], sub_levels, **sort_options)[0])
            within.append(torch.stack(sub_losses).mean() if sub_losses else r.new_zeros(()))
        total = total + within_weight * torch.stack(within)
    return total.mean()


SMPRO_GROUPS = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 0, -1, 2, 1], [2, 0, 0, 0, 1, -1]])


@pytest.mark.parametrize("network,relaxation", [("odd_even", "cauchy"), ("bitonic", "logistic")])
def test_smpro_vs_diffsort_formula(seed, network, relaxation):
    policy, ref = leaf(3, 6, scale=3.0), leaf(3, 6, scale=3.0)
    out = losses.smpro_loss(policy, ref, SMPRO_GROUPS, beta=0.5, network=network, relaxation=relaxation,
                            steepness=4.0, anchor_weight=0.7)
    want = naive_smpro(0.5 * (policy - ref), SMPRO_GROUPS, 0.7, network=network, relaxation=relaxation,
                       steepness=4.0)
    torch.testing.assert_close(out.loss, want)
    assert_close_grads(grads(out.loss, [policy, ref]), grads(want, [policy, ref]))
    assert set(out.metrics) >= {"loss/across", "loss/anchor", "rewards/group_0", "rewards/group_2",
                                "rewards/margin", "rewards/ranking_accuracy"}


def test_smpro_within_group_term_vs_formula(seed):
    policy, ref = leaf(3, 6, scale=3.0), leaf(3, 6, scale=3.0)
    # a ranking refining the groups: within each group, items in a random order
    ranking = torch.full((3, 6), -1)
    for b in range(3):
        valid = [k for k in torch.randperm(6).tolist() if SMPRO_GROUPS[b, k] >= 0]
        ordered = sorted(valid, key=lambda k: int(SMPRO_GROUPS[b, k]))     # stable: random within a group
        ranking[b, :len(ordered)] = torch.tensor(ordered)
    out = losses.smpro_loss(policy, ref, SMPRO_GROUPS, beta=0.5, steepness=4.0, within_weight=0.6,
                            anchor_weight=0.3, ranking=ranking)
    want = naive_smpro(0.5 * (policy - ref), SMPRO_GROUPS, 0.3, within_weight=0.6, ranking=ranking,
                       steepness=4.0)
    torch.testing.assert_close(out.loss, want)
    assert_close_grads(grads(out.loss, [policy, ref]), grads(want, [policy, ref]))
    assert "loss/within" in out.metrics


def test_smpro_shift_invariance_only_without_anchor(seed):
    policy, ref = torch.randn(3, 6), torch.randn(3, 6)
    shifted = policy + 3.0        # adds β·3 to every reward
    plain = lambda p, w: losses.smpro_loss(p, ref, SMPRO_GROUPS, anchor_weight=w).loss  # noqa: E731
    torch.testing.assert_close(plain(shifted, 0.0), plain(policy, 0.0))
    assert not torch.allclose(plain(shifted, 1.0), plain(policy, 1.0))
    assert plain(shifted, 1.0) < plain(policy, 1.0)    # raising every reward above the reference helps


def test_smpro_all_positive_list_has_zero_across_term(seed):
    groups = torch.tensor([[0, 0, 0, -1]])
    out = losses.smpro_loss(torch.randn(1, 4), torch.randn(1, 4), groups)
    torch.testing.assert_close(out.metrics["loss/across"], torch.tensor(0.0), atol=1e-6, rtol=0)
    assert out.metrics["loss/anchor"] > 0
    assert torch.isnan(out.metrics["rewards/ranking_accuracy"])    # no pair to rank: undefined


@pytest.mark.parametrize("relaxation", ["cauchy", "optimal"])
def test_listwise_sortnet_vs_diffsort_formula(seed, relaxation):
    policy, ref = leaf(3, 5, scale=3.0), leaf(3, 5, scale=3.0)
    groups = torch.tensor([[0, 1, 1, 2, 3], [1, 0, -1, 1, 0], [3, 2, 1, 0, -1]])
    out = losses.listwise_dpo_loss(policy, ref, groups=groups, beta=0.5, ranker="sortnet",
                                   relaxation=relaxation, steepness=6.0)
    levels = torch.tensor([[0, 1, 1, 2, 3], [1, 0, -1, 1, 0], [3, 2, 1, 0, -1]])
    want = naive_block_loss(0.5 * (policy - ref), levels, relaxation=relaxation, steepness=6.0).mean()
    torch.testing.assert_close(out.loss, want)
    assert_close_grads(grads(out.loss, [policy, ref]), grads(want, [policy, ref]))


def _sortnet_losses(device="cpu"):
    B, K = 3, 6
    groups = SMPRO_GROUPS.to(device)
    ranking = torch.stack([torch.argsort(torch.where(g >= 0, g, 99).float(), stable=True) for g in groups])
    ranking = torch.where(torch.gather(groups, 1, ranking) >= 0, ranking, -1)
    r = lambda *s: torch.randn(*s).to(device)  # noqa: E731
    return [
        ("smpro", lambda t: losses.smpro_loss(*t, groups, within_weight=0.5, ranking=ranking),
         [r(B, K), r(B, K)]),
        ("listwise_sortnet", lambda t: losses.listwise_dpo_loss(*t, groups=groups, ranker="sortnet"),
         [r(B, K), r(B, K)]),
    ]


@pytest.mark.parametrize("kernels", ["auto", "triton"])     # C++ CPU kernels / Triton (interpreter)
@pytest.mark.parametrize("index", range(2))
def test_sortnet_losses_backends_agree_and_bf16(seed, index, kernels):
    name, fn, tensors = _sortnet_losses()[index]
    a = [t.clone().requires_grad_() for t in tensors]
    b = [t.clone().requires_grad_() for t in tensors]
    with ops.use_backend(kernels):
        fast = fn(a)
    with ops.use_backend("reference"):
        reference = fn(b)
    torch.testing.assert_close(fast.loss, reference.loss)
    assert_close_grads(grads(fast.loss, a), grads(reference.loss, b))
    half = fn([t.bfloat16() for t in tensors])
    assert half.loss.dtype == torch.float32, name
    torch.testing.assert_close(half.loss, fn([t.bfloat16().float() for t in tensors]).loss)


def test_smpro_optimisation_ranks(seed):
    scores = torch.randn(3, 6).requires_grad_()
    m = _descend(lambda: losses.smpro_loss(scores, torch.zeros(3, 6), SMPRO_GROUPS, beta=1.0), [scores])
    assert m["rewards/ranking_accuracy"] == 1.0
    assert m["rewards/group_0"] > 0       # the anchor lifted the positives above the reference


def test_listwise_sortnet_optimisation_ranks(seed):
    scores = torch.randn(3, 6).requires_grad_()
    m = _descend(lambda: losses.listwise_dpo_loss(scores, torch.zeros(3, 6), groups=SMPRO_GROUPS, beta=1.0,
                                                  ranker="sortnet"), [scores])
    assert m["rewards/ranking_accuracy"] == 1.0


def test_bad_input_smpro():
    p = torch.randn(3, 6)
    with pytest.raises(ValueError, match="ref_logps"):
        losses.smpro_loss(p, torch.randn(3, 5), SMPRO_GROUPS)
    with pytest.raises(ValueError, match="groups"):
        losses.smpro_loss(p, p, SMPRO_GROUPS[:, :5])
    with pytest.raises(ValueError, match="beta"):
        losses.smpro_loss(p, p, SMPRO_GROUPS, beta=0.0)
    with pytest.raises(ValueError, match="anchor_weight"):
        losses.smpro_loss(p, p, SMPRO_GROUPS, anchor_weight=-1.0)
    no_positive = SMPRO_GROUPS.clone()
    no_positive[1] = torch.where(no_positive[1] == 0, 1, no_positive[1])
    with pytest.raises(ValueError, match="list 1 .*group 0"):
        losses.smpro_loss(p, p, no_positive)
    with pytest.raises(ValueError, match="list 2"):
        losses.smpro_loss(p, p, torch.where(torch.arange(3)[:, None] == 2, -1, SMPRO_GROUPS))
    with pytest.raises(ValueError, match="within_weight"):
        losses.smpro_loss(p, p, SMPRO_GROUPS, within_weight=1.0)
    contradicting = torch.tensor([[2, 3, 0, 1, 4, 5]] * 3)
    with pytest.raises(ValueError, match="ranking"):
        losses.smpro_loss(p, p, SMPRO_GROUPS[:1].expand(3, 6), within_weight=1.0, ranking=contradicting)
    with pytest.raises(ValueError, match="relaxation"):
        losses.smpro_loss(p, p, SMPRO_GROUPS, relaxation="sigmoid")


def test_smpro_and_misp_gradcheck_float64(seed):
    policy, ref = leaf(2, 5), leaf(2, 5)
    groups = torch.tensor([[0, 0, 1, 2, -1], [1, 0, 1, 0, 2]])
    ranking = torch.tensor([[1, 0, 2, 3, -1], [3, 1, 0, 2, 4]])
    smpro = lambda p, r: losses.smpro_loss(p, r, groups, steepness=3.0, within_weight=0.5,  # noqa: E731
                                           ranking=ranking).loss
    assert torch.autograd.gradcheck(smpro, (policy, ref))
    log_q = torch.log_softmax(torch.randn(2, 3, dtype=F64), -1).requires_grad_()
    text = tuple(leaf(2) for _ in range(4))
    misp = lambda pp, pn, q, tc: losses.misp_dpo_loss(pp, torch.zeros(2, dtype=F64), pn,  # noqa: E731
                                                      torch.zeros(2, 3, dtype=F64), log_q=q,
                                                      text=(tc, *text[1:])).loss
    assert torch.autograd.gradcheck(misp, (leaf(2), leaf(2, 3), log_q, text[0]))


@pytest.mark.cuda
def test_losses_on_cuda_match_cpu(seed):
    torch.manual_seed(seed)
    cpu_cases = _all_losses(torch.float32) + _sortnet_losses()
    torch.manual_seed(seed)
    cuda_cases = _all_losses(torch.float32, "cuda") + _sortnet_losses("cuda")
    for (name, fn, tensors), (_, cuda_fn, cuda_tensors) in zip(cpu_cases, cuda_cases, strict=True):
        cpu, cuda = fn(tensors), cuda_fn(cuda_tensors)
        torch.testing.assert_close(cuda.loss.cpu(), cpu.loss, msg=name)
        for key, value in cpu.metrics.items():
            torch.testing.assert_close(cuda.metrics[key].cpu(), value, equal_nan=True, msg=f"{name} {key}")
