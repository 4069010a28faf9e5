"""sequence_logprobs / linear_sequence_logprobs: C++ CPU kernels and Triton kernels (interpreter) vs the
pure-PyTorch references, forward and backward, plus gradcheck, opcheck, torch.compile and input errors."""

import pytest
import torch

from prefrank import logprobs, ops, reference
from prefrank.triton_kernels import logprobs as triton_logprobs

IMPLS = ("cpu", "triton")  # the C++ kernels (auto backend on CPU tensors) / Triton under TRITON_INTERPRET=1


def _run(impl, fn, *args, **kwargs):
    with ops.use_backend("auto" if impl == "cpu" else "triton"):
        return fn(*args, **kwargs)


def _assert_close(actual, expected, dtype=torch.float32, scale=1.0):
    """Tolerances by the dtype the kernels read (their arithmetic is fp32/fp64 either way)."""
    assert not torch.isnan(actual).any(), "NaN in the result"
    expected = expected.to(actual.dtype)
    if actual.dtype in (torch.float16, torch.bfloat16):  # half gradients: ≤ 1 ulp (the interpreter truncates)
        eps = torch.finfo(actual.dtype).eps
        torch.testing.assert_close(actual, expected, rtol=eps, atol=eps * 1e-3 * scale)
    elif actual.dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * scale)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def _case(B, T, V, dtype=torch.float32, ignore_frac=0.3):
    logits = (torch.randn(B, T, V) * 3).to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < ignore_frac] = -100
    return logits, labels


def _check_against_reference(impl, logits, labels, scale=1.0, **kwargs):
    """Forward and backward (random upstream gradient) vs the reference on the same input values."""
    x = logits.detach().clone().requires_grad_()
    out = _run(impl, ops.sequence_logprobs, x, labels, **kwargs)
    xr = logits.detach().clone().requires_grad_()
    ref = reference.sequence_logprobs(xr, labels, **kwargs)
    assert out.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert out.shape == ref.shape
    _assert_close(out, ref, scale=scale)
    upstream = torch.randn_like(ref)
    (grad,) = torch.autograd.grad(out, x, upstream)
    (grad_ref,) = torch.autograd.grad(ref, xr, upstream)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    _assert_close(grad, grad_ref)
    assert torch.equal(x.detach(), logits), "the default backward must not touch the user's logits"
    return out, grad


# V x T grid: the C++ kernel runs all of it; the interpreter a representative subset (it is slow)
CPU_SHAPES = [(V, T) for V in (1, 7, 1000, 50257) for T in (1, 5, 64)]
TRITON_SHAPES = [(1, 5), (7, 64), (1000, 1), (1000, 64), (50257, 5)]


@pytest.mark.parametrize("impl,V,T", [("cpu", V, T) for V, T in CPU_SHAPES]
                         + [("triton", V, T) for V, T in TRITON_SHAPES])
def test_matches_reference(seed, impl, V, T):
    logits, labels = _case(2, T, V)
    _check_against_reference(impl, logits, labels, scale=T)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_temperature_and_reductions(seed, impl, reduction):
    logits, labels = _case(3, 9, 333)
    _check_against_reference(impl, logits, labels, temperature=0.7, reduction=reduction, scale=9)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(seed, impl, dtype):
    logits, labels = _case(2, 7, 1500, dtype=dtype)
    _check_against_reference(impl, logits, labels, temperature=0.7, scale=7)


