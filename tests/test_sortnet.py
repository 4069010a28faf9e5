"""Differentiable sorting networks: schedules, diffsort parity, kernels vs reference, rank losses, errors."""

import pytest
import torch

import prefrank
from prefrank import _checks, networks, ops, reference, sortnet
from prefrank.backend import use_backend
from prefrank.networks import RELAXATIONS
from tests.compile_checks import assert_compiles, assert_no_host_sync_on_cuda

NETWORKS = networks.NETWORKS
PARITY_SIZES = (1, 2, 3, 5, 8, 13, 16, 32, 64)
STEEPNESS = (1.0, 10.0, 50.0)

try:
    import diffsort
except ImportError:  # the GPU box has none: its parity tests skip, this module's kernel tests still run there
    diffsort = None
needs_diffsort = pytest.mark.skipif(diffsort is None, reason="diffsort is not installed (an outside oracle)")


# ---------------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------------

def _diffsort_layers(network, n):
    if network == "bitonic" and n == 1:  # diffsort's bitonic network of one wire has no layers
        return []
    return diffsort.odd_even_network(n) if network == "odd_even" else diffsort.bitonic_network(n)


@needs_diffsort
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


@needs_diffsort
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
    _assert_fp32_within_reference_noise(torch.randn(3, 11), network=network, relaxation=relaxation,
                                        steepness=4.0)


@pytest.mark.parametrize("network", NETWORKS)
def test_cpu_kernel_every_size_matches_reference(network, seed):
    """The C++ kernels run each comparator's row loops only over the rows of P that can be nonzero on its wires
    (a data-independent hull per network and size): a hull too small for any comparator shows here as a wrong P
    or gradient. Every n in 1..40 (each odd-even band, bitonic padding up to 64 wires), 128 and 129 (the
    benchmark's size and one past it)."""
    for n in list(range(1, 41)) + [128, 129]:
        _assert_soft_sort_matches("auto", torch.randn(2, n, dtype=torch.float64), network=network,
                                  relaxation="cauchy", steepness=4.0)


def test_cpu_kernel_backward_in_row_blocks(seed):
    """n = 200 odd-even: the backward re-runs P in several row blocks (a comparator's hull cut at block edges; the
    reference is too slow here). Its gradient must be the derivative of the kernel's own forward (verified
    against the reference above) along a random direction; the fused rank loss (64-row blocks in its forward)
    must equal the loss of the kernel's P."""
    n, eps = 200, 1e-6
    x = torch.randn(1, n, dtype=torch.float64)
    g_values, g_perm, direction = torch.randn(1, n, dtype=torch.float64), torch.randn(1, n, n, dtype=torch.float64), \
        torch.randn(1, n, dtype=torch.float64)

    def objective(t):
        values, P = ops.soft_sort(t, network="odd_even", steepness=2.0)
        return (values * g_values).sum() + (P * g_perm).sum()

    leaf = x.clone().requires_grad_()
    objective(leaf).backward()
    with torch.no_grad():
        numeric = (objective(x + eps * direction) - objective(x - eps * direction)) / (2 * eps)
    torch.testing.assert_close((leaf.grad * direction).sum(), numeric, rtol=1e-6, atol=1e-6)

    groups = torch.randint(0, 4, (1, n))
    leaf = x.clone().requires_grad_()
    loss = ops.sortnet_rank_loss(leaf, groups, network="odd_even", steepness=2.0)
    loss.backward()
    with torch.no_grad():
        _, P = ops.soft_sort(-x, network="odd_even", steepness=2.0)
        levels = groups[0]
        before = (levels[None, :] < levels[:, None]).sum(-1)
        upto = (levels[None, :] <= levels[:, None]).sum(-1)
        r = torch.arange(n)
        in_block = (r >= before[:, None]) & (r < upto[:, None])
        expected = -torch.log((P[0] * in_block).sum(-1)).mean()
        numeric = (ops.sortnet_rank_loss(x + eps * direction, groups, network="odd_even", steepness=2.0)
                   - ops.sortnet_rank_loss(x - eps * direction, groups, network="odd_even", steepness=2.0)) / (2 * eps)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close((leaf.grad * direction).sum(), numeric, rtol=1e-6, atol=1e-6)


