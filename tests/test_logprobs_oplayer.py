"""The logprobs family's op layer (#11) and edge cases (#13): impl= per call, fullgraph torch.compile of both
ops forward+backward (aot_eager and inductor, static and dynamic shapes), no host synchronisation on CUDA
fake tensors, double backward refused, empty inputs, and the data checks on CPU tensors."""

import pytest
import torch

from prefrank import ops, reference
from tests.compile_checks import BACKENDS, assert_compiles, assert_no_host_sync_on_cuda


def _sequence_case(B=2, T=6, V=40):
    logits = torch.randn(B, T, V) * 2
    labels = torch.randint(0, V, (B, T))
    labels[0, 0] = -100
    return logits, labels


def _linear_case(B=2, T=7, H=8, V=29):
    hidden = torch.randn(B, T, H)
    weight = torch.randn(V, H) / H**0.5
    bias = torch.randn(V)
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100  # a prompt
    return hidden, weight, bias, labels


SEGMENTS = torch.tensor([[0, 0, 0, 1, 1, -1, 1], [2, 2, 2, 2, -1, -1, 0]])
SEQUENCE_OPTIONS = [dict(), dict(reduction="mean", temperature=0.7), dict(reduction="none"),
                    dict(segment_ids=SEGMENTS[:, :6], num_segments=3, reduction="mean")]
LINEAR_OPTIONS = [dict(), dict(reduction="mean", temperature=0.7, chunk_size=4), dict(reduction="none"),
                  dict(segment_ids=SEGMENTS, num_segments=3)]


# ---------------------------------------------------------------------------------------------------------
# impl= per call
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["auto", "reference", "triton"])
def test_impl_keyword(seed, impl):
    logits, labels = _sequence_case()
    hidden, weight, bias, hlabels = _linear_case()
    expected = reference.sequence_logprobs(logits, labels, temperature=0.7)
    torch.testing.assert_close(ops.sequence_logprobs(logits, labels, temperature=0.7, impl=impl), expected)
    expected = reference.linear_sequence_logprobs(hidden, weight, hlabels, bias=bias)
    torch.testing.assert_close(ops.linear_sequence_logprobs(hidden, weight, hlabels, bias=bias, impl=impl), expected,
                               rtol=1e-5, atol=1e-5)


def test_impl_keyword_overrides_backend_and_is_checked(seed, monkeypatch):
    logits, labels = _sequence_case()
    calls = []
    original = reference.sequence_logprobs
    monkeypatch.setattr(reference, "sequence_logprobs", lambda *a, **k: calls.append(1) or original(*a, **k))
    with ops.use_backend("reference"):
        ops.sequence_logprobs(logits, labels, impl="triton")
        assert not calls
        ops.sequence_logprobs(logits, labels)
        assert calls
    for fn, args in ((ops.sequence_logprobs, (logits, labels)),
                     (ops.linear_sequence_logprobs, _linear_case()[:2] + (_linear_case()[3],))):
        with pytest.raises(ValueError, match="impl"):
            fn(*args, impl="cuda")


# ---------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) forward + backward; no host sync on CUDA
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dynamic", [False, True])
def test_sequence_logprobs_compiles(seed, backend, dynamic):
    logits, labels = _sequence_case()
    for options in SEQUENCE_OPTIONS:
        assert_compiles(lambda x, **kw: ops.sequence_logprobs(x, labels, **kw), [logits], backend=backend,
                        dynamic=dynamic, **options)
    # the usual shift: a strided view, and the in-place backward (on an activation, not a leaf)
    assert_compiles(lambda x: ops.sequence_logprobs((x * 1.0)[:, :-1], labels[:, 1:], inplace_backward=True),
                    [logits], backend=backend, dynamic=dynamic)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dynamic", [False, True])
