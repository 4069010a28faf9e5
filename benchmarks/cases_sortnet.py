"""Sorting-network benchmark cases: prefrank.ops.soft_sort vs the diffsort package (same network,
relaxation "cauchy", steepness 10), forward and forward+backward through both the values and P."""

import torch

from benchmarks.harness import Case

SHAPES = ((4096, 8, "odd_even"), (1024, 32, "odd_even"), (256, 128, "bitonic"), (16, 512, "bitonic"))
STEEPNESS = 10.0
RELAXATION = "cauchy"


def _inputs(B, n, device):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(B, n, generator=generator).to(device)
    grad_values = torch.randn(B, n, generator=generator).to(device)
    grad_perm = torch.randn(B, n, n, generator=generator).to(device)
    return x, grad_values, grad_perm


def _closures(sort, x, grad_values, grad_perm):
    def forward():
        with torch.no_grad():
            return sort(x)

    def forward_backward():
        leaf = x.detach().requires_grad_()
        values, P = sort(leaf)
        ((values * grad_values).sum() + (P * grad_perm).sum()).backward()
        return leaf.grad

    return forward, forward_backward


def _prefrank(B, n, network, device):
    def make():
        from prefrank import ops

        def sort(t):
            return ops.soft_sort(t, network=network, relaxation=RELAXATION, steepness=STEEPNESS)

        return _closures(sort, *_inputs(B, n, device))

    return make


def _diffsort(B, n, network, device):
    def make():
        import diffsort

        sorter = diffsort.DiffSortNet(network, n, device=device, steepness=STEEPNESS, distribution=RELAXATION)
        return _closures(sorter, *_inputs(B, n, device))

    return make


def cases(device):
    out = []
    for B, n, network in SHAPES:
        shape = f"B={B},n={n},{network}"
        for impl, factory in (("prefrank", _prefrank), ("diffsort", _diffsort)):
            out.append(Case(op="soft_sort", shape=shape, dtype="float32", impl=impl,
                            make=factory(B, n, network, device), device=device))
    return out
