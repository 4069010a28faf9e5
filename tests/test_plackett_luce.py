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


CASES = {  # every argument the kernels read, each in at least one case
    "ranking_top_k": lambda: (dict(ranking=torch.tensor([[2, 0, 1, 4, -1], [1, 3, 4, 2, 0], [0, -1, -1, -1, -1]])),
                              dict(top_k=2)),
    "groups_breslow_mask": lambda: (dict(groups=torch.tensor([[0, 1, 1, 2, -1], [1, 0, 0, 2, 2], [0, 0, 0, 0, 1]]),
                                         mask=torch.tensor([[1, 1, 1, 1, 0], [1, 0, 1, 1, 1], [1, 1, 1, 1, 1]],
                                                           dtype=torch.bool)), dict(ties="breslow")),
    "groups_efron_top_k": lambda: (dict(groups=torch.tensor([[3, 1, 1, 0, 0], [0, 2, 2, 2, 1], [-1, 0, 1, 1, 1]])),
                                   dict(ties="efron", top_k=1)),
    "mask_order": lambda: (dict(mask=torch.tensor([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]],
                                                  dtype=torch.bool)), dict()),
}


def case_inputs(name, dtype=torch.float32):
    tensors, options = CASES[name]()
    return torch.randn(3, 5, dtype=torch.float64).to(dtype), tensors, options


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_custom_ops(seed, name, dtype):
    from prefrank._options import Ties

    scores, tensors, options = case_inputs(name, dtype)
    top_k = options.get("top_k") or -1
    ties = int(Ties[options.get("ties", "breslow")])
    args = [tensors.get(k) for k in ("ranking", "groups", "mask")]
    torch.library.opcheck(torch.ops.prefrank.plackett_luce_nll.default,
                          (scores.requires_grad_(), *args, top_k, ties, False))
    grad = torch.randn(3, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    torch.library.opcheck(torch.ops.prefrank.plackett_luce_nll_backward.default,
                          (grad, scores.detach(), *args, top_k, ties, False))
    torch.library.opcheck(torch.ops.prefrank.plackett_luce_nll_backward.default,  # strided grad (from a sum)
                          (torch.ones((), dtype=grad.dtype).expand(3), scores.detach(), *args, top_k, ties, True))
    # the kernel ops the public function's autograd.Function calls (no autograd of their own: not differentiable)
    kernel_checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.prefrank_C.plackett_luce_nll_fwd.default,
                          (scores.detach(), *args, top_k, ties), test_utils=kernel_checks)
    torch.library.opcheck(torch.ops.prefrank_C.plackett_luce_nll_bwd.default,
                          (grad, scores.detach(), *args, top_k, ties), test_utils=kernel_checks)


def _pl_with(tensors, options, dim=-1, reduction="mean"):
    def fn(scores, *values):
        kwargs = dict(zip(tensors, values))
        if dim != -1:
            scores = scores.transpose(0, 1)
            kwargs = {k: v.transpose(0, 1) for k, v in kwargs.items()}
        return ops.plackett_luce_nll(scores, dim=dim, reduction=reduction, **kwargs, **options)
    return fn


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compiles_fullgraph(seed, name, backend, dynamic):
    from tests.compile_checks import assert_compiles

    scores, tensors, options = case_inputs(name)
    dim = 0 if name == "groups_efron_top_k" else -1  # dim != -1: the inputs are transposed views
    assert_compiles(_pl_with(tensors, options, dim), [scores, *tensors.values()], backend=backend, dynamic=dynamic)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dim", [-1, 0])