def _assert_fp32_within_reference_noise(x, **kw):
    """fp32 kernel vs the float64 truth: within 1e-5 + twice the fp32 reference's own error, element by
    element (an ill-conditioned comparator gradient, e.g. logistic_phi's, carries fp32 rounding above 1e-5)."""
    (values, P, grad), (values_ref, P_ref, grad_ref) = _soft_sort_pair("auto", x, **kw)
    _, (values64, P64, grad64) = _soft_sort_pair("auto", x.double(), **kw)
    for got, ref32, truth in ((values, values_ref, values64), (P, P_ref, P64), (grad, grad_ref, grad64)):
        assert got.dtype == torch.float32 and not got.isnan().any()
        bound = 1e-5 + 1e-5 * truth.abs() + 2 * (ref32.double() - truth).abs()
        assert ((got.double() - truth).abs() <= bound).all(), (got, truth)


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


def _loss_kernel_inputs(scores, groups, target):
    y, sizes, lo, hi = sortnet._compact_lists(scores, groups, target)
    return y, sizes, lo, hi


@pytest.mark.parametrize("use_triton", [False, True])
def test_custom_ops_opcheck(use_triton, seed):
    """Every custom op (forward and backward, soft sort and loss) passes opcheck on its cpu kernel (C++, or
    the Triton launcher in the interpreter) and its fake kernel; the same fake serves the cuda kernel."""
    dtype = torch.float64 if use_triton else torch.float32
    x = torch.randn(3, 6, dtype=dtype)
    combos = [(1, 4, True), (0, 2, False)] if use_triton else [(net, rel, perm) for net in (0, 1)
                                                              for rel in range(6) for perm in (True, False)]
    for network, relaxation, with_perm in combos:
        args = (x.requires_grad_(), network, relaxation, 3.0, 0.25, with_perm, use_triton)
        torch.library.opcheck(sortnet.sortnet_forward, args)
        _, perm, alpha = sortnet.sortnet_forward(*args)
        grad_perm = torch.randn_like(perm) if with_perm else None
        # the backward ops are not differentiable (a clear error, tested below): inputs without grad
        torch.library.opcheck(sortnet.sortnet_backward, (torch.randn(3, 6, dtype=dtype), grad_perm, x.detach(),
                                                         alpha, network, relaxation, 3.0, 0.25, use_triton))
    groups = {"block": torch.tensor([[0, 0, 1, -1, 2, 2], [1, 0, 1, 0, -1, -1], [-1] * 6]),
              "permutation": torch.tensor([[0, 3, 1, -1, 2, 4], [1, 0, 5, 3, -1, 2], [-1] * 6])}
    for target, target_code in (("block", 0), ("permutation", 1)):
        y, sizes, lo, hi = _loss_kernel_inputs(x.detach(), groups[target], target)
        network = 1 - target_code
        args = (y.requires_grad_(), sizes, lo, hi, target_code, network, 4, 3.0, 0.25, use_triton)
        torch.library.opcheck(sortnet.sortnet_loss_forward, args)
        _, alpha = sortnet.sortnet_loss_forward(*args)
        torch.library.opcheck(sortnet.sortnet_loss_backward,
                              (torch.rand(3, dtype=dtype), y.detach(), sizes, lo, hi, alpha, target_code, network,
                               4, 3.0, 0.25, use_triton))


def test_cuda_kernels_are_registered():
    """torch.ops.prefrank.sortnet_* have a CUDA kernel (Triton) and a fake kernel, not just CPU; the C++
    kernels live in the private prefrank_C namespace."""
    for name in ("sortnet_forward", "sortnet_backward", "sortnet_loss_forward", "sortnet_loss_backward"):
        op = getattr(torch.ops.prefrank, name).default
        for key in ("CPU", "CUDA", "Meta"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), (name, key)
        assert hasattr(torch.ops.prefrank_C, name)


