"""Plackett-Luce NLL, forward and forward+backward: prefrank kernels vs the pure-PyTorch reference."""

import torch

from benchmarks.harness import Case
from prefrank import ops, reference

SHAPES = [(1024, 4), (1024, 16), (1024, 64), (16384, 4), (16384, 16), (16384, 64)]


def _maker(fn, B, K, device, mode):
    def make():
        g = torch.Generator().manual_seed(0)
        scores = torch.randn(B, K, generator=g).to(device)
        kw = {}
        if mode == "groups":
            kw = {"groups": torch.randint(0, max(K // 4, 2), (B, K), generator=g).to(device), "ties": "efron"}

        def forward():
            with torch.no_grad():
                return fn(scores, **kw)

        def forward_backward():
            x = scores.detach().requires_grad_()
            fn(x, **kw).sum().backward()
            return x.grad

        return forward, forward_backward
    return make


def cases(device):
    out = []
    for mode in ("order", "groups"):
        for B, K in SHAPES:
            for impl, fn in (("prefrank", ops.plackett_luce_nll), ("reference", reference.plackett_luce_nll)):
                out.append(Case("plackett_luce_nll" if mode == "order" else "plackett_luce_nll_groups",
                                f"B={B},K={K}", "float32", impl, _maker(fn, B, K, device, mode), device))
    return out