def test_no_host_sync_on_cuda(name, dim):
    from tests.compile_checks import assert_no_host_sync_on_cuda

    scores, tensors, options = case_inputs(name)
    out = assert_no_host_sync_on_cuda(_pl_with(tensors, options, dim, reduction="none"),
                                      [scores, *tensors.values()])
    assert out.shape == (3,) and out.device.type == "cuda"


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradgradcheck_fp64(seed, name):
    scores, tensors, options = case_inputs(name, torch.float64)
    x = scores.requires_grad_()
    fn = lambda t: ops.plackett_luce_nll(t, **tensors, **options)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_double_backward_matches_reference_hessian(seed):
    scores, tensors, options = case_inputs("groups_efron_top_k", torch.float64)
    h_ops = torch.autograd.functional.hessian(lambda t: ops.plackett_luce_nll(t, **tensors, **options).sum(), scores)
    h_ref = torch.autograd.functional.hessian(
        lambda t: reference.plackett_luce_nll(t, **tensors, **options).sum(), scores)
    torch.testing.assert_close(h_ops, h_ref)
    assert h_ops.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_func_grad_vmap_and_per_sample_gradients(seed, name):
    """torch.func transforms (grad, vmap, vmap of grad, jacrev of jacrev) against the reference under plain
    autograd, slice by slice; the mapped slices go to one kernel call (the vmap rule folds them into the
    lists)."""
    _, tensors, options = case_inputs(name, torch.float64)
    stack = torch.randn(4, 3, 5, dtype=torch.float64)  # 4 mapped slices of 3 lists
    ours = lambda t, **order: ops.plackett_luce_nll(t, **order, **options).sum()  # noqa: E731
    ref = lambda t, **order: reference.plackett_luce_nll(t, **order, **options).sum()  # noqa: E731

    def ref_grad(t, **order):
        t = t.detach().requires_grad_()
        return torch.autograd.grad(ref(t, **order), t)[0]

    torch.testing.assert_close(torch.func.grad(lambda t: ours(t, **tensors))(stack[0]),
                               ref_grad(stack[0], **tensors))
    expected = torch.stack([reference.plackett_luce_nll(t, **tensors, **options) for t in stack])
    mapped = torch.func.vmap(lambda t: ops.plackett_luce_nll(t, **tensors, **options))(stack)
    torch.testing.assert_close(mapped, expected)
    # order tensors mapped too, a different one per slice (its lists rolled: a fold that mixed the slices up
    # would pair scores with another slice's order), along dim 1; scores mapped along dim 2
    rolled = [{k: v.roll(i, 0) for k, v in tensors.items()} for i in range(len(stack))]
    orders = {k: torch.stack([order[k] for order in rolled], 1) for k in tensors}
    mapped = torch.func.vmap(lambda t, o: ops.plackett_luce_nll(t, **o, **options), in_dims=(2, 1))(
        stack.permute(1, 2, 0), orders)
    torch.testing.assert_close(mapped, torch.stack([reference.plackett_luce_nll(t, **order, **options)
                                                    for t, order in zip(stack, rolled)]))
    per_sample = torch.func.vmap(torch.func.grad(lambda t: ours(t, **tensors)))(stack)
    torch.testing.assert_close(per_sample, torch.stack([ref_grad(t, **tensors) for t in stack]))
    hessian = torch.func.jacrev(torch.func.jacrev(lambda t: ours(t, **tensors)))(stack[1])
    torch.testing.assert_close(hessian, torch.autograd.functional.hessian(lambda t: ref(t, **tensors), stack[1]))
    assert hessian.abs().sum() > 0


