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

@pytest.mark.parametrize("relaxation", RELAXATIONS)
@pytest.mark.parametrize("network", NETWORKS)
def test_diffsort_parity(network, relaxation, seed):
    for n in PARITY_SIZES:
        x = torch.randn(4, n)
        for steepness in STEEPNESS:
            values, P = ops.soft_sort(x, network=network, relaxation=relaxation, steepness=steepness)
            if n == 1:
                expected_values, expected_P = x, torch.ones(4, 1, 1)
            else:
                sorter = diffsort.DiffSortNet(network, n, steepness=steepness, distribution=relaxation)
                expected_values, expected_P = sorter(x)
            where = f"n={n} steepness={steepness}"
            torch.testing.assert_close(values, expected_values, atol=2e-5, rtol=1e-5, msg=where)
            torch.testing.assert_close(P, expected_P, atol=2e-5, rtol=1e-5, msg=where)


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


@pytest.mark.parametrize("target", ["block", "permutation"])
def test_rank_loss_reference_matches_soft_sort_oracle(target, seed):
    scores = torch.randn(2, 3, 7, dtype=torch.float64)
    if target == "block":
        groups = torch.tensor([[0, 0, 1, 1, 2, 2, -1], [1, -1, 0, 2, 0, 1, 1], [-1, -1, -1, -1, -1, -1, -1],
                               [0, 1, 2, 3, 4, 5, 6], [3, 3, 3, -1, 0, 0, 7], [0, -1, -1, -1, -1, -1, -1]])
    else:
        groups = torch.stack([torch.randperm(7) for _ in range(6)])
        groups[1, 2] = groups[4, :3] = -1
    groups = groups.reshape(2, 3, 7)
    kw = dict(network="odd_even", relaxation="cauchy", steepness=3.0)
    expected = _loss_from_soft_sort(scores, groups, target, **kw)
    got = reference.sortnet_rank_loss(scores, groups, target=target, reduction="none", **kw)
    torch.testing.assert_close(got, expected)


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
    # NaN in padding is fine: padding never enters the sort
    ops.sortnet_rank_loss(torch.tensor([[0.0, float("nan")]]), torch.tensor([[0, -1]]))