@pytest.mark.parametrize("backend_name", ["auto", "triton"])
def test_double_backward_raises_clearly(backend_name):
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    values, P = ops.soft_sort(x, impl=backend_name)
    (grad,) = torch.autograd.grad((values ** 2).sum() + P[..., 0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward of prefrank\.soft_sort is not implemented"):
        grad.sum().backward()
    groups = torch.tensor([[0, 1, 1, -1, 2]] * 2)
    loss = ops.sortnet_rank_loss(x, groups, impl=backend_name)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward of prefrank\.sortnet_rank_loss is not implemented"):
        grad.sum().backward()


# ---------------------------------------------------------------------------------------------------------
# torch.compile and host synchronisation (issue #11)
# ---------------------------------------------------------------------------------------------------------

# Options that change what is traced (network → layer count in the fake kernels, descending, dim, P or not,
# target, reduction) plus every relaxation; the relaxation and the float options are constants of one op.
SOFT_SORT_OPTIONS = [
    dict(),
    dict(network="bitonic", relaxation="logistic_phi", descending=True, dim=0, return_permutation=False),
    dict(relaxation="gaussian", steepness=3.0, descending=True),
    dict(network="bitonic", relaxation="optimal", art_lambda=0.5),
    dict(relaxation="reciprocal", dim=0),
    dict(network="bitonic", relaxation="logistic", return_permutation=False),
]
LOSS_OPTIONS = [
    dict(),
    dict(target="permutation", network="bitonic", relaxation="logistic", reduction="none"),
    dict(relaxation="gaussian", reduction="sum", steepness=3.0),
    dict(target="permutation", relaxation="optimal", reduction="mean"),
    dict(network="bitonic", relaxation="reciprocal", reduction="none"),
    dict(relaxation="logistic_phi", art_lambda=0.5, reduction="sum"),
]


def _loss_case(target, shape=(3, 6)):
    scores = torch.randn(*shape)
    if target == "permutation":
        groups = torch.stack([torch.randperm(shape[-1]) for _ in range(shape[0])])
        groups[0, 1] = -1
    else:
        groups = torch.randint(0, 3, shape)
        groups[0, :2] = -1
    return scores, groups


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_fullgraph_compile(compile_backend, dynamic, seed):
    """Both ops and their options trace with fullgraph=True, forward and backward, static and dynamic shapes;
    results and gradients equal eager. Compiles are slow on CPU (minutes on the shared machine): each
    backend × shape mode sees two option sets per op; the four combinations together cover every option
    set, and each backend sees both networks, P on and off, both targets and every reduction."""
    turn = 2 * (compile_backend == "inductor") + dynamic
    soft_options = [SOFT_SORT_OPTIONS[(2 * turn) % 6], SOFT_SORT_OPTIONS[(2 * turn + 1) % 6]]
    loss_options = [LOSS_OPTIONS[(2 * turn + 1) % 6], LOSS_OPTIONS[(2 * turn + 2) % 6]]
    for options in soft_options:
        assert_compiles(ops.soft_sort, [torch.randn(4, 5)], backend=compile_backend, dynamic=dynamic, **options)
    for options in loss_options:
        scores, groups = _loss_case(options.get("target", "block"))
        assert_compiles(ops.sortnet_rank_loss, [scores, groups], backend=compile_backend, dynamic=dynamic,
                        **options)


def test_no_host_sync_on_cuda(seed):
    """Forward on CUDA-device fake tensors, debug off: no data-dependent read-back (a GPU sync) anywhere."""
    for options in SOFT_SORT_OPTIONS:
        values, P = assert_no_host_sync_on_cuda(ops.soft_sort, [torch.randn(4, 5)], **options)
        assert values.device.type == "cuda" and values.shape == (4, 5)
        assert P is None or P.shape == ((5, 4, 4) if options.get("dim") == 0 else (4, 5, 5))
    for options in LOSS_OPTIONS:
        scores, groups = _loss_case(options.get("target", "block"))
        loss = assert_no_host_sync_on_cuda(ops.sortnet_rank_loss, [scores, groups], **options)
        assert loss.device.type == "cuda"
        assert loss.shape == ((3,) if options.get("reduction") == "none" else ())


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
    assert sortnet.TRITON_MAX_N == kernels.MAX_N == 512
    with use_backend("triton"), pytest.raises(ValueError, match="n=513 items exceeds.*limit of 512"):
        ops.soft_sort(torch.randn(1, 513))
    with use_backend("triton"), pytest.raises(ValueError, match="exceeds"):
        ops.sortnet_rank_loss(torch.randn(1, 513), torch.zeros(1, 513, dtype=torch.int64))
    # NaN in padding is fine: padding never enters the sort
    ops.sortnet_rank_loss(torch.tensor([[0.0, float("nan")]]), torch.tensor([[0, -1]]))


# ---------------------------------------------------------------------------------------------------------
# empty inputs and non-finite values (issue #13): one documented behaviour on every path
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["auto", "triton", "reference"])
def test_rank_loss_empty_batch(impl):
    """B = 0: an empty result ("none"), 0 ("sum"), a ValueError naming scores ("mean") — main raised a
    RuntimeError from inside the kernels/torch.stack for every reduction."""
    for shape in [(0, 4), (2, 0, 4)]:
        scores = torch.randn(shape, requires_grad=True)
        groups = torch.zeros(shape, dtype=torch.int64)
        loss = ops.sortnet_rank_loss(scores, groups, reduction="none", impl=impl)
        assert loss.shape == shape[:-1] and loss.dtype == torch.float32
        total = ops.sortnet_rank_loss(scores, groups, reduction="sum", impl=impl)
        assert total.item() == 0.0
        total.backward()
        assert scores.grad.shape == shape
        with pytest.raises(ValueError, match=r"scores holds no lists.*reduction='mean'"):
            ops.sortnet_rank_loss(scores, groups, impl=impl)


@pytest.mark.parametrize("impl", ["auto", "triton", "reference"])
def test_rank_loss_no_items(impl):
    """n = 0: every list is empty, so its loss is 0 like an all-padding list (main: RuntimeError)."""
    scores = torch.randn(3, 0, dtype=torch.float64, requires_grad=True)
    groups = torch.zeros(3, 0, dtype=torch.int64)
    for target in ("block", "permutation"):
        loss = ops.sortnet_rank_loss(scores, groups, target=target, reduction="none", impl=impl)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, torch.zeros(3, dtype=torch.float64))
        assert ops.sortnet_rank_loss(scores, groups, target=target, impl=impl).item() == 0.0
    ops.sortnet_rank_loss(scores, groups, reduction="sum", impl=impl).backward()
    assert scores.grad.shape == (3, 0)