def test_linear_sequence_logprobs_compiles(seed, backend, dynamic):
    hidden, weight, bias, labels = _linear_case()
    for options in LINEAR_OPTIONS:
        assert_compiles(lambda h, w, b, **kw: ops.linear_sequence_logprobs(h, w, labels, bias=b, **kw),
                        [hidden, weight, bias], backend=backend, dynamic=dynamic, rtol=1e-5, atol=1e-5,
                        **options)
    # frozen lm-head (only hidden requires grad: the two-GEMM path) and no bias
    assert_compiles(lambda h: ops.linear_sequence_logprobs(h, weight, labels, bias=bias, temperature=1.3),
                    [hidden], backend=backend, dynamic=dynamic, rtol=1e-5, atol=1e-5)
    assert_compiles(lambda h, w: ops.linear_sequence_logprobs(h, w, labels, chunk_size=2), [hidden, weight],
                    backend=backend, dynamic=dynamic, rtol=1e-5, atol=1e-5)


def test_no_host_sync_on_cuda(seed):
    logits, labels = _sequence_case()
    for options in SEQUENCE_OPTIONS:
        options = dict(options)
        segment_ids = options.pop("segment_ids", torch.zeros_like(labels))
        with_segments = "num_segments" in options

        def fn(x, y, s, options=options, with_segments=with_segments):
            return ops.sequence_logprobs(x, y, segment_ids=s if with_segments else None, **options)

        assert assert_no_host_sync_on_cuda(fn, [logits, labels, segment_ids]).device.type == "cuda"
    hidden, weight, bias, labels = _linear_case()
    for options in LINEAR_OPTIONS:
        options = dict(options)
        segment_ids = options.pop("segment_ids", torch.zeros_like(labels))
        with_segments = "num_segments" in options

        def fn(h, w, b, y, s, options=options, with_segments=with_segments):
            return ops.linear_sequence_logprobs(h, w, y, bias=b, segment_ids=s if with_segments else None,
                                                **options)

        assert assert_no_host_sync_on_cuda(fn, [hidden, weight, bias, labels, segment_ids]).device.type == "cuda"


# ---------------------------------------------------------------------------------------------------------
# double backward
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("inplace", [False, True])
def test_double_backward_raises(seed, inplace):
    logits, labels = _sequence_case()
    x = logits.double().requires_grad_()
    with pytest.raises(RuntimeError, match="double backward of prefrank.sequence_logprobs"):
        y = x * 1.0
        out = ops.sequence_logprobs(y, labels, inplace_backward=inplace)
        (g,) = torch.autograd.grad(out.sum(), y, create_graph=True)
        g.pow(2).sum().backward()
    hidden, weight, bias, hlabels = _linear_case()
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    with pytest.raises(RuntimeError, match="double backward of prefrank.linear_sequence_logprobs"):
        out = ops.linear_sequence_logprobs(h, w, hlabels)
        (g,) = torch.autograd.grad(out.sum(), h, create_graph=True)
        g.pow(2).sum().backward()


# ---------------------------------------------------------------------------------------------------------
# #13: empty inputs and data checks (each fails on the old main)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["auto", "triton", "reference"])
@pytest.mark.parametrize("shape", [(2, 0, 7), (0, 5, 7), (0, 0, 7), (3, 0, 2, 7)])
def test_sequence_empty_inputs(impl, shape):
    """T = 0 (or no rows) is a defined result: zeros per sequence / empty, zero gradient."""
    logits = torch.randn(shape).requires_grad_()
    labels = torch.zeros(shape[:-1], dtype=torch.int64)
    for reduction in ("sum", "mean", "none"):
        out = ops.sequence_logprobs(logits, labels, reduction=reduction, impl=impl)
        expected_shape = shape[:-1] if reduction == "none" else shape[:-2]
        assert out.shape == expected_shape and torch.equal(out, torch.zeros(expected_shape))
        (grad,) = torch.autograd.grad(out.sum(), logits, allow_unused=True, materialize_grads=True)
        assert grad.shape == logits.shape
    out = ops.sequence_logprobs(logits, labels, segment_ids=labels, num_segments=2, impl=impl)
    assert torch.equal(out, torch.zeros(2))


