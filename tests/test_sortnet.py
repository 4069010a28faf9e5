"""Differentiable sorting networks: schedules, diffsort parity, kernels vs reference, rank losses, errors."""

import diffsort
import pytest
import torch

from prefrank import networks, ops, reference
from prefrank.backend import use_backend
from prefrank.sortnet import RELAXATIONS

NETWORKS = networks.NETWORKS
PARITY_SIZES = (1, 2, 3, 5, 8, 13, 16, 32, 64)
STEEPNESS = (1.0, 10.0, 50.0)


# ---------------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------------

def _diffsort_layers(network, n):
    if network == "bitonic" and n == 1:  # diffsort's bitonic network of one wire has no layers
        return []
    return diffsort.odd_even_network(n) if network == "odd_even" else diffsort.bitonic_network(n)


@pytest.mark.parametrize("network", NETWORKS)
def test_schedule_matches_diffsort(network):
    for n in range(1, 41):
        layers = _diffsort_layers(network, n)
        assert networks.num_layers(network, n) == len(layers)
        ours = networks.comparators(network, n)
        for layer, (split_a, split_b, combine_min, combine_max) in enumerate(layers):
            theirs, covered = [], set()
            for c in range(split_a.shape[0]):
                a, b = split_a[c].argmax(), split_b[c].argmax()
                u, v = combine_min[:, c].argmax(), combine_max[:, c].argmax()
                covered |= {int(u), int(v)}
                if a == b:  # diffsort's 0.5/0.5 identity map = a pass-through wire
                    assert u == v == a
                    continue
                assert {a, b} == {u, v}
                theirs.append((int(u), int(v)))
            assert sorted(theirs) == sorted(ours[layer]), (n, layer)
            assert covered == set(range(n))


def test_tables_are_cached_and_read_only():
    partner, receives_min = networks.tables("bitonic", 13)
    assert networks.tables("bitonic", 13)[0] is partner
    assert partner.shape == receives_min.shape == (networks.num_layers("bitonic", 13), 13)
    with pytest.raises(ValueError):
        partner[0, 0] = 1
    # every layer is an involution: partners pair up
    for row in partner:
        assert (row[row] == torch.arange(13).numpy()).all()


