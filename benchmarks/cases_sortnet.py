"""Sorting-network benchmark cases against the diffsort package (same network, relaxation "cauchy",
steepness 10): ``soft_sort`` forward and forward+backward through both the values and P, and the fused
``sortnet_rank_loss`` (block target, 4 tied groups) vs diffsort's P followed by the same loss in torch."""

import torch

from benchmarks.harness import Case

# the shapes first (a run cut short by a time limit has them), then the others and small lists
SHAPES = ((1024, 32, "odd_even"), (256, 128, "bitonic"), (4096, 8, "odd_even"), (16, 512, "bitonic"),
          (64, 16, "bitonic"), (16, 4, "odd_even"))
LOSS_SHAPES = ((1024, 32, "odd_even"), (256, 128, "bitonic"), (64, 16, "odd_even"))
QUICK_SHAPES = ((8, 4, "odd_even"), (4, 8, "bitonic"))
QUICK_LOSS_SHAPES = ((8, 4, "odd_even"),)
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


def _loss_inputs(B, n, device):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(B, n, generator=generator).to(device)
    groups = (torch.arange(n) * 4 // n).expand(B, n)[:, torch.randperm(n, generator=generator)].to(device)
    return scores, groups


def _loss_closures(loss_fn, scores, groups):
    def forward():
        with torch.no_grad():
            return loss_fn(scores, groups)

    def forward_backward():
        leaf = scores.detach().requires_grad_()
        loss_fn(leaf, groups).backward()
        return leaf.grad

    return forward, forward_backward


def _prefrank_loss(B, n, network, device):
    def make():
        from prefrank import ops

        def loss_fn(scores, groups):
            return ops.sortnet_rank_loss(scores, groups, network=network, relaxation=RELAXATION,
                                         steepness=STEEPNESS)

        return _loss_closures(loss_fn, *_loss_inputs(B, n, device))

    return make


def _diffsort_loss(B, n, network, device):
    def make():
        import diffsort

        sorter = diffsort.DiffSortNet(network, n, device=device, steepness=STEEPNESS, distribution=RELAXATION)

        def loss_fn(scores, groups):  # P of the best-first sort, then each item's mass on its group's block
            _, P = sorter(-scores)
            before = (groups[:, None, :] < groups[:, :, None]).sum(-1)
            upto = (groups[:, None, :] <= groups[:, :, None]).sum(-1)
            r = torch.arange(n, device=scores.device)
            in_block = (r >= before[..., None]) & (r < upto[..., None])
            return -torch.log((P * in_block).sum(-1)).mean()

        return _loss_closures(loss_fn, *_loss_inputs(B, n, device))

    return make


def cases(device, quick=False):
    out = []
    for B, n, network in QUICK_SHAPES if quick else SHAPES:
        shape = f"B={B},n={n},{network}"
        for impl, factory in (("prefrank", _prefrank), ("diffsort", _diffsort)):
            out.append(Case(op="soft_sort", shape=shape, dtype="float32", impl=impl,
                            make=factory(B, n, network, device), device=device,
                            requires=("diffsort",) if impl == "diffsort" else ()))
    for B, n, network in QUICK_LOSS_SHAPES if quick else LOSS_SHAPES:
        shape = f"B={B},n={n},{network}"
        for impl, factory in (("prefrank", _prefrank_loss), ("diffsort", _diffsort_loss)):
            out.append(Case(op="sortnet_rank_loss", shape=shape, dtype="float32", impl=impl,
                            make=factory(B, n, network, device), device=device,
                            requires=("diffsort",) if impl == "diffsort" else ()))
    return out