@pytest.mark.parametrize("impl", ["auto", "triton", "reference"])
def test_linear_empty_inputs(impl):
    hidden, weight = torch.randn(2, 0, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    out = ops.linear_sequence_logprobs(hidden, weight, torch.zeros(2, 0, dtype=torch.int64), impl=impl)
    assert torch.equal(out, torch.zeros(2))
    grads = torch.autograd.grad(out.sum(), (hidden, weight), materialize_grads=True)
    assert torch.equal(grads[1], torch.zeros(5, 8))


@pytest.mark.parametrize("impl", ["auto", "triton", "reference"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_sequence_nonfinite_logits_at_a_labelled_token_raise(impl, poison):
    logits, labels = _sequence_case()
    labels[1, 2] = 5
    bad = logits.clone()
    bad[1, 2, 7] = poison
    with pytest.raises(ValueError, match="logits .*NaN or \\+inf"):
        ops.sequence_logprobs(bad, labels, impl=impl)
    # a NaN on an ignored token is never read
    labels[1, 2] = -100
    out = ops.sequence_logprobs(bad, labels, impl=impl)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference.sequence_logprobs(logits, labels))
    # -inf is a defined probability 0 elsewhere in the row
    bad[1, 2, 7] = float("-inf")
    labels[1, 2] = 5
    assert torch.isfinite(ops.sequence_logprobs(bad, labels, impl=impl)).all()


@pytest.mark.parametrize("impl", ["auto", "triton", "reference"])
def test_linear_nonfinite_hidden_at_a_labelled_token_raises(impl):
    hidden, weight, bias, labels = _linear_case()
    hidden[1, 3, 0] = float("nan")
    with pytest.raises(ValueError, match="hidden @ weight.T|logits"):
        ops.linear_sequence_logprobs(hidden, weight, labels, bias=bias, impl=impl)
    labels[1, 3] = -100
    assert torch.isfinite(ops.linear_sequence_logprobs(hidden, weight, labels, bias=bias, impl=impl)).all()


def test_nonfinite_and_bad_labels_on_cuda_give_nan_without_a_sync():
    """On CUDA (debug off) nothing is read back: the fake run passes; the kernels then write NaN (documented)."""
    logits, labels = _sequence_case()
    logits[0, 1, 3] = float("nan")
    labels[1, 1] = 10**6
    out = assert_no_host_sync_on_cuda(lambda x, y: ops.sequence_logprobs(x, y), [logits, labels])
    assert out.shape == (2,) and out.device.type == "cuda"


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_bad_label_in_kernels_is_nan_not_out_of_bounds(impl):
    """What a CUDA call does without the data check: the kernel itself gives NaN for a label outside [0, V)."""
    logits, labels = _sequence_case()
    labels[1, 2] = 40  # V = 40
    labels[0, 3] = -5
    logp, _ = torch.ops.prefrank.sequence_logprobs_fwd(logits, labels, -100, 1.0, False, impl == "triton")
    assert torch.isnan(logp[1, 2]) and torch.isnan(logp[0, 3])
    mask = torch.ones_like(logp, dtype=torch.bool)
    mask[1, 2] = mask[0, 3] = False
    assert torch.isfinite(logp[mask]).all()


@pytest.mark.parametrize("op", ["sequence", "linear"])
@pytest.mark.parametrize("label", [-1, 29, 10**6])
def test_labels_outside_the_vocabulary_raise(op, label):
    hidden, weight, bias, labels = _linear_case()  # V = 29
    labels[1, 4] = label
    with pytest.raises(ValueError, match="labels must lie in \\[0, 29\\)"):
        if op == "sequence":
            ops.sequence_logprobs(hidden @ weight.t(), labels)
        else:
            ops.linear_sequence_logprobs(hidden, weight, labels)
    with pytest.raises(ValueError, match="labels must lie in"):
        reference.sequence_logprobs(hidden @ weight.t(), labels)