def test_float64(seed):
    logits, labels = _case(2, 5, 77, dtype=torch.float64)
    _check_against_reference("cpu", logits, labels, temperature=0.7, reduction="mean")


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_rows_and_padding(seed, impl):
    logits, labels = _case(4, 6, 50)
    labels[1] = -100  # a row with no token at all: 0 for sum and mean, zero gradient
    labels[2, 3:] = -100  # right padding
    labels[3, :2] = -100  # left padding
    for reduction in ("sum", "mean"):
        out, grad = _check_against_reference(impl, logits, labels, reduction=reduction, scale=6)
        assert out[1] == 0 and (grad[1] == 0).all() and (grad[2, 3:] == 0).all()
    custom = torch.where(labels == -100, -7, labels)  # another ignore_index
    out, grad = _check_against_reference(impl, logits, custom, ignore_index=-7, scale=6)
    assert out[1] == 0 and (grad[3, :2] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_logits_are_not_copied(seed, impl):
    base = torch.randn(3, 8, 101)
    labels = torch.randint(0, 101, (3, 7))
    sliced = base[:, :-1]  # the usual shift: logits[:, :-1] scores labels[:, 1:]
    assert logprobs._as_rows(sliced).data_ptr() == sliced.data_ptr()
    _check_against_reference(impl, sliced, labels, scale=7)
    time_major = torch.randn(7, 3, 101).transpose(0, 1)  # (B, T, V) view with T outer in memory
    assert logprobs._as_rows(time_major).data_ptr() == time_major.data_ptr()
    _check_against_reference(impl, time_major, labels, scale=7)
    grouped = torch.randn(2, 3, 9, 101)[:, :, 1:]  # (B, K, T, V) sliced on T
    _check_against_reference(impl, grouped, torch.randint(0, 101, (2, 3, 8)), scale=8)
    unmergeable = torch.randn(3, 2, 5, 101).transpose(0, 1)  # leading dims cannot be viewed as one: copied
    _check_against_reference(impl, unmergeable, torch.randint(0, 101, (2, 3, 5)), scale=5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_packed_varlen_segments(seed, impl, reduction):
    logits, labels = _case(2, 12, 64, ignore_frac=0.1)
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, -1, -1, 2, 2],
                                [3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 5, -1]])  # slot 4 stays empty
    out, _ = _check_against_reference(impl, logits, labels, segment_ids=segment_ids, num_segments=6,
                                      reduction=reduction, scale=12)
    assert out.shape == (6,) and out[4] == 0
    # the same as each sequence on its own row
    tokens = _run(impl, ops.sequence_logprobs, logits, labels, reduction="none")
    for slot in (0, 1, 2, 3, 5):
        picked = (segment_ids == slot) & (labels != -100)
        expected = tokens[picked].sum()
        if reduction == "mean":
            expected = expected / picked.sum().clamp(min=1)
        _assert_close(out[slot], expected, scale=12)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_minus_inf_token_stays_in_its_segment(seed, reduction):
    """A token of log-probability -inf makes its own segment -inf and leaves the others finite (found by the
    fuzz test: a running sum across segments carried -inf, and every later segment came out -inf − -inf)."""
    logits, labels = _case(1, 9, 20, ignore_frac=0.0)
    segment_ids = torch.tensor([[2, 2, 0, 0, 0, 1, 1, 3, 3]])
    logits[0, 3, labels[0, 3]] = float("-inf")      # segment 0, sorted before segments 1..3
    out, _ = _check_against_reference("cpu", logits, labels, segment_ids=segment_ids, num_segments=4,
                                      reduction=reduction, scale=9)
    assert out[0] == float("-inf") and torch.isfinite(out[1:]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_k_responses_after_one_shared_prompt(seed, impl):
    """One row: a prompt (not scored) then K=3 responses, each summed into its own slot."""
    V, prompt, lengths = 40, 5, (3, 6, 2)
    T = prompt + sum(lengths)
    logits, labels = _case(1, T, V, ignore_frac=0.0)
    labels[0, :prompt] = -100
    segment_ids = torch.full((1, T), -1)
    start = prompt
    for k, n in enumerate(lengths):
        segment_ids[0, start:start + n] = k
        start += n
    out, grad = _check_against_reference(impl, logits, labels, segment_ids=segment_ids, num_segments=3,
                                         scale=T)
    assert (grad[0, :prompt] == 0).all()
    full = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[0, :, 0]
    start = prompt
    for k, n in enumerate(lengths):
        _assert_close(out[k], full[start:start + n].sum(), scale=n)
        start += n


def test_segments_deterministic(seed):
    logits, labels = _case(1, 300, 20, ignore_frac=0.0)
    segment_ids = torch.randint(-1, 7, (1, 300))
    first = ops.sequence_logprobs(logits, labels, segment_ids=segment_ids, num_segments=7)
    for _ in range(3):
        again = ops.sequence_logprobs(logits, labels, segment_ids=segment_ids, num_segments=7)
        assert torch.equal(again, first)


@pytest.mark.parametrize("impl", IMPLS)
def test_vocabulary_beyond_256k(seed, impl):
    V = 262144 + 3  # not a multiple of any tile
    logits, labels = _case(1, 2, V, ignore_frac=0.0)
    labels[0, 1] = V - 1  # the last column, in the ragged tail tile
    _check_against_reference(impl, logits, labels, scale=2)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_path_saves_nothing(seed, impl):
    logits, labels = _case(2, 4, 30)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = _run(impl, ops.sequence_logprobs, logits, labels)  # reference model: no input requires grad
        assert out.grad_fn is None and not saved
        with torch.no_grad():
            _run(impl, ops.sequence_logprobs, logits.requires_grad_(), labels)
        assert not saved
        _run(impl, ops.sequence_logprobs, logits, labels)  # policy: the kernel saves logits, labels and lse
        assert saved


def test_triton_kernels_write_every_element(seed):
    """Poisoned buffers: every logp/lse and every gradient element (ignored rows included) is written."""
    logits, labels = _case(2, 5, 300)
    logits = logits[:, :4]
    labels = labels[:, :4].contiguous()
    logp = torch.full((2, 4), float("nan"))
    lse = torch.full((2, 4), float("nan"))
    triton_logprobs.forward(logits, labels, -100, 0.7, logp, lse)
    ref = reference.sequence_logprobs(logits, labels, temperature=0.7, reduction="none")
    _assert_close(logp, ref)
    out = torch.full((2, 4, 300), float("nan"))
    grad = torch.randn(2, 4)
    triton_logprobs.backward(grad, logits, labels, lse, -100, 0.7, out)
    x = logits.clone().requires_grad_()
    ref_tokens = reference.sequence_logprobs(x, labels, temperature=0.7, reduction="none")
    (expected,) = torch.autograd.grad(ref_tokens, x, grad)
    _assert_close(out, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_overwrites_every_element(seed, impl):
    """The lm-head path's in-place backward: ignored rows must become 0, not keep their logits."""
    logits, labels = _case(1, 6, 200)
    labels[0, 2] = -100
    x = logits.clone().requires_grad_()
    ref = reference.sequence_logprobs(x, labels, temperature=0.7, reduction="none")
    grad = torch.randn(1, 6)
    (expected,) = torch.autograd.grad(ref, x, grad)
    use_triton = impl == "triton"
    _, lse = torch.ops.prefrank.sequence_logprobs_fwd(logits, labels, -100, 0.7, True, use_triton)
    buffer = logits.clone()
    torch.ops.prefrank.sequence_logprobs_bwd_(grad, buffer, labels, lse, -100, 0.7, use_triton)
    _assert_close(buffer, expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_option(seed, impl, dtype):
    """inplace_backward=True: the same result and gradient as the default path, written over the logits'
    own storage (no logits-sized buffer); a second backward through the graph raises instead of reading it."""
    logits, labels = _case(3, 9, 301, dtype)
    upstream = torch.randn(3)
    x = logits.clone().requires_grad_()
    expected_out = _run(impl, ops.sequence_logprobs, x, labels, temperature=0.7)
    (expected,) = torch.autograd.grad(expected_out, x, upstream)
    y = logits.clone().requires_grad_().clone()  # an activation (non-leaf), like model(...).logits
    out = _run(impl, ops.sequence_logprobs, y, labels, temperature=0.7, inplace_backward=True)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out, y, upstream, retain_graph=True)
    assert grad.data_ptr() == y.data_ptr() and grad.dtype == dtype
    _assert_close(grad, expected)
    assert torch.equal(y.detach(), grad)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, y, upstream)


@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_strided_logits(seed, impl):
    """logits[:, :-1] with inplace_backward: the gradient lands in the sliced region only."""
    full, labels = _case(2, 8, 123)
    labels = labels[:, :-1].contiguous()
    x = full.clone().requires_grad_()
    ref = reference.sequence_logprobs(x[:, :-1], labels, reduction="mean")
    upstream = torch.randn(2)
    (expected,) = torch.autograd.grad(ref, x, upstream)
    base = full.clone().requires_grad_().clone()
    view = base[:, :-1]
    out = _run(impl, ops.sequence_logprobs, view, labels, reduction="mean", inplace_backward=True)
    (grad,) = torch.autograd.grad(out, view, upstream)
    _assert_close(grad, expected[:, :-1])
    _assert_close(base[:, :-1], expected[:, :-1])
    assert torch.equal(base[:, -1], full[:, -1])  # the unread last position keeps its logits


def test_inplace_backward_must_be_bool():
    logits, labels = _case(1, 2, 5)
    with pytest.raises(TypeError, match="inplace_backward"):
        ops.sequence_logprobs(logits, labels, inplace_backward=1)


def test_inplace_backward_refuses_leaves_that_require_grad():
    """A parameter's values must never become its gradient: leaves (and their views) are refused, like torch's
    own in-place ops; leaves without grad (the reference model's logits) have nothing to overwrite."""
    logits, labels = _case(1, 4, 9)
    leaf = logits.clone().requires_grad_()
    for tensor in (leaf, leaf[:, :-1]):
        with pytest.raises(ValueError, match="inplace_backward"):
            ops.sequence_logprobs(tensor, labels[:, :tensor.shape[1]].contiguous(), inplace_backward=True)
    out = ops.sequence_logprobs(logits, labels, inplace_backward=True)
    assert out.grad_fn is None and torch.equal(out, ops.sequence_logprobs(logits, labels))


# ---------------------------------------------------------------------------------------------------------
# linear_sequence_logprobs
# ---------------------------------------------------------------------------------------------------------

def _linear_case(dtype=torch.float32, B=2, T=11, H=24, V=301):
    hidden = torch.randn(B, T, H).to(dtype)
    weight = (torch.randn(V, H) / H**0.5).to(dtype)
    bias = torch.randn(V).to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[0, :4] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    return hidden, weight, bias, labels


@pytest.mark.parametrize("impl,dtype,with_bias,chunk_size", [
    ("cpu", torch.float32, True, 4), ("cpu", torch.float32, False, None), ("cpu", torch.bfloat16, True, 5),
    ("cpu", torch.float64, True, 3), ("triton", torch.float32, True, 6), ("triton", torch.float16, False, 7)])
def test_linear_matches_reference(seed, impl, dtype, with_bias, chunk_size):
    hidden, weight, bias, labels = _linear_case(dtype)
    bias = bias if with_bias else None
    kwargs = dict(temperature=0.7, chunk_size=chunk_size)
    inputs = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = _run(impl, ops.linear_sequence_logprobs, inputs[0], inputs[1], labels,
               bias=inputs[2] if with_bias else None, **kwargs)
    ref = reference.linear_sequence_logprobs(ref_inputs[0], ref_inputs[1], labels,
                                             bias=ref_inputs[2] if with_bias else None, **kwargs)
    if dtype in (torch.float16, torch.bfloat16):  # addmm rounds the biased logits once, the reference twice
        torch.testing.assert_close(out, ref, rtol=0.02, atol=0.02)
    else:
        _assert_close(out, ref, scale=11)
    upstream = torch.randn_like(ref)
    grads = torch.autograd.grad(out, inputs, upstream)
    ref_grads = torch.autograd.grad(ref, ref_inputs, upstream)
    for name, g, r in zip(("hidden", "weight", "bias")[:len(grads)], grads, ref_grads, strict=True):
        assert g.dtype == dtype and g.shape == r.shape, name
        if dtype in (torch.float16, torch.bfloat16):  # the reference's bf16 matmuls round differently
            torch.testing.assert_close(g.float(), r.float(), rtol=0.05, atol=0.05 * r.abs().max().item())
        else:
            _assert_close(g, r, scale=r.abs().max().item())


@pytest.mark.parametrize("impl,dtype", [("cpu", torch.float32), ("cpu", torch.float64), ("cpu", torch.bfloat16),
                                         ("triton", torch.float32)])
@pytest.mark.parametrize("chunk_size,chunks", [(4, 4), (None, 1)])
def test_linear_frozen_head_needs_no_recompute(seed, impl, dtype, chunk_size, chunks, monkeypatch):
    """Only hidden requires grad (LoRA): the gradient matches the reference and the backward runs no lm-head
    matmul (the forward formed (onehot − softmax)/τ · W per chunk; by default on CPU one chunk of all the
    labelled tokens, as their logits fit KEEP_LOGITS_BUDGET_BYTES)."""
    hidden, weight, bias, labels = _linear_case(dtype)
    h, hr = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    calls = []
    chunk_logits = logprobs._chunk_logits
    monkeypatch.setattr(logprobs, "_chunk_logits", lambda *a, **k: calls.append(1) or chunk_logits(*a, **k))
    out = _run(impl, ops.linear_sequence_logprobs, h, weight, labels, bias=bias, temperature=0.7,
               chunk_size=chunk_size)
    forward_calls = len(calls)
    ref = reference.linear_sequence_logprobs(hr, weight, labels, bias=bias, temperature=0.7)
    upstream = torch.randn_like(ref)
    (grad,) = torch.autograd.grad(out, h, upstream)
    (grad_ref,) = torch.autograd.grad(ref, hr, upstream)
    assert len(calls) == forward_calls == chunks  # 15 labelled tokens in chunks of 4, or one; none backward
    assert grad.dtype == dtype and not torch.isnan(grad).any()
    if dtype == torch.bfloat16:
        torch.testing.assert_close(grad.float(), grad_ref.float(), rtol=0.05, atol=0.05 * grad_ref.abs().max().item())
    else:
        _assert_close(grad, grad_ref, scale=grad_ref.abs().max().item())


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_segments_and_unlabelled_tokens_skip_the_matmul(seed, impl):
    hidden, weight, bias, labels = _linear_case()
    segment_ids = torch.tensor([[-1, -1, -1, -1, 0, 0, 0, 1, 1, 1, 1], [2, 2, 2, 2, 3, 3, 3, 3, -1, -1, -1]])
    labels[1, 2] = 5  # a labelled token whose segment is -1 would count: none here, labels at seg -1 ignored
    labels[0, 7] = -100
    poisoned = hidden.clone()
    poisoned[0, :4] = float("nan")  # prompt tokens: never enter the lm-head matmul
    h = poisoned.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = _run(impl, ops.linear_sequence_logprobs, h, w, labels, bias=bias, segment_ids=segment_ids,
               num_segments=5, reduction="mean", chunk_size=3)
    hr = hidden.clone().requires_grad_()
    wr = weight.clone().requires_grad_()
    ref = reference.linear_sequence_logprobs(hr, wr, labels, bias=bias, segment_ids=segment_ids,
                                             num_segments=5, reduction="mean")
    _assert_close(out, ref, scale=11)
    upstream = torch.randn(5)
    gh, gw = torch.autograd.grad(out, (h, w), upstream)
    ghr, gwr = torch.autograd.grad(ref, (hr, wr), upstream)
    _assert_close(gh, ghr)
    _assert_close(gw, gwr)
    assert (gh[0, :4] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_without_labelled_tokens(seed, impl):
    """No token enters the matmul: zero logps and exactly zero gradients (the buffers start poisoned)."""
    hidden, weight, bias, labels = _linear_case()
    labels.fill_(-100)
    params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = _run(impl, ops.linear_sequence_logprobs, params[0], params[1], labels, bias=params[2])
    assert torch.equal(out, torch.zeros(2))
    grads = torch.autograd.grad(out, params, torch.randn(2))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_linear_default_chunk_bounds_live_logits():
    chunk = logprobs.default_chunk_size(32000, torch.float32, "cpu")
    assert chunk * 32000 * 4 <= logprobs.CHUNK_BUDGET_BYTES["cpu"] and chunk >= 1
    assert logprobs.default_chunk_size(10**9, torch.float32, "cpu") == 1


# ---------------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------------------------------------

def test_gradcheck_sequence(seed):
    logits = torch.randn(2, 5, 13, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (2, 5))
    labels[0, 0] = -100
    segment_ids = torch.tensor([[0, 0, 1, 1, -1], [2, 2, 2, 0, 0]])
    assert torch.autograd.gradcheck(lambda x: ops.sequence_logprobs(x, labels, temperature=0.7), (logits,))
    assert torch.autograd.gradcheck(
        lambda x: ops.sequence_logprobs(x[:, 1:], labels[:, 1:], segment_ids=segment_ids[:, 1:],
                                        num_segments=3, reduction="mean"), (logits,))
    assert torch.autograd.gradcheck(lambda x: ops.sequence_logprobs(x, labels, reduction="none"), (logits,))


def test_gradcheck_linear(seed):
    hidden = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (2, 4))
    labels[1, :2] = -100
    fn = lambda h, w, b: ops.linear_sequence_logprobs(h, w, labels, bias=b, temperature=1.3, chunk_size=2)
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


@pytest.mark.parametrize("use_triton", [False, True])
def test_opcheck(seed, use_triton):
    logits = torch.randn(2, 5, 17)[:, :4]
    labels = torch.randint(0, 17, (2, 4))
    labels[0, 1] = -100
    for inplace in (False, True):
        torch.library.opcheck(torch.ops.prefrank.sequence_logprobs_fwd,
                              (logits.clone().requires_grad_(), labels, -100, 0.7, inplace, use_triton))
    _, lse = torch.ops.prefrank.sequence_logprobs_fwd(logits, labels, -100, 0.7, False, use_triton)
    torch.library.opcheck(torch.ops.prefrank.sequence_logprobs_bwd,
                          (torch.randn(2, 4), logits, labels, lse, -100, 0.7, use_triton))
    torch.library.opcheck(torch.ops.prefrank.sequence_logprobs_bwd_,
                          (torch.randn(2, 4), logits.contiguous(), labels, lse, -100, 0.7, use_triton))


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("chunk_size,frozen_head", [(0, False), (3, False), (3, True)])
def test_opcheck_linear(seed, use_triton, chunk_size, frozen_head):
    hidden, weight, bias, labels = _linear_case(B=2, T=7, H=5, V=13)
    h, y = hidden.reshape(-1, 5), labels.reshape(-1)
    args = (h.clone().requires_grad_(), weight.clone().requires_grad_(not frozen_head), bias, y, -100, 0.7,
            chunk_size, frozen_head, use_triton)
    # chunk_size 0 keeps the labelled tokens' logits: an output with a data-dependent row count, which
    # opcheck's aot_dispatch_dynamic check cannot return from a traced graph; the fullgraph compile tests in
    # test_logprobs_oplayer.py cover it (forward and backward, static and dynamic shapes)
    # chunk_size 0 keeps the labelled tokens' logits as the op's third output and the eager backward turns that
    # buffer into the gradient (donated, never exposed by linear_sequence_logprobs); opcheck's
    # aot_dispatch_dynamic util returns it and compares it after the backward, so it is run without that util
    # there: the fullgraph compile tests of test_logprobs_oplayer.py cover that configuration end to end
    utils = [u for u in torch.library._OPCHECK_DEFAULT_UTILS if not (chunk_size == 0 and "aot_dispatch" in u)]
    torch.library.opcheck(torch.ops.prefrank.linear_sequence_logprobs_fwd, args, test_utils=utils)
    if frozen_head:
        return
    _, lse, saved = torch.ops.prefrank.linear_sequence_logprobs_fwd(h, weight, bias, y, -100, 0.7, chunk_size,
                                                                   False, use_triton)
    assert saved.shape == ((int((y != -100).sum()), 13) if chunk_size == 0 else (0, 13))
    for op in (torch.ops.prefrank.linear_sequence_logprobs_bwd, torch.ops.prefrank.linear_sequence_logprobs_bwd_):
        torch.library.opcheck(op, (torch.randn(14), h, weight, bias, y, lse, saved.clone(), -100, 0.7, chunk_size,
                                   True, True, True, use_triton))


def test_torch_compile_smoke(seed):
    logits, labels = _case(2, 6, 40)
    segment_ids = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, -1, -1]])

    def fn(x):
        return (ops.sequence_logprobs(x, labels).sum()
                + ops.sequence_logprobs(x, labels, segment_ids=segment_ids, num_segments=3).sum())

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    x = logits.clone().requires_grad_()
    xc = logits.clone().requires_grad_()
    eager = fn(x)
    out = compiled(xc)
    _assert_close(out, eager, scale=10)
    eager.backward()
    out.backward()
    _assert_close(xc.grad, x.grad)


