"""Fuzz plackett_luce_nll against prefrank.reference (issue #13): random shapes (0 and 1 included), dtypes,
strided inputs and dim != -1, rankings / groups / masks with padding, extreme values (±1e4, -inf, NaN in
padding) and invalid inputs. The op and the oracle must agree: equal results (and gradients), or the same
exception type."""

import math

import pytest
import torch

from prefrank import ops, reference

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

DTYPES = (torch.float64, torch.float32, torch.bfloat16)
SPECIAL = (1e4, -1e4, float("-inf"), 0.0, 30.0)


@st.composite
def cases(draw):
    lists = draw(st.sampled_from([(3,), (2, 2), (1,), (), (0,)]))  # sampled_from, not integers: hypothesis
    K = draw(st.sampled_from([5, 2, 7, 1, 3, 0]))                   # would draw the empty cases too often
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = lists + (K,)
    scores = torch.randn(shape, generator=gen, dtype=torch.float64) * draw(st.sampled_from([1.0, 5.0]))
    if draw(st.booleans()) and scores.numel():  # extreme values
        idx = torch.randint(0, scores.numel(), (draw(st.integers(1, 3)),), generator=gen)
        scores.view(-1)[idx] = draw(st.sampled_from(SPECIAL))
    kwargs = {}
    mode = draw(st.sampled_from(["order", "ranking", "groups"]))
    valid = torch.ones(shape, dtype=torch.bool)
    if mode == "ranking":
        ranking = torch.argsort(torch.rand(shape, generator=gen), dim=-1)
        if draw(st.booleans()) and K:
            lengths = torch.randint(0, K + 1, lists + (1,), generator=gen)
            ranking = torch.where(torch.arange(K) < lengths, ranking, -1)
        valid = torch.zeros(shape + (K + 1,), dtype=torch.bool).scatter_(
            -1, torch.where(ranking >= 0, ranking, K)[..., None], True)[..., :K].any(-2) if K else valid
        if draw(st.integers(0, 9)) == 0 and K >= 2:  # invalid: a repeated item or an index out of range
            ranking.view(-1, K)[:, 1] = draw(st.sampled_from([0, K, -3]))
        kwargs["ranking"] = ranking.to(draw(st.sampled_from([torch.int64, torch.int32])))
    elif mode == "groups":
        groups = torch.randint(-1, max(K, 1), shape, generator=gen)
        valid = groups >= 0
        kwargs["groups"] = groups.to(draw(st.sampled_from([torch.int64, torch.uint8])) if not (groups < 0).any()
                                     else torch.int64)
        kwargs["ties"] = draw(st.sampled_from(["breslow", "efron"]))
    if draw(st.booleans()):
        mask = torch.rand(shape, generator=gen) > 0.3
        valid = valid & mask
        kwargs["mask"] = mask
    nan_in = draw(st.sampled_from(["none", "padding", "padding", "scored"]))
    if nan_in != "none" and scores.numel():
        pick = ~valid if nan_in == "padding" else valid
        scores = torch.where(pick & (torch.rand(shape, generator=gen) < 0.5), float("nan"), scores)
    kwargs["top_k"] = draw(st.sampled_from([None, None, 1, 2, K + 1]))
    kwargs["reduction"] = draw(st.sampled_from(["none", "none", "sum", "mean"]))
    scores = scores.to(dtype)
    dim = -1
    if len(shape) >= 2 and draw(st.booleans()):  # items along dim 0: strided views of every tensor
        dim = 0
        scores = scores.movedim(-1, 0)
        kwargs = {k: (v.movedim(-1, 0) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    if draw(st.booleans()) and scores.numel():  # non-contiguous scores: every other element of a buffer
        buffer = torch.empty(scores.shape[:-1] + (2 * scores.shape[-1],), dtype=dtype)
        buffer[..., ::2] = scores
        scores = buffer[..., ::2]
    return scores, dict(kwargs, dim=dim)


def _run(fn, scores, kwargs):
    x = scores.clone().requires_grad_()
    try:
        out = fn(x, **kwargs)
    except (ValueError, TypeError) as err:
        return type(err), None, None
    grad = None
    if out.numel() and torch.isfinite(scores.float()).all():
        weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        (grad,) = torch.autograd.grad((out * weights).sum(), x, allow_unused=True)
    return None, out.detach(), grad


@hypothesis.settings(max_examples=200, deadline=None, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(cases())
def test_op_agrees_with_reference(case):
    scores, kwargs = case
    err_op, out_op, grad_op = _run(ops.plackett_luce_nll, scores, kwargs)
    err_ref, out_ref, grad_ref = _run(reference.plackett_luce_nll, scores.double() if scores.dtype !=
                                      torch.float64 else scores, kwargs)
    assert err_op == err_ref, (err_op, err_ref)
    if err_op is not None:
        return
    finite = scores[torch.isfinite(scores)].double().abs()
    scale = 1.0 + (finite.max().item() if finite.numel() else 0.0)
    n_items = max(scores.shape[kwargs["dim"]], 1)
    if scores.dtype == torch.float64:
        tol = dict(rtol=1e-9, atol=1e-9 * scale * n_items)
    else:  # fp32 accumulation vs the fp64 oracle of the same input values
        tol = dict(rtol=2e-5, atol=2e-6 * scale * n_items)
    assert out_op.dtype == (torch.float64 if scores.dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out_op.double(), out_ref.double(), **tol)
    if grad_op is not None and math.isfinite(out_ref.double().abs().sum().item()):
        grad_tol = dict(rtol=1e-7, atol=1e-7) if scores.dtype == torch.float64 else (
            dict(rtol=1e-4, atol=1e-4) if scores.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2))
        assert grad_op.dtype == scores.dtype
        torch.testing.assert_close(grad_op.double(), grad_ref.double().to(scores.dtype).double(), **grad_tol)
