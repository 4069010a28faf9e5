"""Shared checks of the op layer (issue #11) that every op family's and the losses' tests use:

- :func:`assert_compiles`: ``torch.compile(fullgraph=True)`` traces forward AND backward (any graph break or
  data-dependent guard fails) and gives the eager result and gradients;
- :func:`assert_no_host_sync_on_cuda`: the forward runs on CUDA-device fake tensors (no GPU needed) with
  debug mode off; any data-dependent tensor→Python conversion (``.item()``, ``.tolist()``, ``bool(t)``,
  data-dependent ``.nonzero()``) raises ``DataDependentOutputException`` — the CPU-visible proxy for "no
  device synchronisation in the training step".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import prefrank

BACKENDS = ("aot_eager", "inductor")


def _grads(fn: Callable, tensors: Sequence[torch.Tensor], args, kwargs):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*leaves, *args, **kwargs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    floats = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
    total = sum((o.float() * (i + 1.5)).sum() for i, o in enumerate(floats))
    diff = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(total, diff, allow_unused=True) if diff else ()
    return [o.detach() for o in outs if isinstance(o, torch.Tensor)], list(grads)


def assert_compiles(fn: Callable, tensors: Sequence[torch.Tensor], *args, backend: str = "aot_eager",
                    dynamic: bool = False, rtol: float = 1e-5, atol: float = 1e-6, **kwargs) -> None:
    """``fn(*tensors, *args, **kwargs)`` compiled with fullgraph=True equals eager, forward and backward.

    Float tensors in ``tensors`` become leaves that require grad; the backward is taken through a weighted sum
    of every differentiable output.
    """
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend, dynamic=dynamic)
    eager_out, eager_grads = _grads(fn, tensors, args, kwargs)
    comp_out, comp_grads = _grads(compiled, tensors, args, kwargs)
    assert len(eager_out) == len(comp_out)
    for e, c in zip(eager_out, comp_out):
        torch.testing.assert_close(c, e, rtol=rtol, atol=atol, equal_nan=False)
    for e, c in zip(eager_grads, comp_grads):
        if e is None or c is None:
            assert e is None and c is None
        else:
            torch.testing.assert_close(c, e, rtol=rtol, atol=atol, equal_nan=False)


def assert_no_host_sync_on_cuda(fn: Callable, tensors: Sequence[torch.Tensor], *args, **kwargs):
    """Run ``fn`` forward on CUDA-device fake copies of ``tensors`` (debug mode off); returns the fake output.

    Raises ``DataDependentOutputException`` (failing the test) if ``fn`` reads a value back to the host.
    """
    with prefrank.debug(False), FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fakes = [mode.from_tensor(t, static_shapes=True).to("cuda") for t in tensors]
        return fn(*fakes, *args, **kwargs)
