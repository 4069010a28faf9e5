"""Benchmark cases of the preference losses: the whole loss (validation, rewards, ranking op, metrics) on
the compiled kernels ("prefrank"); the same loss forced onto the pure-PyTorch references ("reference", the
oracle) is its correctness check. No peer implements these listwise losses."""

import torch

from benchmarks.harness import Case
from prefrank import losses, ops


def _loss_case(op, shape, impl, device, build):
    backend = "reference" if impl == "reference" else "auto"

    def make():
        torch.manual_seed(0)  # the same inputs for every impl (run.py compares their results)
        fn, tensors = build(device)
        leaves = [t.requires_grad_() if t.is_floating_point() else t for t in tensors]

        def forward():
            with ops.use_backend(backend), torch.no_grad():
                return fn(leaves).loss

        def forward_backward():  # hands the gradients over: nothing stays alive between calls
            with ops.use_backend(backend):
                fn(leaves).loss.backward()
            grads = [leaf.grad for leaf in leaves if leaf.requires_grad]
            for leaf in leaves:
                leaf.grad = None
            return grads

        return forward, forward_backward

    return Case(op=op, shape=shape, dtype="float32", impl=impl, make=make, device=device)


def _listwise(B, K):
    def build(device):
        groups = torch.randint(0, 4, (B, K), device=device)
        groups[:, 0], groups[:, 1] = 0, 3
        return (lambda t: losses.listwise_dpo_loss(t[0], t[1], groups=groups, ties="efron"),
                [torch.randn(B, K, device=device), torch.randn(B, K, device=device)])
    return build


def _smpro(B, K):
    def build(device):
        groups = torch.arange(K, device=device).div(2, rounding_mode="floor").expand(B, K).contiguous()
        return (lambda t: losses.smpro_loss(t[0], t[1], groups),
                [torch.randn(B, K, device=device), torch.randn(B, K, device=device)])
    return build


def _misp(B, K):
    def build(device):
        log_q = torch.log_softmax(torch.randn(B, K, device=device), -1)
        return (lambda t: losses.misp_dpo_loss(t[0], t[1], t[2], t[3], log_q=log_q),
                [torch.randn(B, device=device), torch.randn(B, device=device),
                 torch.randn(B, K, device=device), torch.randn(B, K, device=device)])
    return build


def cases(device, quick=False):
    B = 8 if quick else 4096
    out = []
    for impl in ("prefrank", "reference"):
        out.append(_loss_case("listwise_dpo_loss", f"B={B},K=16", impl, device, _listwise(B, 16)))
        out.append(_loss_case("smpro_loss", f"B={min(B, 256)},K=8", impl, device, _smpro(min(B, 256), 8)))
        out.append(_loss_case("misp_dpo_loss", f"B={B},K=3", impl, device, _misp(B, 3)))
    return out
