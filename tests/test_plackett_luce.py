"""plackett_luce_nll: C++ kernels vs the reference, independent oracles, autograd, compile, bad input."""

import itertools
import math

import numpy as np
import pytest
import torch

from prefrank import ops, reference

K_SIZES = (1, 2, 3, 7, 16, 33, 257)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-2), torch.float16: dict(rtol=1e-3, atol=1e-3)}


def random_case(B, K, mode, *, ragged, dtype=torch.float64):
    """Scores plus the order arguments of one mode; ragged lists pad with mask / -1."""
    scores = torch.randn(B, K, dtype=torch.float64).mul(2).to(dtype)
    kwargs = {}
    if mode == "ranking":
        ranking = torch.stack([torch.randperm(K) for _ in range(B)])
        if ragged:
            lengths = torch.randint(0, K + 1, (B,))
            ranking = torch.where(torch.arange(K) < lengths[:, None], ranking, -1)
        kwargs["ranking"] = ranking
    elif mode == "groups":
        groups = torch.randint(0, max(1, K // 2) + 1, (B, K))
        if ragged:
            groups = torch.where(torch.rand(B, K) < 0.2, -1, groups)
        kwargs["groups"] = groups
    elif ragged:
        kwargs["mask"] = torch.rand(B, K) > 0.25
    return scores, kwargs


MODES = [("order", "breslow"), ("ranking", "breslow"), ("groups", "breslow"), ("groups", "efron")]


@pytest.mark.parametrize("K", K_SIZES)
@pytest.mark.parametrize("mode,ties", MODES)
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_kernel_matches_reference_fp64(seed, K, mode, ties, ragged, top_k):
    B = 5 if K > 100 else 9
    scores, kw = random_case(B, K, mode, ragged=ragged)
    x1 = scores.clone().requires_grad_()
    x2 = scores.clone().requires_grad_()
    got = ops.plackett_luce_nll(x1, ties=ties, top_k=top_k, **kw)
    want = reference.plackett_luce_nll(x2, ties=ties, top_k=top_k, **kw)
    assert got.dtype == torch.float64 and got.shape == (B,)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    g = torch.randn(B, dtype=torch.float64)
    (got * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,ties", MODES)
def test_low_precision_inputs_accumulate_in_fp32(seed, dtype, mode, ties):
    scores, kw = random_case(17, 33, mode, ragged=True, dtype=dtype)
    x = scores.clone().requires_grad_()
    got = ops.plackett_luce_nll(x, ties=ties, **kw)
    assert got.dtype == torch.float32
    want = reference.plackett_luce_nll(scores.double().requires_grad_(), ties=ties, **kw)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    got.sum().backward()
    assert x.grad.dtype == dtype
    x64 = scores.double().requires_grad_()
    reference.plackett_luce_nll(x64, ties=ties, **kw).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **TOL[dtype])


def test_batch_shape_dim_and_non_contiguous(seed):
    base = torch.randn(7, 11, 4, dtype=torch.float64)
    scores = base[::2, :, 1:]                      # (4, 11, 3), strided, items along dim=1
    groups = torch.randint(-1, 3, (4, 11, 3))
    x = scores.clone().requires_grad_()
    got = ops.plackett_luce_nll(scores, groups=groups, dim=1, ties="efron")
    assert got.shape == (4, 3)
    want = reference.plackett_luce_nll(x.movedim(1, -1), groups=groups.movedim(1, -1), ties="efron")
    torch.testing.assert_close(got, want)
    xs = scores.clone().requires_grad_()
    ops.plackett_luce_nll(xs, groups=groups, dim=1, ties="efron").sum().backward()
    want.sum().backward()
    torch.testing.assert_close(xs.grad, x.grad)


def test_reductions_and_inputs_left_untouched(seed):
    scores, kw = random_case(6, 5, "groups", ragged=True, dtype=torch.float32)
    before = {k: v.clone() for k, v in kw.items()}
    snapshot = scores.clone()
    per_list = ops.plackett_luce_nll(scores, **kw)
    torch.testing.assert_close(ops.plackett_luce_nll(scores, reduction="sum", **kw), per_list.sum())
    torch.testing.assert_close(ops.plackett_luce_nll(scores, reduction="mean", **kw), per_list.mean())
    assert torch.equal(scores, snapshot) and all(torch.equal(kw[k], before[k]) for k in kw)


# ---------------------------------------------------------------------------------------------------------
# Independent oracles
# ---------------------------------------------------------------------------------------------------------

def brute_force_topk_nll(scores, ranking, k):
    """−log P(the observed first k places) = −log Σ over all completions of Π_p e^{s_π(p)} / Σ_{q≥p} e^{s_π(q)}."""
    s = [float(v) for v in scores]
    n = len(ranking)
    total = 0.0
    for perm in itertools.permutations(range(n)):
        if list(perm[:k]) != list(ranking[:k]):
            continue
        p = 1.0
        for i in range(n):
            p *= math.exp(s[perm[i]]) / sum(math.exp(s[j]) for j in perm[i:])
        total += p
    return -math.log(total)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 6])
