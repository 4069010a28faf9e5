"""Hypothesis fuzz of sequence_logprobs / linear_sequence_logprobs (#13) against prefrank.reference: random
shapes including 0 and 1, dtypes, strided logits (``logits[:, :-1]``), segment ids, reductions, temperatures,
extreme values (equal logits, ±1e4, -inf, NaN/+inf, labels outside the vocabulary). Each example gives the
same result and gradient as the reference, or raises the same exception type as the reference."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefrank import ops, reference

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXTREMES = ("normal", "equal", "huge", "neg_inf", "nan", "pos_inf")


def _tolerances(dtype, scale):
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-9 * scale)
    return dict(rtol=2e-5, atol=2e-5 * scale)


def _grad_tolerances(dtype, zmax):
    """zmax = max |logit/τ| times (lm-head) the largest hidden value: exp(z − lse) of a logit of size |z| is
    only known to about eps·|z| (one rounding of z), so huge logits carry that much absolute gradient noise."""
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    noise = 8 * acc_eps * zmax
    if dtype in (torch.float16, torch.bfloat16):  # the same fp32 value rounded once by each: ≤ 1 ulp apart
        eps = torch.finfo(dtype).eps
        return dict(rtol=2 * eps, atol=1e-6 + noise)
    tolerances = _tolerances(dtype, 1.0)
    tolerances["atol"] += noise
    return tolerances


def _finite_max(*tensors):
    return max([float(t[torch.isfinite(t)].abs().max()) for t in tensors if torch.isfinite(t).any()] + [1.0])


def _outcome(fn):
    try:
        return fn(), None
    except (ValueError, TypeError, RuntimeError) as err:
        return None, err


def _undefined_rows(t):
    """Values whose row has no defined softmax: NaN, +inf, or a row of -inf only."""
    return t.isnan() | t.isposinf() | (t == float("-inf")).all(-1, keepdim=True)


def _compare(ours, ref, dtype, scale, inputs_ours, inputs_ref, zmax, unread_rows=_undefined_rows):
    (out, err), (expected, ref_err) = ours, ref
    if err is not None or ref_err is not None:
        assert type(err) is type(ref_err), f"prefrank: {err!r}; reference: {ref_err!r}"
        return
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, equal_nan=False, **_tolerances(dtype, scale))
    upstream = torch.randn(out.shape, dtype=out.dtype)
    differentiable = [t for t in inputs_ours if t.requires_grad]
    if not differentiable or not out.requires_grad:
        return
    grads = torch.autograd.grad(out, differentiable, upstream, allow_unused=True, materialize_grads=True)
    if any(unread_rows(t).any() for t in inputs_ours):
        # such rows only on ignored tokens (else both raised): the naive reference's log_softmax backward
        # spreads NaN from rows it never scores; the kernels never read them
        assert all(torch.isfinite(g).all() for g in grads)
        return
    ref_grads = torch.autograd.grad(expected, [t for t in inputs_ref if t.requires_grad], upstream,
                                    allow_unused=True, materialize_grads=True)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g, r, equal_nan=False, **_grad_tolerances(dtype, zmax))


def _fill(shape, extreme, generator):
    values = torch.randn(shape, generator=generator, dtype=torch.float64) * 3
    if extreme == "equal":
        values.zero_()
    elif extreme == "huge":
        values *= 3000  # ~±1e4
    if values.numel() and extreme in ("neg_inf", "nan", "pos_inf"):
        spot = int(torch.randint(0, values.numel(), (1,), generator=generator))
        values.view(-1)[spot] = {"neg_inf": float("-inf"), "nan": float("nan"), "pos_inf": float("inf")}[extreme]
    return values


@st.composite
def _common(draw):
    return dict(B=draw(st.sampled_from([0, 1, 2, 3])), T=draw(st.sampled_from([0, 1, 2, 5])),
                extreme=draw(st.sampled_from(EXTREMES)), seed=draw(st.integers(0, 2**31 - 1)),
                reduction=draw(st.sampled_from(["sum", "mean", "none"])),
                temperature=draw(st.sampled_from([1.0, 0.5, 2.5])),
                segments=draw(st.booleans()), bad_label=draw(st.sampled_from([None, -1, "V"])),
                ignore_frac=draw(st.sampled_from([0.0, 0.3, 1.0])))


def _labels(c, V, generator):
    labels = torch.randint(0, V, (c["B"], c["T"]), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < c["ignore_frac"]] = -100
    if c["bad_label"] is not None and labels.numel():
        labels.view(-1)[0] = -1 if c["bad_label"] == -1 else V
    kwargs = dict(temperature=c["temperature"], reduction=c["reduction"])
    if c["segments"]:
        kwargs.update(segment_ids=torch.randint(-1, 3, labels.shape, generator=generator), num_segments=3)
    return labels, kwargs


@FUZZ
@given(c=_common(), V=st.sampled_from([1, 2, 7, 33]), strided=st.booleans(), requires_grad=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
def test_fuzz_sequence_logprobs(c, V, strided, requires_grad, dtype):
    generator = torch.Generator().manual_seed(c["seed"])
    values = _fill((c["B"], c["T"] + strided, V), c["extreme"], generator).to(dtype)
    labels, kwargs = _labels(c, V, generator)
    leaf = values.clone().requires_grad_(requires_grad)
    ref_leaf = values.clone().requires_grad_(requires_grad)
    logits = leaf[:, :-1] if strided else leaf  # the usual shift: a view with a row stride > V
    ref_logits = ref_leaf[:, :-1] if strided else ref_leaf
    ours = _outcome(lambda: ops.sequence_logprobs(logits, labels, **kwargs))
    ref = _outcome(lambda: reference.sequence_logprobs(ref_logits, labels, **kwargs))
    scale = max(c["T"], 1) * (1e4 if c["extreme"] == "huge" else 1.0)
    zmax = _finite_max(values.double()) / c["temperature"]
    _compare(ours, ref, dtype, scale, [leaf], [ref_leaf], zmax)
    assert torch.equal(leaf.detach(), values) or torch.isnan(values).any()  # the input is never modified


@FUZZ
@given(c=_common(), V=st.sampled_from([1, 5, 17]), H=st.sampled_from([1, 3, 8]), with_bias=st.booleans(),
       chunk_size=st.sampled_from([None, 1, 3]), frozen_weight=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fuzz_linear_sequence_logprobs(c, V, H, with_bias, chunk_size, frozen_weight, dtype):
    generator = torch.Generator().manual_seed(c["seed"])
    hidden = _fill((c["B"], c["T"], H), c["extreme"], generator).to(dtype)
    weight = (torch.randn(V, H, generator=generator, dtype=torch.float64) / H**0.5).to(dtype)
    bias = torch.randn(V, generator=generator, dtype=torch.float64).to(dtype) if with_bias else None
    labels, kwargs = _labels(c, V, generator)
    kwargs["chunk_size"] = chunk_size

    def leaves():
        return [hidden.clone().requires_grad_(), weight.clone().requires_grad_(not frozen_weight),
                None if bias is None else bias.clone().requires_grad_(not frozen_weight)]

    mine, theirs = leaves(), leaves()
    ours = _outcome(lambda: ops.linear_sequence_logprobs(mine[0], mine[1], labels, bias=mine[2], **kwargs))
    ref = _outcome(lambda: reference.linear_sequence_logprobs(theirs[0], theirs[1], labels, bias=theirs[2],
                                                              **kwargs))
    scale = max(c["T"], 1) * (1e4 if c["extreme"] == "huge" else 1.0)
    # ±inf hidden values make ±inf logits (+inf, NaN): the same unread-row rule as NaN/+inf logits
    hmax = _finite_max(hidden.double())
    zmax = hmax * _finite_max(weight.double()) * H / c["temperature"] * hmax
    _compare(ours, ref, dtype, scale, [t for t in mine if t is not None], [t for t in theirs if t is not None],
             zmax, unread_rows=lambda t: ~torch.isfinite(t))


def test_fuzz_is_not_vacuous():
    """The strategies above reach both outcomes: a checked error and a compared result (sanity of the test)."""
    logits = torch.randn(1, 2, 3)
    labels = torch.tensor([[0, 3]])
    with pytest.raises(ValueError):
        ops.sequence_logprobs(logits, labels)
    with pytest.raises(ValueError):
        reference.sequence_logprobs(logits, labels)
