"""Benchmark cases of the logprobs family against what users run instead.

``sequence_logprobs`` at N·T = 4096 tokens (4 sequences, 1/8 of the labels ignored) and V ∈ {32000, 151936},
plus small steps: ``-F.cross_entropy(reduction="none")`` summed per sequence, TRL's ``selective_log_softmax``,
``torch.compile`` of the naive ``log_softmax(logits.float()).gather`` and, on CUDA, Liger's cross-entropy.
``linear_sequence_logprobs`` at T=2048, H=1024, V=32000 (no bias: an LM head), the first half of the tokens
unlabelled (a prompt): the naive matmul over the labelled rows only + log_softmax, ``torch.compile`` of it
(the boolean row selection stays eager: it is data-dependent) and Cut Cross-Entropy (CPU
``impl="torch_compile"``; on CUDA also its Triton ``impl="cce"``).
"forward" is the reference-model call (no input requires grad); "forward+backward" computes every gradient
("frozen lm-head": only hidden's, as in LoRA). The "prefrank inplace_backward" rows write the gradient over
the logits (each timed call starts from the previous call's gradient as logits: same work, small values);
Liger's cross-entropy does the same by design.
"""

import functools

import torch
import torch.nn.functional as F

from benchmarks.harness import Case, compile_static
from prefrank import ops, reference

IGNORE = -100
# the shapes first (a run cut short by a time limit has them), then a small step
SEQUENCE_SHAPES = ((4096, 32000), (4096, 151936), (256, 32000))   # (tokens = N·T, V)
LINEAR_SHAPES = ((2048, 1024, 32000), (256, 256, 32000))          # (T, H, V)
QUICK_SEQUENCE_SHAPES = ((64, 512),)
QUICK_LINEAR_SHAPES = ((32, 16, 256),)
ROWS = 4