def test_top_k_is_the_exact_partial_ranking_marginal(seed, K):
    for _ in range(3):
        scores = torch.randn(K, dtype=torch.float64)
        ranking = torch.randperm(K)
        for k in range(1, K + 1):
            got = ops.plackett_luce_nll(scores, ranking=ranking, top_k=k).item()
            assert got == pytest.approx(brute_force_topk_nll(scores, ranking.tolist(), k), rel=1e-9, abs=1e-12)


def closed_form_ties(scores, groups, ties):
    """Breslow/Efron by their textbook formulas, one group at a time with plain floats."""
    s = [float(v) for v in scores]
    levels = sorted({int(g) for g in groups if g >= 0})
    nll = 0.0
    for level in levels:
        members = [i for i, g in enumerate(groups) if g == level]
        risk = [i for i, g in enumerate(groups) if g >= level]
        S = sum(math.exp(s[i]) for i in risk)
        A = sum(math.exp(s[i]) for i in members)
        d = len(members)
        nll -= sum(s[i] for i in members)
        for l in range(d):
            nll += math.log(S - (l / d) * A) if ties == "efron" else math.log(S)
    return nll


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_ties_match_closed_formulas(seed, ties):
    for K in (2, 5, 9):
        scores = torch.randn(K, dtype=torch.float64)
        groups = torch.randint(-1, 3, (K,))
        got = ops.plackett_luce_nll(scores, groups=groups, ties=ties).item()
        assert got == pytest.approx(closed_form_ties(scores, groups.tolist(), ties), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_groups_equal_statsmodels_cox_partial_likelihood(seed, ties):
    PHReg = pytest.importorskip("statsmodels.duration.hazard_regression").PHReg
    scores = torch.randn(12, dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4])[torch.randperm(12)]
    model = PHReg(groups.double().numpy(), scores.numpy()[:, None], status=np.ones(12), ties=ties)
    want = -model.loglike([1.0])
    assert ops.plackett_luce_nll(scores, groups=groups, ties=ties).item() == pytest.approx(want, rel=1e-10)


# ---------------------------------------------------------------------------------------------------------
# Numerics: large and infinite scores
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,ties", MODES)
def test_stable_for_scores_of_1e4(seed, mode, ties):
    scores, kw = random_case(8, 16, mode, ragged=True, dtype=torch.float64)
    big = (scores * 5e3).clamp(-1e4, 1e4)
    want = reference.plackett_luce_nll(big, ties=ties, **kw)
    assert torch.isfinite(want).all()
    got64 = ops.plackett_luce_nll(big, ties=ties, **kw)
    torch.testing.assert_close(got64, want, rtol=1e-12, atol=1e-8)
    x = big.float().requires_grad_()
    got32 = ops.plackett_luce_nll(x, ties=ties, **kw)
    assert torch.isfinite(got32).all()
    torch.testing.assert_close(got32.double(), want, rtol=1e-6, atol=1e-2)
    got32.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_neg_inf_scores_are_strength_zero():
    # a -inf item scored while a finite item competes: probability 0
    assert ops.plackett_luce_nll(torch.tensor([float("-inf"), 0.0])).item() == math.inf
    # -inf items last: they never win against finite items, and their own tail is the equal-score limit
    s = torch.tensor([1.0, 0.5, float("-inf"), float("-inf")], dtype=torch.float64, requires_grad=True)
    got = ops.plackett_luce_nll(s)
    want = ops.plackett_luce_nll(torch.tensor([1.0, 0.5], dtype=torch.float64)) + math.log(2.0)
    torch.testing.assert_close(got, want)
    got.backward()
    assert torch.isfinite(s.grad).all() and s.grad[2:].eq(0).all()
    ref = reference.plackett_luce_nll(s.detach().clone().requires_grad_())
    torch.testing.assert_close(got, ref)
    g = torch.tensor([0, 1, 1, 2])
    torch.testing.assert_close(ops.plackett_luce_nll(s.detach(), groups=g, ties="efron"),
                               reference.plackett_luce_nll(s.detach(), groups=g, ties="efron"))


def test_empty_list_gives_zero():
    got = ops.plackett_luce_nll(torch.randn(2, 4), mask=torch.zeros(2, 4, dtype=torch.bool))
    assert torch.equal(got, torch.zeros(2))


# ---------------------------------------------------------------------------------------------------------
# Autograd, registered ops, compile
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,ties", MODES)
@pytest.mark.parametrize("top_k", [None, 2])
def test_gradcheck_fp64(seed, mode, ties, top_k):
    scores, kw = random_case(3, 6, mode, ragged=True)
    x = scores.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.plackett_luce_nll(t, ties=ties, top_k=top_k, **kw), (x,))