def test_torch_func_vmap_checks_values():
    scores = torch.randn(2, 3, 4)
    scores[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="scores contains NaN"):
        torch.func.vmap(lambda t: ops.plackett_luce_nll(t))(scores)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_missing_cuda_kernels_error_survives_compile(monkeypatch, fullgraph):
    """The public function checks for kernels while torch.compile traces: a CUDA call on a build without
    CUDA kernels gets the actionable message (dynamo re-raises it, or wraps it with fullgraph)."""
    from prefrank import _extension, plackett_luce

    checked = []
    with monkeypatch.context() as patch:
        patch.setattr(plackett_luce, "_require_kernels", lambda device: checked.append(device))
        torch._dynamo.reset()
        torch.compile(lambda x: ops.plackett_luce_nll(x).sum(), fullgraph=True, backend="eager")(torch.randn(2, 3))
    assert checked == [torch.device("cpu")]  # traced, not skipped while compiling

    monkeypatch.setattr(_extension, "has_cuda_kernels", lambda: False)

    def fn(x):
        plackett_luce._require_kernels(torch.device("cuda"))
        return x + 1

    torch._dynamo.reset()
    with pytest.raises(Exception, match="built without CUDA kernels") as error:
        torch.compile(fn, fullgraph=fullgraph, backend="eager")(torch.randn(3))
    assert fullgraph or isinstance(error.value, ImportError)


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
# Edge cases (issue #13): empty inputs, NaN in padding, bad values, short rankings, uint8 groups
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", [{}, {"ranking": torch.zeros(3, 0, dtype=torch.long)},
                                   {"groups": torch.zeros(3, 0, dtype=torch.long)}])
def test_zero_items_score_zero(order):
    x = torch.randn(3, 0, requires_grad=True)
    got = ops.plackett_luce_nll(x, **order)
    assert torch.equal(got, torch.zeros(3))
    got.sum().backward()
    assert x.grad.shape == (3, 0)


def test_zero_lists_give_an_empty_result():
    x = torch.randn(0, 4, requires_grad=True)
    got = ops.plackett_luce_nll(x, groups=torch.zeros(0, 4, dtype=torch.long))
    assert got.shape == (0,)
    total = ops.plackett_luce_nll(x, reduction="sum")
    assert total.item() == 0.0
    total.backward()
    assert x.grad.shape == (0, 4)
    with pytest.raises(ValueError, match="mean"):
        ops.plackett_luce_nll(x, reduction="mean")


PADDING = {
    "groups": lambda: dict(groups=torch.tensor([[0, -1, 1, 2], [1, 0, -1, -1]])),
    "mask": lambda: dict(mask=torch.tensor([[True, False, True, True], [True, True, False, False]])),
    "ranking": lambda: dict(ranking=torch.tensor([[3, 0, 2, -1], [1, 0, -1, -1]])),
}
PADDED = torch.tensor([[False, True, False, False], [False, False, True, True]])  # the padding of each kind


@pytest.mark.parametrize("kind", sorted(PADDING))
@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_nan_in_padding_is_ignored(seed, kind, ties):
    clean = torch.randn(2, 4, dtype=torch.float64)
    dirty = torch.where(PADDED, float("nan"), clean)
    x = dirty.clone().requires_grad_()
    got = ops.plackett_luce_nll(x, ties=ties, **PADDING[kind]())
    want = reference.plackett_luce_nll(clean, ties=ties, **PADDING[kind]())
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[PADDED].eq(0).all()


@pytest.mark.parametrize("kind", sorted(PADDING))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_scored_item_raises_on_cpu(kind, value):
    scores = torch.randn(2, 4)
    scores[0, 0] = value  # item 0 is scored in every kind
    with pytest.raises(ValueError, match="scores"):
        ops.plackett_luce_nll(scores, **PADDING[kind]())
    with pytest.raises(ValueError, match="scores"):
        ops.plackett_luce_nll(scores, impl="reference", **PADDING[kind]())