@pytest.mark.parametrize("impl", ["auto", "triton", "reference"])
def test_soft_sort_empty_batch(impl):
    for shape, dim in [((0, 5), -1), ((3, 0, 4), 0), ((2, 3, 0), 1)]:
        x = torch.randn(shape, requires_grad=True)
        values, P = ops.soft_sort(x, dim=dim, impl=impl)
        assert values.shape == shape
        n = shape[dim]
        assert P.shape == tuple(s for i, s in enumerate(shape) if i != dim % len(shape)) + (n, n)
        (values.sum() + P.sum()).backward()
        assert x.grad.shape == shape
    with pytest.raises(ValueError, match="x must have at least one item along dim=1"):
        ops.soft_sort(torch.randn(2, 0), impl=impl)


@pytest.mark.parametrize("impl", ["auto", "triton", "reference"])
def test_nan_in_padding_is_ignored(impl):
    """Padding (groups = -1) never enters the sort: NaN/inf there changes neither the loss nor any gradient."""
    scores = torch.randn(2, 5, dtype=torch.float64)
    groups = torch.tensor([[0, -1, 1, 2, -1], [-1, -1, -1, -1, -1]])
    poisoned = scores.clone()
    nan, inf = float("nan"), float("inf")
    poisoned[groups < 0] = torch.tensor([nan, inf, -inf, nan, 1e300, nan, -inf], dtype=torch.float64)
    clean_leaf, poisoned_leaf = scores.clone().requires_grad_(), poisoned.clone().requires_grad_()
    clean = ops.sortnet_rank_loss(clean_leaf, groups, reduction="none", impl=impl)
    dirty = ops.sortnet_rank_loss(poisoned_leaf, groups, reduction="none", impl=impl)
    torch.testing.assert_close(dirty, clean)
    assert dirty[1].item() == 0.0
    dirty.sum().backward()
    clean.sum().backward()
    torch.testing.assert_close(poisoned_leaf.grad, clean_leaf.grad)
    assert (poisoned_leaf.grad[groups < 0] == 0).all()