def test_cuda_dispatch_is_registered():
    for name in ("sequence_logprobs_fwd", "sequence_logprobs_bwd", "sequence_logprobs_bwd_",
                 "linear_sequence_logprobs_fwd", "linear_sequence_logprobs_bwd", "linear_sequence_logprobs_bwd_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"prefrank::{name}", "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"prefrank::{name}", "CPU"), name


def test_reference_backend_is_the_reference(seed):
    logits, labels = _case(2, 4, 20)
    with ops.use_backend("reference"):
        out = ops.sequence_logprobs(logits, labels, temperature=0.7)
    expected = reference.sequence_logprobs(logits, labels, temperature=0.7)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_matches_reference(seed, dtype):
    """The compiled Triton kernels on a GPU (skipped without one; benchmarks/gpu.sh runs it)."""
    logits, labels = _case(4, 100, 50257, dtype=dtype)
    logits, labels = logits.cuda()[:, :-1], labels.cuda()[:, 1:]
    _check_against_reference("triton", logits, labels, temperature=0.7, scale=100)
    segment_ids = torch.randint(-1, 3, labels.shape, device="cuda")
    _check_against_reference("triton", logits, labels, segment_ids=segment_ids, num_segments=3, scale=100)
    x, xr = logits.detach().clone().requires_grad_().clone(), logits.detach().clone().requires_grad_()
    out = ops.sequence_logprobs(x, labels, temperature=0.7, inplace_backward=True)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (grad_ref,) = torch.autograd.grad(reference.sequence_logprobs(xr, labels, temperature=0.7).sum(), xr)
    assert grad.data_ptr() == x.data_ptr()
    _assert_close(grad, grad_ref, scale=100)
    hidden, weight, bias, labels = (t.cuda() for t in _linear_case(torch.float32))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = ops.linear_sequence_logprobs(h, w, labels, bias=bias, chunk_size=4)
    ref = reference.linear_sequence_logprobs(hr, wr, labels, bias=bias)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(out.sum(), (h, w))
    for g, r in zip(grads, torch.autograd.grad(ref.sum(), (hr, wr)), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,error,match", [
    ("label_too_big", ValueError, "labels"),
    ("label_negative", ValueError, "labels"),
    ("shape_mismatch", ValueError, "labels must have shape"),
    ("vocab_stride", ValueError, "unit stride"),
    ("segment_out_of_range", ValueError, "segment_ids"),
    ("segment_below_minus_one", ValueError, "segment_ids"),
    ("num_segments_missing", ValueError, "num_segments"),
    ("num_segments_alone", ValueError, "num_segments"),
    ("integer_logits", TypeError, "logits"),
    ("float_labels", TypeError, "labels"),
    ("bad_temperature", ValueError, "temperature"),
    ("bad_reduction", ValueError, "reduction"),
    ("one_dim_logits", ValueError, "logits"),
])
def test_bad_inputs(case, error, match):
    logits = torch.randn(2, 3, 10)
    labels = torch.randint(0, 10, (2, 3))
    kwargs = {}
    if case == "label_too_big":
        labels[1, 2] = 10
    elif case == "label_negative":
        labels[0, 0] = -1
    elif case == "shape_mismatch":
        labels = labels[:, :2]
    elif case == "vocab_stride":
        logits = torch.randn(2, 10, 3).transpose(1, 2)
    elif case in ("segment_out_of_range", "segment_below_minus_one"):
        kwargs = dict(segment_ids=torch.full((2, 3), 4 if case == "segment_out_of_range" else -2),
                      num_segments=4)
    elif case == "num_segments_missing":
        kwargs = dict(segment_ids=torch.zeros(2, 3, dtype=torch.int64))
    elif case == "num_segments_alone":
        kwargs = dict(num_segments=3)
    elif case == "integer_logits":
        logits = torch.randint(0, 5, (2, 3, 10))
    elif case == "float_labels":
        labels = labels.float()
    elif case == "bad_temperature":
        kwargs = dict(temperature=0.0)
    elif case == "bad_reduction":
        kwargs = dict(reduction="max")
    elif case == "one_dim_logits":
        logits = torch.randn(10)
    before = logits.clone()
    with pytest.raises(error, match=match):
        ops.sequence_logprobs(logits, labels, **kwargs)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("case,error,match", [
    ("weight_shape", ValueError, "weight"),
    ("weight_dtype", TypeError, "weight"),
    ("bias_shape", ValueError, "bias"),
    ("label_too_big", ValueError, "labels"),
    ("chunk_size", ValueError, "chunk_size"),
    ("labels_shape", ValueError, "labels"),
])
def test_linear_bad_inputs(case, error, match):
    hidden, weight, bias, labels = _linear_case()
    kwargs = dict(bias=bias)
    if case == "weight_shape":
        weight = weight[:, :-1]
    elif case == "weight_dtype":
        weight = weight.double()
    elif case == "bias_shape":
        kwargs = dict(bias=bias[:-1])
    elif case == "label_too_big":
        labels[0, 5] = weight.shape[0]
    elif case == "chunk_size":
        kwargs["chunk_size"] = 0
    elif case == "labels_shape":
        labels = labels[:, 1:]
    with pytest.raises(error, match=match):
        ops.linear_sequence_logprobs(hidden, weight, labels, **kwargs)