@pytest.mark.parametrize("bad", [
    dict(ranking=torch.tensor([[0, 9, 1], [2, 0, 1]])),     # out of range: never read
    dict(ranking=torch.tensor([[0, 0, 1], [2, 0, 1]])),     # repeated item
    dict(ranking=torch.tensor([[0, -1, 1], [2, 0, 1]])),    # -1 before the tail
    dict(ranking=torch.tensor([[0, -7, 1], [2, 0, 1]])),    # below -1
    dict(groups=torch.tensor([[0, -2, 1], [2, 0, 1]])),     # level below -1
    dict(scores_nan=True),
])
def test_kernels_write_nan_for_a_bad_list_without_data_checks(bad):
    """What CUDA tensors get by default (no data checks, no sync): NaN for the bad list, the others exact."""
    scores = torch.randn(2, 3)
    if bad.pop("scores_nan", False):
        scores[0, 1] = float("nan")
    args = [bad.get(k) for k in ("ranking", "groups")]
    nll = torch.ops.prefrank.plackett_luce_nll(scores, *args, None, -1, 0, False)
    assert nll[0].isnan() and torch.isfinite(nll[1])
    good = {k: v[1:] for k, v in bad.items()}
    torch.testing.assert_close(nll[1:], ops.plackett_luce_nll(scores[1:], **good))
    grad = torch.ops.prefrank.plackett_luce_nll_backward(torch.ones(2), scores, *args, None, -1, 0, False)
    assert grad[0].isnan().all() and torch.isfinite(grad[1]).all()


def test_ranking_shorter_than_the_items_points_at_top_k_and_padding():
    scores = torch.randn(1, 3)
    with pytest.raises(ValueError, match=r"top_k.*|-1") as info:
        ops.plackett_luce_nll(scores, ranking=torch.tensor([[2, 0]]))
    assert "top_k" in str(info.value) and "-1" in str(info.value) and "ranking" in str(info.value)
    # the model a top-k user means: list the observed items first, pass top_k
    got = ops.plackett_luce_nll(scores, ranking=torch.tensor([[2, 0, 1]]), top_k=2)
    want = (torch.logcumsumexp(scores[:, [2, 0, 1]].flip(-1), -1).flip(-1) - scores[:, [2, 0, 1]])[:, :2].sum(-1)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int32])
def test_small_integer_groups_accepted(seed, dtype):
    scores = torch.randn(4, 6)
    groups = torch.randint(0, 3, (4, 6))
    torch.testing.assert_close(ops.plackett_luce_nll(scores, groups=groups.to(dtype), ties="efron"),
                               ops.plackett_luce_nll(scores, groups=groups, ties="efron"))


# ---------------------------------------------------------------------------------------------------------
# Groups: the kernels' three paths. Levels sorted along the items: the group walk. Unsorted, within a range
# of at most K levels: per-level accumulators, no sort. Unsorted over a wider range ("sparse"): sorted first.
# ---------------------------------------------------------------------------------------------------------

GROUP_PATHS = ("sorted", "levels", "sparse")


def groups_for_path(B, K, path, *, ragged, spread=3):
    """(groups, mask) of B lists (K >= 2) whose valid levels take the kernel path ``path`` in every list, about
    ``spread`` items per level. Items 0 and 1 stay valid: they hold the highest and the lowest level
    (unsorted paths), so the level range is known."""
    span = max(2, K // spread)                                   # levels 0 .. span-1: a range <= K
    step = K + 1 if path == "sparse" else 1                      # sparse: the range (span-1)(K+1) > K
    levels = torch.randint(0, span, (B, K)) * step
    if path == "sorted":
        levels = levels.sort(-1).values
    else:
        levels[:, 0] = (span - 1) * step
        levels[:, 1] = 0
    mask = None
    if ragged:
        padded = torch.rand(B, K) < 0.2
        padded[:, :2] = False
        levels = torch.where(padded, -1, levels)
        mask = torch.rand(B, K) > 0.2
        mask[:, :2] = True
    valid = (levels >= 0) & (True if mask is None else mask)
    for row, keep in zip(levels, valid):                         # the inputs take the path they are named for
        kept = row[keep]
        in_order = bool((kept[1:] >= kept[:-1]).all())
        assert in_order == (path == "sorted")
        if path != "sorted":
            assert (int(kept.max() - kept.min()) < K) == (path == "levels")
    return levels, mask


def assert_matches_reference(scores, tol, grad_tol=None, **kw):
    """Forward and backward (random grad_nll) of the kernels against the float64 oracle on the same inputs."""
    x = scores.detach().clone().requires_grad_()
    got = ops.plackett_luce_nll(x, **kw)
    x64 = scores.detach().double().clone().requires_grad_()
    want = reference.plackett_luce_nll(x64, **kw)
    torch.testing.assert_close(got.double(), want, **tol)
    g = torch.rand(scores.shape[0], dtype=torch.float64) + 0.5
    (got * g.to(got.dtype)).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **(grad_tol or tol))
    return x.grad