# ---------------------------------------------------------------------------------------------------------
# diffsort parity
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def one_thread():
    """diffsort's many tiny matmuls slow down by 100x when 2 threads fight over a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _fp32_noise(sorter, x):
    """(values, P) fp32 noise level of diffsort's network on x: its own fp32-vs-fp64 error, maxed over x and 4
    perturbations of x by a few ulps. A steep network on many wires is ill-conditioned: one ulp of α in a
    saturated comparator moves P by ~1e-5, and which ulp comes out differs between any two fp32 codes."""
    noise_values = noise_P = 0.0
    for k in range(5):
        xk = x if k == 0 else (x.double() * (1 + (k - 2.5) * 2**-22)).float()
        values64, P64 = sorter(xk.double())
        values, P = sorter(xk)
        noise_values = max(noise_values, (values.double() - values64).abs().max().item())
        noise_P = max(noise_P, (P.double() - P64).abs().max().item())
    return noise_values, noise_P


def _assert_within(actual, expected64, atol, where):
    torch.testing.assert_close(actual.double(), expected64, atol=atol, rtol=1e-5, msg=where)


@pytest.mark.parametrize("relaxation", RELAXATIONS)
@pytest.mark.parametrize("network", NETWORKS)
def test_diffsort_parity(network, relaxation, seed, one_thread):
    """Same algorithm as diffsort: equal to rounding in float64. In float32 both implementations carry the
    problem's own rounding error (steep relaxations over n layers amplify it to ~5e-5 at n=64, s=50), so the
    float32 result must lie within 1e-5 + 4× diffsort's own fp32 noise level (:func:`_fp32_noise`) of the
    float64 result. Over 400 seeds of the worst case (gaussian, n ≥ 32) the largest excess was 2.1× that
    noise. Checked in two steps with the same outcome: 2× the noise of x alone is below 4× the max over
    perturbations, so only inputs that fail the cheap bound pay for the perturbed runs."""
    for n in PARITY_SIZES:
        x = torch.randn(4, n)
        sorter = diffsort.DiffSortNet(network, n, distribution=relaxation) if n > 1 else None
        for steepness in STEEPNESS:
            where = f"n={n} steepness={steepness}"
            values64, P64 = ops.soft_sort(x.double(), network=network, relaxation=relaxation, steepness=steepness)
            values, P = ops.soft_sort(x, network=network, relaxation=relaxation, steepness=steepness)
            if sorter is None:  # diffsort cannot build a network of one wire: the identity
                torch.testing.assert_close(values, x, msg=where)
                torch.testing.assert_close(P, torch.ones(4, 1, 1), msg=where)
                continue
            sorter.steepness = steepness
            expected_values64, expected_P64 = sorter(x.double())
            torch.testing.assert_close(values64, expected_values64, atol=1e-12, rtol=1e-12, msg=where)
            torch.testing.assert_close(P64, expected_P64, atol=1e-12, rtol=1e-12, msg=where)
            expected_values, expected_P = sorter(x)
            own_values = (expected_values.double() - expected_values64).abs().max().item()
            own_P = (expected_P.double() - expected_P64).abs().max().item()
            try:
                _assert_within(values, expected_values64, 1e-5 + 2 * own_values, where)
                _assert_within(P, expected_P64, 1e-5 + 2 * own_P, where)
            except AssertionError:
                noise_values, noise_P = _fp32_noise(sorter, x)
                _assert_within(values, expected_values64, 1e-5 + 4 * noise_values, where)
                _assert_within(P, expected_P64, 1e-5 + 4 * noise_P, where)


# ---------------------------------------------------------------------------------------------------------
# kernels vs reference
# ---------------------------------------------------------------------------------------------------------

def _soft_sort_pair(backend_name, x, **kw):
    """(kernel, reference) values, P and ∂/∂x of a random linear function of both outputs."""
    results = []
    g_values = g_perm = None
    for name in (backend_name, "reference"):
        leaf = x.detach().clone().requires_grad_()
        with use_backend(name):
            values, P = ops.soft_sort(leaf, **kw)
        if g_values is None:
            g_values, g_perm = torch.randn_like(values), torch.randn_like(P)
        ((values * g_values).sum() + (P * g_perm).sum()).backward()
        results.append((values.detach(), P.detach(), leaf.grad))
    return results


def _assert_soft_sort_matches(backend_name, x, atol=1e-9, rtol=1e-7, **kw):
    (values, P, grad), (values0, P0, grad0) = _soft_sort_pair(backend_name, x, **kw)
    assert values.dtype == values0.dtype and P.dtype == P0.dtype
    torch.testing.assert_close(values, values0, atol=atol, rtol=rtol)
    torch.testing.assert_close(P, P0, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad, grad0, atol=atol, rtol=rtol)


@pytest.mark.parametrize("relaxation", RELAXATIONS)
@pytest.mark.parametrize("network", NETWORKS)
def test_cpu_kernel_matches_reference(network, relaxation, seed):
    for n in (1, 2, 7, 16):
        _assert_soft_sort_matches("auto", torch.randn(3, n, dtype=torch.float64), network=network,
                                  relaxation=relaxation, steepness=4.0)
    _assert_soft_sort_matches("auto", torch.randn(3, 11), atol=1e-5, rtol=1e-5, network=network,
                              relaxation=relaxation, steepness=4.0)


@pytest.mark.parametrize("relaxation", RELAXATIONS)
def test_triton_kernels_match_reference(relaxation, seed):
    network = NETWORKS[RELAXATIONS.index(relaxation) % 2]
    _assert_soft_sort_matches("triton", torch.randn(2, 5, dtype=torch.float64), network=network,
                              relaxation=relaxation, steepness=4.0)


@pytest.mark.parametrize("network", NETWORKS)
def test_triton_kernels_match_reference_sizes(network, seed):
    for n in (1, 2, 11):  # 11: bitonic on 16 wires with 5 dropped; several checkpoints in the backward
        _assert_soft_sort_matches("triton", torch.randn(2, n, dtype=torch.float64), network=network,
                                  relaxation="cauchy", steepness=2.0)
    _assert_soft_sort_matches("triton", torch.randn(1, 6), atol=1e-5, rtol=1e-5, network=network)


def test_triton_writes_every_output_element(monkeypatch, seed):
    """Launcher buffers come from torch.empty/empty_like: poison them so an unwritten element shows as NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    _assert_soft_sort_matches("triton", torch.randn(2, 7, dtype=torch.float64), network="bitonic")
    scores = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    groups = torch.tensor([[0, 1, -1, 1, 2, 0], [-1, 0, 0, 1, 1, -1]])
    with use_backend("triton"):
        loss = ops.sortnet_rank_loss(scores, groups, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(scores.grad).all()
    torch.testing.assert_close(loss, reference.sortnet_rank_loss(scores, groups, reduction="none"))


@pytest.mark.parametrize("backend_name", ["auto", "triton"])
def test_batch_shapes_dim_and_descending(backend_name, seed):
    for shape in [(), (3,), (2, 5) if backend_name == "auto" else (2, 2)]:
        x = torch.randn(*shape, 5, dtype=torch.float64)
        _assert_soft_sort_matches(backend_name, x, network="bitonic", steepness=3.0)
    x = torch.randn(2, 5, 2, dtype=torch.float64)
    _assert_soft_sort_matches(backend_name, x, dim=1, descending=True, relaxation="optimal", steepness=3.0)
    with use_backend(backend_name):
        values, P = ops.soft_sort(x, dim=1, descending=True, steepness=3.0)
    assert values.shape == x.shape and P.shape == (2, 2, 5, 5)
    # descending sorts −x: the same P, values negated
    with use_backend(backend_name):
        asc_values, asc_P = ops.soft_sort(-x, dim=1, steepness=3.0)
    torch.testing.assert_close(values, -asc_values)
    torch.testing.assert_close(P, asc_P)
    torch.testing.assert_close(values, torch.einsum("bic,bcir->brc", x, P))


@pytest.mark.parametrize("backend_name", ["auto", "triton"])
def test_gradcheck_float64(backend_name):
    torch.manual_seed(0)
    x = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(1, 4, 4, dtype=torch.float64)
    combos = [(net, rel) for net in NETWORKS for rel in RELAXATIONS]
    if backend_name == "triton":  # the interpreter is slow: two combinations
        combos = [("bitonic", "gaussian"), ("odd_even", "logistic_phi")]

    def values_and_weighted_perm(t, network, relaxation):  # n + 1 outputs: one backward pass each
        values, P = ops.soft_sort(t, network=network, relaxation=relaxation, steepness=2.0)
        return values, (P * weights).sum()

    with use_backend(backend_name):
        for network, relaxation in combos:
            assert torch.autograd.gradcheck(values_and_weighted_perm, (x, network, relaxation))


def test_return_permutation_false_and_low_precision(seed):
    x = torch.randn(4, 9)
    values, P = ops.soft_sort(x)
    values_only, none = ops.soft_sort(x, return_permutation=False)
    assert none is None
    torch.testing.assert_close(values_only, values)
    for dtype in (torch.bfloat16, torch.float16):
        low = x.to(dtype)
        v, p = ops.soft_sort(low)
        assert v.dtype == p.dtype == torch.float32
        v_ref, p_ref = reference.soft_sort(low.float())
        torch.testing.assert_close(v, v_ref)
        torch.testing.assert_close(p, p_ref)
    v64, p64 = ops.soft_sort(x.double())
    assert v64.dtype == p64.dtype == torch.float64


# ---------------------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("network", NETWORKS)
def test_permutation_is_doubly_stochastic(network, seed):
    for relaxation in RELAXATIONS:
        _, P = ops.soft_sort(torch.randn(5, 13, dtype=torch.float64), network=network, relaxation=relaxation,
                             steepness=1.5)
        assert (P >= 0).all()
        ones = torch.ones(5, 13, dtype=torch.float64)
        torch.testing.assert_close(P.sum(-1), ones)
        torch.testing.assert_close(P.sum(-2), ones)


@pytest.mark.parametrize("network", NETWORKS)
def test_large_steepness_recovers_the_sort(network, seed):
    n = 11
    x = torch.randperm(n).to(torch.float64).reshape(1, n) * 0.5 + torch.rand(1, n) * 0.1
    hard = torch.nn.functional.one_hot(torch.argsort(x[0]), n).T.to(torch.float64)  # hard[i, r]
    for relaxation in RELAXATIONS:
        values, P = ops.soft_sort(x, network=network, relaxation=relaxation, steepness=1e6)
        torch.testing.assert_close(values[0], torch.sort(x[0]).values, atol=1e-4, rtol=0)
        torch.testing.assert_close(P[0], hard, atol=1e-4, rtol=0)
        # a blurred sort (small steepness) is far from it: the check above can fail
        _, soft = ops.soft_sort(x, network=network, relaxation=relaxation, steepness=0.5)
        assert (soft[0] - hard).abs().max() > 0.1


@pytest.mark.parametrize("network", NETWORKS)
def test_monotonic_relaxations_have_nonnegative_jacobian(network, seed):
    x = torch.randn(8, dtype=torch.float64)
    for relaxation in ("cauchy", "reciprocal", "optimal"):
        jac = torch.autograd.functional.jacobian(
            lambda t: ops.soft_sort(t, network=network, relaxation=relaxation, steepness=5.0)[0], x)  # noqa: B023
        assert (jac >= -1e-12).all(), relaxation
    # logistic is not monotonic (ICLR'22): a wrong-sign gradient appears for well-separated pairs
    pair = torch.tensor([0.0, 1.0], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(
        lambda t: ops.soft_sort(t, network=network, relaxation="logistic", steepness=2.0)[0], pair)
    assert (jac < 0).any()


# ---------------------------------------------------------------------------------------------------------
# rank loss
# ---------------------------------------------------------------------------------------------------------

def _loss_from_soft_sort(scores, groups, target, **kw):
    """Independent oracle: per list, soft_sort of the valid items (best first), loss from the dense P."""
    out = []
    n = scores.shape[-1]
    for s_row, g_row in zip(scores.reshape(-1, n), groups.reshape(-1, n), strict=True):
        keep = g_row >= 0
        s, g = s_row[keep], g_row[keep]
        m = len(s)
        if m == 0:
            out.append(s_row.sum() * 0)
            continue
        with use_backend("reference"):
            _, P = ops.soft_sort(-s, **kw)
        levels = sorted(set(g.tolist()))
        sizes = [int((g == lv).sum()) for lv in levels]
        starts = [sum(sizes[:k]) for k in range(len(levels))]
        if target == "block":
            terms = []
            for i in range(m):
                k = levels.index(int(g[i]))
                terms.append(-torch.log(P[i, starts[k]:starts[k] + sizes[k]].sum()))
            out.append(torch.stack(terms).mean())
        else:
            Q = torch.zeros(m, m, dtype=P.dtype)
            for i in range(m):
                Q[i, starts[levels.index(int(g[i]))]] = 1
            out.append(torch.nn.functional.binary_cross_entropy(P, Q))
    return torch.stack(out).reshape(scores.shape[:-1])


def _ragged_groups(target):
    if target == "block":  # ties, padding anywhere, an all-padding list, singletons, gaps in the levels
        groups = torch.tensor([[0, 0, 1, 1, 2, 2, -1], [1, -1, 0, 2, 0, 1, 1], [-1, -1, -1, -1, -1, -1, -1],
                               [0, 1, 2, 3, 4, 5, 6], [3, 3, 3, -1, 0, 0, 7], [0, -1, -1, -1, -1, -1, -1]])
    else:
        groups = torch.stack([torch.randperm(7) for _ in range(6)])
        groups[1, 2] = -1
        groups[4, :3] = -1
        groups[5] = -1
    return groups.reshape(2, 3, 7)


@pytest.mark.parametrize("target", ["block", "permutation"])
@pytest.mark.parametrize("backend_name", ["reference", "auto", "triton"])
def test_rank_loss_matches_soft_sort_oracle(backend_name, target, seed):
    scores = torch.randn(2, 3, 7, dtype=torch.float64)
    groups = _ragged_groups(target)
    network = "bitonic" if target == "block" else "odd_even"
    kw = dict(network=network, relaxation="cauchy", steepness=3.0)
    leaf = scores.clone().requires_grad_()
    expected = _loss_from_soft_sort(leaf, groups, target, **kw)
    weights = torch.rand(2, 3, dtype=torch.float64)
    (expected * weights).sum().backward()
    expected_grad = leaf.grad
    leaf = scores.clone().requires_grad_()
    with use_backend(backend_name):
        got = ops.sortnet_rank_loss(leaf, groups, target=target, reduction="none", **kw)
    (got * weights).sum().backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(leaf.grad, expected_grad)
    assert (leaf.grad[groups < 0] == 0).all()
    with use_backend(backend_name):
        mean = ops.sortnet_rank_loss(scores, groups, target=target, **kw)
        total = ops.sortnet_rank_loss(scores, groups, target=target, reduction="sum", **kw)
    torch.testing.assert_close(mean, expected.mean())
    torch.testing.assert_close(total, expected.sum())


@pytest.mark.parametrize("backend_name", ["auto", "triton"])
def test_rank_loss_gradcheck_and_dtypes(backend_name):
    torch.manual_seed(1)
    scores = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    with use_backend(backend_name):
        for target, groups in (("block", torch.tensor([[0, 1, 0, -1, 2]])),
                               ("permutation", torch.tensor([[3, 1, 0, -1, 2]]))):
            fn = lambda t: ops.sortnet_rank_loss(t, groups, target=target, relaxation="reciprocal",  # noqa: B023
                                                 steepness=2.0, reduction="none")
            assert torch.autograd.gradcheck(fn, (scores,))
            low = ops.sortnet_rank_loss(scores.detach().to(torch.bfloat16), groups, target=target)
            assert low.dtype == torch.float32


def test_rank_loss_pairwise_matches_soft_sort(seed):
    # two items, groups [0, 1]: block loss = −log P(best item at position 0) = −log α(s·(r0 − r1))
    r = torch.randn(6, 2, dtype=torch.float64)
    loss = ops.sortnet_rank_loss(r, torch.tensor([[0, 1]] * 6), reduction="none", steepness=4.0)
    expected = -torch.log(torch.atan(4.0 * (r[:, 0] - r[:, 1])) / torch.pi + 0.5)
    torch.testing.assert_close(loss, expected)


def test_registered_ops_opcheck(seed):
    x = torch.randn(3, 6, requires_grad=True)
    for with_perm in (True, False):
        torch.library.opcheck(torch.ops.prefrank.sortnet_forward.default, (x, 1, 4, 3.0, 0.25, with_perm))
    from prefrank.sortnet import _compact_lists
    groups = torch.tensor([[0, 0, 1, -1, 2, 2], [1, 0, 1, 0, -1, -1], [-1] * 6])
    y, sizes, lo, hi = _compact_lists(x.detach(), groups, "block")
    torch.library.opcheck(torch.ops.prefrank.sortnet_loss_forward.default,
                          (y.requires_grad_(), sizes, lo, hi, 0, 0, 4, 3.0, 0.25))


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------

def test_bad_input_errors():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="network must be one of.*odd_even.*bitonic"):
        ops.soft_sort(x, network="bubble")
    with pytest.raises(ValueError, match="relaxation must be one of.*logistic.*optimal"):
        ops.soft_sort(x, relaxation="sigmoid")
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="steepness"):
            ops.soft_sort(x, steepness=bad)
    with pytest.raises(ValueError, match="steepness"):
        ops.soft_sort(x, steepness=float("nan"))
    with pytest.raises(ValueError, match="x contains NaN"):
        ops.soft_sort(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        ops.soft_sort(torch.arange(4))
    with pytest.raises(ValueError, match="dim"):
        ops.soft_sort(x, dim=2)
    groups = torch.zeros(3, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="groups must have the shape of scores"):
        ops.sortnet_rank_loss(x, groups[:, :4])
    with pytest.raises(TypeError, match="groups must be an integer tensor"):
        ops.sortnet_rank_loss(x, groups.float())
    with pytest.raises(ValueError, match="scores contains NaN"):
        ops.sortnet_rank_loss(torch.tensor([[0.0, float("nan")]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="target must be one of"):
        ops.sortnet_rank_loss(x, groups, target="ndcg")
    with pytest.raises(ValueError, match="distinct"):
        ops.sortnet_rank_loss(x, groups, target="permutation")
    with pytest.raises(ValueError, match="groups must hold levels"):
        ops.sortnet_rank_loss(x, groups - 2)
    with pytest.raises(ValueError, match="art_lambda"):
        ops.soft_sort(x, art_lambda=-1.0)
    from prefrank.triton_kernels import sortnet as kernels

    from prefrank import sortnet
    assert sortnet.TRITON_MAX_N == kernels.MAX_N == 512
    with use_backend("triton"), pytest.raises(ValueError, match="n=513 items exceeds.*limit of 512"):
        ops.soft_sort(torch.randn(1, 513))
    with use_backend("triton"), pytest.raises(ValueError, match="exceeds"):
        ops.sortnet_rank_loss(torch.randn(1, 513), torch.zeros(1, 513, dtype=torch.int64))
    # NaN in padding is fine: padding never enters the sort
    ops.sortnet_rank_loss(torch.tensor([[0.0, float("nan")]]), torch.tensor([[0, -1]]))


# ---------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA; benchmarks/gpu.sh runs them)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("n", [5, 64, 300, 512])
def test_cuda_triton_matches_reference(n, seed):
    network = "bitonic" if n >= 300 else "odd_even"
    x = torch.randn(4, n, device="cuda", dtype=torch.float64)
    _assert_soft_sort_matches("auto", x, network=network, relaxation="cauchy", steepness=3.0)
    _assert_soft_sort_matches("auto", x.float(), atol=1e-4, rtol=1e-4, network=network, steepness=3.0)
    groups = torch.randint(-1, 4, (4, n), device="cuda")
    scores = x.clone().requires_grad_()
    loss = ops.sortnet_rank_loss(scores, groups, network=network, steepness=3.0, reduction="none")
    loss.sum().backward()
    leaf = x.clone().requires_grad_()
    expected = reference.sortnet_rank_loss(leaf, groups, network=network, steepness=3.0, reduction="none")
    expected.sum().backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(scores.grad, leaf.grad)