def test_opcheck_registered_ops(seed):
    from prefrank.plackett_luce import canonical_order

    for dtype in (torch.float32, torch.float64):
        scores, kw = random_case(4, 6, "groups", ragged=True, dtype=dtype)
        order, level = canonical_order(scores.shape, scores.device, **kw)
        for ties in (0, 1):
            args = (scores.requires_grad_(), order, level, -1, ties)
            torch.library.opcheck(torch.ops.prefrank.plackett_luce_nll_fwd.default, args)
            grad = torch.randn(4, dtype=dtype)
            torch.library.opcheck(torch.ops.prefrank.plackett_luce_nll_bwd.default,
                                  (grad, scores.detach(), order, level, 2, ties))


def test_torch_compile_fullgraph(seed):
    scores, kw = random_case(5, 7, "groups", ragged=True, dtype=torch.float32)
    fn = torch.compile(lambda s, g: ops.plackett_luce_nll(s, groups=g, ties="efron", reduction="mean"),
                       fullgraph=True, backend="aot_eager")
    x = scores.clone().requires_grad_()
    got = fn(x, kw["groups"])
    got.backward()
    y = scores.clone().requires_grad_()
    want = ops.plackett_luce_nll(y, groups=kw["groups"], ties="efron", reduction="mean")
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(x.grad, y.grad)


def test_reference_backend_dispatch(seed):
    scores, kw = random_case(4, 5, "ranking", ragged=True)
    with ops.use_backend("reference"):
        got = ops.plackett_luce_nll(scores, **kw)
    torch.testing.assert_close(got, ops.plackett_luce_nll(scores, **kw))


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,error,words", [
    (lambda s: ops.plackett_luce_nll(s, ranking=torch.tensor([[0, 0, 1]])), ValueError, "twice"),
    (lambda s: ops.plackett_luce_nll(s, ranking=torch.tensor([[0, 3, 1]])), ValueError, "ranking"),
    (lambda s: ops.plackett_luce_nll(s, ranking=torch.tensor([[0, -1, 1]])), ValueError, "ranking"),
    (lambda s: ops.plackett_luce_nll(s, ranking=torch.tensor([0, 1, 2])), ValueError, "ranking"),
    (lambda s: ops.plackett_luce_nll(s, ranking=torch.tensor([[0, 1, 2, 3]])), ValueError, "ranking"),
    (lambda s: ops.plackett_luce_nll(s, ranking=torch.tensor([[0.0, 1, 2]])), TypeError, "ranking"),
    (lambda s: ops.plackett_luce_nll(s, ranking=torch.tensor([[0, 1, 2]]), groups=torch.tensor([[0, 1, 1]])),
     ValueError, "ranking or groups"),
    (lambda s: ops.plackett_luce_nll(s, groups=torch.tensor([[0, 1]])), ValueError, "groups"),
    (lambda s: ops.plackett_luce_nll(s, groups=torch.tensor([[0, -2, 1]])), ValueError, "groups"),
    (lambda s: ops.plackett_luce_nll(s, mask=torch.tensor([[1, 0, 1]])), TypeError, "mask"),
    (lambda s: ops.plackett_luce_nll(s, top_k=0), ValueError, "top_k"),
    (lambda s: ops.plackett_luce_nll(s, top_k=1.5), TypeError, "top_k"),
    (lambda s: ops.plackett_luce_nll(s, ties="exact"), ValueError, "ties"),
    (lambda s: ops.plackett_luce_nll(s, reduction="avg"), ValueError, "reduction"),
    (lambda s: ops.plackett_luce_nll(s, dim=2), ValueError, "dim"),
    (lambda s: ops.plackett_luce_nll(s.long()), TypeError, "scores"),
    (lambda s: ops.plackett_luce_nll(s.tolist()), TypeError, "scores"),
    (lambda s: ops.plackett_luce_nll(s.clone().fill_(float("nan"))), ValueError, "scores"),
    (lambda s: ops.plackett_luce_nll(s, groups=torch.tensor([[0, 1, 1]], device="meta")), ValueError, "groups"),
])
def test_bad_input_names_the_argument(call, error, words):
    with pytest.raises(error, match=words):
        call(torch.randn(1, 3))


def test_backend_name_is_checked():
    with pytest.raises(ValueError, match="backend"):
        ops.set_backend("cuda")


# ---------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; run by benchmarks/gpu.sh)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,ties", MODES)
@pytest.mark.parametrize("K", [1, 7, 64, 1024])
def test_cuda_matches_cpu_kernel(seed, dtype, mode, ties, K):
    scores, kw = random_case(33, K, mode, ragged=True, dtype=dtype)
    x_cpu = scores.clone().requires_grad_()
    x_gpu = scores.cuda().requires_grad_()
    want = ops.plackett_luce_nll(x_cpu, ties=ties, top_k=2, **kw)
    got = ops.plackett_luce_nll(x_gpu, ties=ties, top_k=2, **{k: v.cuda() for k, v in kw.items()})
    torch.testing.assert_close(got.cpu(), want, **TOL[torch.float32 if dtype != torch.float64 else dtype])
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, **TOL[dtype])