@pytest.mark.parametrize("path", GROUP_PATHS)
@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("K", [2, 5, 16, 57])
@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("top_k", [None, 1, 2])
def test_group_paths_match_reference_fp64(seed, path, ties, K, ragged, top_k):
    groups, mask = groups_for_path(11, K, path, ragged=ragged)
    scores = torch.randn(11, K, dtype=torch.float64) * 2
    assert_matches_reference(scores, TOL[torch.float64], groups=groups, mask=mask, ties=ties, top_k=top_k)


@pytest.mark.parametrize("path", GROUP_PATHS)
@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_group_paths_efron_large_tie_groups(seed, path, ties):
    """Three levels of ~100 tied items each: Efron's d terms per group."""
    groups, mask = groups_for_path(4, 300, path, ragged=True, spread=100)
    scores = torch.randn(4, 300, dtype=torch.float64)
    assert_matches_reference(scores, TOL[torch.float64], groups=groups, mask=mask, ties=ties, top_k=None)
    assert_matches_reference(scores, TOL[torch.float64], groups=groups, mask=mask, ties=ties, top_k=2)
    # the worst group has ρ = 1: Efron's factors 1 − ℓ/d multiply below 2^-64 (the flushed running product)
    assert_matches_reference(scores.float(), TOL[torch.float32], groups=groups, mask=mask, ties=ties)


@pytest.mark.parametrize("path", GROUP_PATHS)
@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_group_paths_low_precision(seed, path, ties, dtype):
    groups, mask = groups_for_path(13, 21, path, ragged=True)
    scores = (torch.randn(13, 21) * 2).to(dtype)
    grad = assert_matches_reference(scores, dict(rtol=1e-5, atol=1e-4), TOL[dtype], groups=groups, mask=mask,
                                    ties=ties)
    assert grad.dtype == dtype


@pytest.mark.parametrize("path", GROUP_PATHS)
@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_group_paths_non_contiguous(seed, path, ties):
    groups, mask = groups_for_path(6, 9, path, ragged=True)
    base = torch.randn(9, 3, 6, dtype=torch.float64)
    scores = base[:, 1, :]                                        # (9, 6) strided; items along dim=0
    got = ops.plackett_luce_nll(scores, groups=groups.t(), mask=mask.t(), ties=ties, dim=0)
    assert not scores.is_contiguous() and not groups.t().is_contiguous()
    x = scores.clone().requires_grad_()
    want = reference.plackett_luce_nll(x.t(), groups=groups, mask=mask, ties=ties)
    torch.testing.assert_close(got, want)
    xs = scores.clone().requires_grad_()
    ops.plackett_luce_nll(xs, groups=groups.t(), mask=mask.t(), ties=ties, dim=0).sum().backward()
    want.sum().backward()
    torch.testing.assert_close(xs.grad, x.grad)


@pytest.mark.parametrize("path", GROUP_PATHS)
@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_group_paths_scores_of_1e4(seed, path, ties):
    groups, mask = groups_for_path(8, 16, path, ragged=True)
    big = (torch.randn(8, 16, dtype=torch.float64) * 5e3).clamp(-1e4, 1e4)
    want = reference.plackett_luce_nll(big, groups=groups, mask=mask, ties=ties)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(ops.plackett_luce_nll(big, groups=groups, mask=mask, ties=ties), want,
                               rtol=1e-12, atol=1e-8)
    x = big.float().requires_grad_()
    got32 = ops.plackett_luce_nll(x, groups=groups, mask=mask, ties=ties)
    torch.testing.assert_close(got32.double(), want, rtol=1e-6, atol=1e-2)
    got32.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("path", GROUP_PATHS)