@functools.lru_cache(maxsize=1)  # one copy of a group's logits for all its impls (4096×151936 fp32 is 2.5 GB)
def _sequence_inputs(tokens, V, dtype, device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(ROWS, tokens // ROWS, V, generator=generator).to(dtype=dtype, device=device)
    labels = torch.randint(0, V, (ROWS, tokens // ROWS), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < 0.125] = IGNORE
    return logits, labels.to(device)


def naive_sequence_logprobs(logits, labels):
    """log_softmax in fp32 over every position, gather, masked sum per sequence."""
    logps = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(labels != IGNORE, logps, 0.0).sum(-1)


def cross_entropy_logprobs(logits, labels):
    nll = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction="none")
    return -nll.view(labels.shape).float().sum(-1)


def trl_logprobs(logits, labels):
    from trl.trainer.utils import selective_log_softmax

    logps = selective_log_softmax(logits, labels.clamp(min=0))
    return torch.where(labels != IGNORE, logps, 0.0).float().sum(-1)


def liger_logprobs():
    from liger_kernel.transformers import LigerCrossEntropyLoss

    loss = LigerCrossEntropyLoss(ignore_index=IGNORE, reduction="none")

    def fn(logits, labels):
        return -loss(logits.flatten(0, -2), labels.flatten()).view(labels.shape).float().sum(-1)

    return fn


def _sequence_make(factory, tokens, V, dtype, device, overwrites=False):
    def make():
        fn = factory()
        logits, labels = _sequence_inputs(tokens, V, dtype, device)  # shared: nobody may write into them
        leaf = logits.detach().requires_grad_()  # the same storage, no copy
        # an impl that writes its gradient over the logits gets a private activation (inplace_backward refuses
        # leaves); its gradient reaches `leaf`
        policy_logits = leaf.clone() if overwrites else leaf

        def forward():
            with torch.no_grad():
                return fn(logits, labels)

        def forward_backward():  # hands the gradient over: nothing stays alive between calls
            fn(policy_logits, labels).sum().backward()
            grad, leaf.grad = leaf.grad, None
            return grad

        return forward, forward_backward

    return make


def linear_inputs(T, H, V, dtype, device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(1, T, H, generator=generator).to(dtype=dtype, device=device)
    weight = (torch.randn(V, H, generator=generator) / H**0.5).to(dtype=dtype, device=device)
    labels = torch.randint(0, V, (1, T), generator=generator)
    labels[:, : T // 2] = IGNORE  # the prompt: half the tokens carry no label
    return hidden, weight, labels.to(device)


def _filtered_logprobs(rows, selected_hidden, weight, selected_labels, num_rows):
    logps = torch.log_softmax((selected_hidden @ weight.T).float(), -1)
    logps = logps.gather(-1, selected_labels[:, None]).squeeze(-1)
    return torch.zeros(num_rows, dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)


def naive_linear_factory(compiled):
    """The matmul over the labelled rows only, then log_softmax + gather + per-sequence sum."""
    core = compile_static(_filtered_logprobs) if compiled else _filtered_logprobs

    def fn(hidden, weight, labels):
        selected = labels != IGNORE
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[selected]
        return core(rows, hidden[selected], weight, labels[selected], labels.shape[0])

    return fn


def cce_factory(impl):
    def factory():
        from cut_cross_entropy import linear_cross_entropy

        def fn(hidden, weight, labels):
            nll = linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, reduction="none", impl=impl)
            return -nll.float().view(labels.shape).sum(-1)

        return fn

    return factory


def _linear_make(factory, T, H, V, dtype, device, frozen_head=False):
    def make():
        fn = factory()
        hidden, weight, labels = linear_inputs(T, H, V, dtype, device)
        params = [t.detach().requires_grad_(not frozen_head or t is hidden) for t in (hidden, weight)]

        def forward():
            with torch.no_grad():
                return fn(hidden, weight, labels)

        def forward_backward():  # hands the gradients over: nothing stays alive between calls
            fn(*params, labels).sum().backward()
            grads = [p.grad for p in params if p.requires_grad]
            for p in params:
                p.grad = None
            return grads

        return forward, forward_backward

    return make


def _sequence_impls(device):
    """(impl, factory of fn(logits, labels), modules needed, writes over the logits)."""
    impls = [("prefrank", lambda: ops.sequence_logprobs, (), False),
             ("prefrank inplace_backward", lambda: functools.partial(ops.sequence_logprobs, inplace_backward=True),
              (), True),
             ("reference", lambda: reference.sequence_logprobs, (), False),
             ("F.cross_entropy", lambda: cross_entropy_logprobs, (), False),
             ("trl selective_log_softmax", lambda: trl_logprobs, ("trl",), False),
             ("torch.compile naive", lambda: compile_static(naive_sequence_logprobs), (), False)]
    if device == "cuda":
        impls.append(("liger cross_entropy", liger_logprobs, ("liger_kernel",), True))
    return impls


def _linear_impls(device):
    impls = [("prefrank", lambda: lambda h, w, y: ops.linear_sequence_logprobs(h, w, y), ()),
             ("reference", lambda: lambda h, w, y: reference.linear_sequence_logprobs(h, w, y), ()),
             ("torch filtered naive", lambda: naive_linear_factory(False), ()),
             ("torch.compile filtered naive", lambda: naive_linear_factory(True), ()),
             ("cce torch_compile", cce_factory("torch_compile"), ("cut_cross_entropy",))]
    if device == "cuda":
        # CCE's Triton kernel skips gradient entries below its filter_eps ("high" by default, what users run):
        # its gradients differ from the exact ones by about that, so it is checked at bf16's tolerance
        impls.append(("cce triton", cce_factory("cce"), ("cut_cross_entropy", "triton")))
    return impls


def cases(device, quick=False):
    dtypes = (torch.float32,) if device == "cpu" else (torch.float32, torch.bfloat16)
    out = []
    for dtype in dtypes:
        dname = str(dtype).removeprefix("torch.")
        sequence_shapes = QUICK_SEQUENCE_SHAPES if quick else SEQUENCE_SHAPES
        linear_shapes = QUICK_LINEAR_SHAPES if quick else LINEAR_SHAPES
        for i in range(max(len(sequence_shapes), len(linear_shapes))):  # the i-th shape of both ops, then the next
            for tokens, V in sequence_shapes[i:i + 1]:
                for impl, factory, requires, overwrites in _sequence_impls(device):
                    out.append(Case("sequence_logprobs", f"tokens={tokens},V={V}", dname, impl,
                                    _sequence_make(factory, tokens, V, dtype, device, overwrites), device,
                                    requires=requires))
            for (T, H, V), frozen_head in [(shape, frozen) for shape in linear_shapes[i:i + 1]
                                           for frozen in (False, True)]:
                shape = f"T={T},H={H},V={V},labelled=T/2" + (",frozen lm-head" if frozen_head else "")
                for impl, factory, requires in _linear_impls(device):
                    out.append(Case("linear_sequence_logprobs", shape, dname, impl,
                                    _linear_make(factory, T, H, V, dtype, device, frozen_head), device,
                                    requires=requires, rtol=2e-2 if impl == "cce triton" else None))
    return out


def min_bytes_moved(case):
    """(forward, forward+backward) bytes the op must move at least: logits read once forward; read once more
    and the gradient written once backward (the roofline numerator; divide by the device bandwidth)."""
    itemsize = 2 if case.dtype in ("bfloat16", "float16") else 4
    fields = dict(part.split("=") for part in case.shape.split(",") if "=" in part)
    if case.op == "sequence_logprobs":
        logits = int(fields["tokens"]) * int(fields["V"]) * itemsize
        return logits, 3 * logits
    T, H, V = (int(fields[k]) for k in ("T", "H", "V"))
    weight, hidden = V * H * itemsize, T * H * itemsize
    if "frozen" in case.shape:  # weight read once; hidden read once and its gradient written once
        return weight + hidden, weight + 2 * hidden
    # weight read forward, read again + its gradient written backward; hidden likewise
    return weight + hidden, 3 * (weight + hidden)
