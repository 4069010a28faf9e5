"""Benchmark cases of the logprobs family: sequence_logprobs and linear_sequence_logprobs vs the references.

sequence_logprobs at (tokens, V) ∈ {(4096, 32000), (16384, 32000), (2048, 151936)} as 4 sequences of
tokens/4 with 1/8 of the labels ignored; linear_sequence_logprobs at T=2048, H=1024, V=32000 with the first
half of the tokens unlabelled (a prompt) vs ``hidden @ W.T + b`` followed by the reference. "forward" is the
reference-model call (no input requires grad); "forward+backward" computes every gradient ("frozen lm-head":
only hidden's, as in LoRA). The "prefrank inplace_backward" rows write the gradient over the logits (each timed
call starts from the previous call's gradient as logits: same work, small values).
"""

import functools

import torch

from benchmarks.harness import Case
from prefrank import ops, reference

SEQUENCE_SHAPES = ((4096, 32000), (16384, 32000), (2048, 151936))
LINEAR_SHAPE = (2048, 1024, 32000)  # T, H, V
ROWS = 4


def _sequence_inputs(tokens, V, dtype, device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(ROWS, tokens // ROWS, V, generator=generator).to(dtype=dtype, device=device)
    labels = torch.randint(0, V, (ROWS, tokens // ROWS), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.125] = -100
    return logits, labels.to(device)


def _sequence_make(fn, tokens, V, dtype, device):
    def make():
        logits, labels = _sequence_inputs(tokens, V, dtype, device)
        leaf = logits.detach().requires_grad_()
        # an activation like model(...).logits (inplace_backward refuses leaves); its gradient reaches `leaf`
        policy_logits = leaf.clone()

        def forward():
            return fn(logits, labels)

        def forward_backward():
            leaf.grad = None
            fn(policy_logits, labels).sum().backward()
            return leaf.grad

        return forward, forward_backward

    return make


def linear_inputs(dtype, device):
    T, H, V = LINEAR_SHAPE
    generator = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(1, T, H, generator=generator).to(dtype=dtype, device=device)
    weight = (torch.randn(V, H, generator=generator) / H**0.5).to(dtype=dtype, device=device)
    bias = torch.zeros(V, dtype=dtype, device=device)
    labels = torch.randint(0, V, (1, T), generator=generator)
    labels[:, : T // 2] = -100  # the prompt: half the tokens carry no label
    return hidden, weight, bias, labels.to(device)


def _linear_make(fn, dtype, device, frozen_head=False):
    def make():
        hidden, weight, bias, labels = linear_inputs(dtype, device)
        params = [t.detach().requires_grad_(not frozen_head or t is hidden) for t in (hidden, weight, bias)]

        def forward():
            return fn(hidden, weight, labels, bias=bias)

        def forward_backward():
            for p in params:
                p.grad = None
            fn(params[0], params[1], labels, bias=params[2]).sum().backward()
            return [p.grad for p in params]

        return forward, forward_backward

    return make


def cases(device):
    dtypes = (torch.float32,) if device == "cpu" else (torch.bfloat16, torch.float32)
    out = []
    for dtype in dtypes:
        dname = str(dtype).removeprefix("torch.")
        for tokens, V in SEQUENCE_SHAPES:
            for impl, fn in (("prefrank", ops.sequence_logprobs),
                             ("prefrank inplace_backward", functools.partial(ops.sequence_logprobs,
                                                                             inplace_backward=True)),
                             ("reference", reference.sequence_logprobs)):
                out.append(Case("sequence_logprobs", f"tokens={tokens},V={V}", dname, impl,
                                _sequence_make(fn, tokens, V, dtype, device), device))
        T, H, V = LINEAR_SHAPE
        for frozen_head in (False, True):
            shape = f"T={T},H={H},V={V},labelled=T/2" + (",frozen lm-head" if frozen_head else "")
            for impl, fn in (("prefrank", ops.linear_sequence_logprobs),
                             ("reference", reference.linear_sequence_logprobs)):
                out.append(Case("linear_sequence_logprobs", shape, dname, impl,
                                _linear_make(fn, dtype, device, frozen_head), device))
    return out


def min_bytes_moved(case):
    """(forward, forward+backward) bytes the op must move at least: logits read once forward; read once more
    and the gradient written once backward (the roofline numerator; divide by the device bandwidth)."""
    itemsize = 2 if case.dtype in ("bfloat16", "float16") else 4
    if case.op == "sequence_logprobs":
        tokens, V = (int(part.split("=")[1]) for part in case.shape.split(","))
        logits = tokens * V * itemsize
        return logits, 3 * logits
    T, H, V = LINEAR_SHAPE
    weight, hidden = V * H * itemsize, T * H * itemsize
    if "frozen" in case.shape:  # weight read once; hidden read once and its gradient written once
        return weight + hidden, weight + 2 * hidden
    # weight read forward, read again + its gradient written backward; hidden likewise
    return weight + hidden, 3 * (weight + hidden)