@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_group_paths_neg_inf_scores(path, ties):
    """Strength-0 items: the worst level all -inf (a constant term, gradient 0), and a -inf item in a scored
    level with finite competitors (NLL +inf)."""
    step = 5 if path == "sparse" else 1
    order = [2, 0, 1, 1, 2, 0] if path != "sorted" else [0, 0, 1, 1, 2, 2]
    groups = torch.tensor([order, order]) * step
    scores = torch.randn(2, 6, dtype=torch.float64)
    scores[0][groups[0] == 2 * step] = -math.inf                  # list 0: the worst level has strength 0
    scores[1][groups[1] == step] = torch.tensor([-math.inf, 0.5], dtype=torch.float64)
    x = scores.clone().requires_grad_()
    got = ops.plackett_luce_nll(x, groups=groups, ties=ties)
    want = reference.plackett_luce_nll(scores, groups=groups, ties=ties)
    assert torch.isfinite(got[0]) and got[1].item() == math.inf
    torch.testing.assert_close(got, want)
    got[0].backward()
    tail = groups[0] == 2 * step
    assert torch.isfinite(x.grad).all() and x.grad[0][tail].eq(0).all() and x.grad[0][~tail].ne(0).all()
    x0 = scores[0].clone().requires_grad_()
    reference.plackett_luce_nll(x0, groups=groups[0], ties=ties).backward()
    torch.testing.assert_close(x.grad[0][~tail], x0.grad[~tail])


@pytest.mark.parametrize("path", GROUP_PATHS)
def test_group_paths_write_nan_for_a_bad_list(path):
    """Without data checks (the CUDA default): a level below -1 or a NaN score makes only that list NaN."""
    groups, _ = groups_for_path(3, 6, path, ragged=False)
    scores = torch.randn(3, 6)
    groups[0, 3] = -2
    scores[1, 2] = float("nan")
    for ties in (0, 1):
        nll = torch.ops.prefrank.plackett_luce_nll(scores, None, groups, None, -1, ties, False)
        assert nll[:2].isnan().all() and torch.isfinite(nll[2])
        grad = torch.ops.prefrank.plackett_luce_nll_backward(torch.ones(3), scores, None, groups, None, -1, ties,
                                                             False)
        assert grad[:2].isnan().all() and torch.isfinite(grad[2]).all()

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


# ---------------------------------------------------------------------------------------------------------
# The CPU tile for ties (fp32/fp16/bf16 scores, `groups` whose valid levels span at most TILE_LEVELS values):
# TILE_LANES lists at once; a block's lists that do not qualify (-inf/NaN scores, a bad group, a wider span,
# no valid item) and a last partial block take the scalar path. Full blocks of contiguous fp32 rows without
# a mask load by transposes, other layouts lane by lane. float64 never uses it (gradcheck runs the scalar
# path), so these tests compare fp32 against the float64 oracle at fp32 tolerance.
# ---------------------------------------------------------------------------------------------------------

TILE_LANES, TILE_LEVELS = 16, 16  # csrc/plackett_luce_cpu.cpp: fast::kLanes, fast::kTileLevels
TILE_KINDS = ("tile", "all_tied", "wide", "sorted", "worst_level_neg_inf", "mostly_padding", "empty", "huge")