@pytest.mark.parametrize("impl", ["auto", "triton", "reference"])
def test_non_finite_scored_items_raise_on_cpu(impl):
    """NaN, +inf and -inf in a scored item: ValueError naming the user's argument, on every impl."""
    groups = torch.tensor([[0, 1, -1]])
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match=r"^scores contains NaN or inf at an item with groups >= 0"):
            ops.sortnet_rank_loss(torch.tensor([[0.0, bad, 1.0]]), groups, impl=impl)
        with pytest.raises(ValueError, match=r"^x contains NaN or inf"):
            ops.soft_sort(torch.tensor([[0.0, bad, 1.0]]), impl=impl)


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_unchecked_path_gives_nan_not_garbage(impl, monkeypatch):
    """What CUDA does outside prefrank.debug(): no value checks (no host sync), so NaN/inf in a scored item,
    levels below -1 and tied permutation levels make THAT list's loss NaN (the others are untouched, nothing
    is read out of bounds); a non-finite x comes out as NaN in its list. Simulated on CPU by switching the
    data checks off."""
    scores = torch.randn(4, 5, dtype=torch.float64)
    groups = torch.tensor([[0, 1, 2, 3, 4]] * 4)
    expected = ops.sortnet_rank_loss(scores, groups, reduction="none", impl=impl)
    monkeypatch.setattr(_checks, "data_checks_enabled", lambda *tensors: False)
    bad_scores, bad_groups = scores.clone(), groups.clone()
    bad_scores[0, 2] = float("nan")
    bad_scores[1, 4] = float("inf")
    bad_groups[2, 0] = -7
    loss = ops.sortnet_rank_loss(bad_scores, bad_groups, reduction="none", impl=impl)
    assert loss[:3].isnan().all()
    torch.testing.assert_close(loss[3], expected[3])
    tied = groups.clone()
    tied[3, 1] = 0
    loss = ops.sortnet_rank_loss(scores, tied, target="permutation", reduction="none", impl=impl)
    assert loss[3].isnan() and not loss[:3].isnan().any()
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(2, 6, dtype=torch.float64)
        x[0, 3] = bad
        values, P = ops.soft_sort(x, impl=impl)
        assert values[0].isnan().any() and P[0].isnan().any()
        torch.testing.assert_close(values[1], ops.soft_sort(x[1:], impl=impl)[0][0])
    with prefrank.debug():  # debug mode checks on every device again
        monkeypatch.undo()
        with pytest.raises(ValueError, match="scores contains NaN"):
            ops.sortnet_rank_loss(bad_scores, groups, impl=impl)


def test_bad_impl_and_errors_name_the_argument():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.soft_sort(x, impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        ops.sortnet_rank_loss(x, torch.zeros(2, 3, dtype=torch.int64), impl=None)
    with pytest.raises(TypeError, match="descending must be a bool"):
        ops.soft_sort(x, descending=1)
    with pytest.raises(ValueError, match="scores must have at least one dimension"):
        ops.sortnet_rank_loss(torch.tensor(1.0), torch.tensor(0))
    with pytest.raises(ValueError, match="groups is on meta but scores is on cpu"):
        ops.sortnet_rank_loss(x, torch.zeros(2, 3, dtype=torch.int64, device="meta"))


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


def test_docstring_examples():
    import doctest

    result = doctest.testmod(sortnet, extraglobs={"torch": torch})
    assert result.attempted >= 5 and result.failed == 0