def tile_case(B, K, *, layout):
    """Scores and arguments of B lists of K items whose kind (TILE_KINDS) cycles so that every kind sits in
    every lane position of some block; B = full blocks plus a partial one. layout "dense": contiguous, -1
    padding, no mask (the transposed load); "masked": a mask as well; "strided": transposed views (dim=0).
    Half the scores outside the lists are NaN."""
    scores = torch.randn(B, K) * 2
    groups = torch.empty(B, K, dtype=torch.long)
    kinds = []
    for b in range(B):
        kind = TILE_KINDS[(b // TILE_LANES + b % TILE_LANES) % len(TILE_KINDS)]
        kinds.append(kind)
        span = int(torch.randint(2, min(K, TILE_LEVELS) + 1, ()))
        lo = int(torch.randint(0, 4, ()))
        row = lo + torch.randint(0, span, (K,))
        row[:2] = torch.tensor([lo, lo + span - 1])[torch.randperm(2)]     # the span is exactly `span`
        if kind == "all_tied":
            row[:] = lo
        elif kind == "wide":                                               # span > TILE_LEVELS: scalar path
            row[0] = lo + TILE_LEVELS + int(torch.randint(0, 2 * K, ()))
        elif kind == "sorted":
            row = row.sort().values
        elif kind == "worst_level_neg_inf":                                # strength 0: scalar path
            scores[b][row == row.max()] = -math.inf
        elif kind == "mostly_padding":
            row[2:] = -1
        elif kind == "empty":
            row[:] = -1
        elif kind == "huge":                                               # ±1e4: the risk-set rescaling
            scores[b] = (scores[b] * 5e3).clamp(-1e4, 1e4)
        groups[b] = row
    mask = None
    if layout != "dense":
        mask = torch.rand(B, K) > 0.2
        mask[:, :2] = True
        groups = torch.where((torch.rand(B, K) < 0.15) & (torch.arange(K) >= 2), -1, groups)
    elif K > 2:
        groups[:, 2] = torch.where(torch.rand(B) < 0.5, -1, groups[:, 2])  # padding in half the lists
    outside = (groups < 0) if mask is None else (groups < 0) | ~mask
    scores[outside & (torch.rand(B, K) < 0.5)] = math.nan                 # never read as a score
    return scores, groups, mask, kinds


def nll_and_grad(scores, groups, mask, *, layout, grad_nll, **kw):
    """Kernel (through the public op) in `layout`: the NLL and its gradient for grad_nll."""
    if layout == "strided":
        base = torch.empty(scores.shape[1], 3, scores.shape[0], dtype=scores.dtype)
        base[:, 1, :] = scores.t()
        x = base[:, 1, :].requires_grad_()                                  # (K, B), not contiguous
        nll = ops.plackett_luce_nll(x, groups=groups.t(), mask=None if mask is None else mask.t(), dim=0, **kw)
        (nll * grad_nll.to(nll.dtype)).sum().backward()
        return nll, x.grad.t()
    x = scores.clone().requires_grad_()
    nll = ops.plackett_luce_nll(x, groups=groups, mask=mask, **kw)
    (nll * grad_nll.to(nll.dtype)).sum().backward()
    return nll, x.grad


@pytest.mark.parametrize("layout", ["dense", "masked", "strided"])
@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("K", [3, 8, 21, 64])
@pytest.mark.parametrize("top_k", [None, 2])
def test_level_tile_matches_reference(seed, layout, ties, K, top_k):
    B = TILE_LANES * len(TILE_KINDS) + 5
    scores, groups, mask, kinds = tile_case(B, K, layout=layout)
    grad_nll = torch.rand(B, dtype=torch.float64) + 0.5
    got, grad = nll_and_grad(scores, groups, mask, layout=layout, grad_nll=grad_nll, ties=ties, top_k=top_k)
    x64 = scores.double().requires_grad_()
    want = reference.plackett_luce_nll(x64, groups=groups, mask=mask, ties=ties, top_k=top_k)
    (want * grad_nll).sum().backward()
    assert torch.isfinite(want).all() and want[[k == "empty" for k in kinds]].eq(0).all()
    huge = torch.tensor([k == "huge" for k in kinds])
    torch.testing.assert_close(got.double()[~huge], want[~huge], **TOL[torch.float32])
    torch.testing.assert_close(grad.double()[~huge], x64.grad[~huge], **TOL[torch.float32])
    # ±1e4: NLLs of ~1e4·K; the fp32 inputs are exact, the tolerance is fp32's on sums of that size
    torch.testing.assert_close(got.double()[huge], want[huge], rtol=1e-6, atol=1e-2)
    torch.testing.assert_close(grad.double()[huge], x64.grad[huge], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_level_tile_low_precision(seed, ties, dtype):
    B, K = TILE_LANES * 2 + 7, 13
    scores, groups, mask, _ = tile_case(B, K, layout="masked")
    scores = scores.clamp(-60, 60).to(dtype)                               # "huge" lanes within fp16 range
    grad_tol = TOL[dtype]
    grad = assert_matches_reference(scores, dict(rtol=1e-5, atol=1e-4), grad_tol, groups=groups, mask=mask,
                                    ties=ties, top_k=3)
    assert grad.dtype == dtype


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_level_tile_efron_large_tie_groups(seed, ties):
    """Tile lanes with ~100 tied items per level: Efron's running products flush below 2^-64 (ρ = 1 in the
    worst group), lane by lane."""
    B, K = TILE_LANES + 3, 300
    groups = torch.randint(0, 3, (B, K))
    groups[:, :3] = torch.arange(3)
    groups[::2, 5:40] = -1                                                 # different tie sizes per lane
    scores = torch.randn(B, K)
    assert_matches_reference(scores, TOL[torch.float32], groups=groups, ties=ties)
    assert_matches_reference(scores, TOL[torch.float32], groups=groups, ties=ties, top_k=2)


@pytest.mark.parametrize("lane", range(TILE_LANES))
def test_level_tile_bad_list_in_every_lane(lane):
    """Data checks off (the CUDA default): a NaN/+inf score, a level below -1 or a -inf item of a scored level
    in lane `lane` of a full block changes only that list (NaN, NaN, NaN, +inf); the other lanes keep their
    values."""
    B, K = 2 * TILE_LANES, 11
    scores = torch.randn(B, K)
    groups = torch.randint(0, 4, (B, K))
    bad = [lane, TILE_LANES + lane]
    for ties in (0, 1):
        clean = torch.ops.prefrank.plackett_luce_nll(scores, None, groups, None, 2, ties, False)
        clean_grad = torch.ops.prefrank.plackett_luce_nll_backward(torch.ones(B), scores, None, groups, None, 2,
                                                                   ties, False)
        for spoil, expect in (("nan", math.nan), ("inf", math.nan), ("group", math.nan), ("neg_inf", math.inf)):
            s, g = scores.clone(), groups.clone()
            for b in bad:
                if spoil == "nan":
                    s[b, 3] = math.nan
                elif spoil == "inf":
                    s[b, 3] = math.inf
                elif spoil == "group":
                    g[b, 3] = -2
                else:
                    g[b, :2] = torch.tensor([0, 1])                        # level 0 is scored (top_k = 2)
                    s[b, 0] = -math.inf
            nll = torch.ops.prefrank.plackett_luce_nll(s, None, g, None, 2, ties, False)
            keep = torch.ones(B, dtype=torch.bool)
            keep[bad] = False
            torch.testing.assert_close(nll[keep], clean[keep], rtol=0, atol=0)
            if math.isnan(expect):
                assert nll[bad].isnan().all()
                grad = torch.ops.prefrank.plackett_luce_nll_backward(torch.ones(B), s, None, g, None, 2, ties,
                                                                     False)
                assert grad[bad].isnan().all()
                torch.testing.assert_close(grad[keep], clean_grad[keep], rtol=0, atol=0)
            else:
                assert nll[bad].eq(math.inf).all()
