"""Per-call impl, per-block use_backend and the process default; thread isolation of use_backend; debug()."""

import threading

import pytest
import torch

import prefrank
from prefrank import _checks, backend


def test_resolve_order():
    assert backend.resolve("reference") == "reference"
    assert backend.resolve("auto") == backend.get_backend()
    with backend.use_backend("reference"):
        assert backend.resolve("auto") == "reference"
        assert backend.resolve("triton") == "triton"
        with backend.use_backend("auto"):
            assert backend.resolve("auto") == "auto"
        assert backend.resolve("auto") == "reference"


@pytest.mark.parametrize("bad", ["gpu", None, 1])
def test_bad_impl_names_the_argument(bad):
    with pytest.raises(ValueError, match="impl must be one of"):
        backend.resolve(bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.set_backend(bad)


def test_use_backend_is_per_thread():
    seen = {}
    inside = threading.Event()
    release = threading.Event()

    def worker():
        with backend.use_backend("reference"):
            inside.set()
            release.wait(5)
            seen["worker"] = backend.get_backend()

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(5)
    seen["main"] = backend.get_backend()
    release.set()
    thread.join()
    assert seen == {"worker": "reference", "main": "auto"}


def test_debug_mode_gates_data_checks(monkeypatch):
    monkeypatch.delenv("PREFRANK_DEBUG", raising=False)
    cpu = torch.zeros(2)
    cuda_like = torch.empty(2, device="meta")
    assert _checks.data_checks_enabled(cpu)
    assert not _checks.data_checks_enabled(cpu, cuda_like)
    with prefrank.debug():
        assert _checks.data_checks_enabled(cuda_like)
        with prefrank.debug(False):
            assert not _checks.data_checks_enabled(cuda_like)
    monkeypatch.setenv("PREFRANK_DEBUG", "1")
    assert _checks.data_checks_enabled(cuda_like)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        with prefrank.debug("yes"):
            pass


@pytest.mark.parametrize("traces_contextvars", [False] + [True] * backend._DYNAMO_TRACES_CONTEXTVARS)
def test_compiled_call_sees_the_block_it_runs_in(monkeypatch, traces_contextvars):
    """torch >= 2.14 traces the ContextVar and recompiles per block; older dynamo cannot trace it, so the
    block seen while tracing is a constant (the fallback is exercised here on any torch)."""
    monkeypatch.setattr(backend, "_DYNAMO_TRACES_CONTEXTVARS", traces_contextvars)
    torch._dynamo.reset()
    seen = torch.compile(lambda x: x + 1 if backend.resolve("auto") == "reference" else x - 1, fullgraph=True)
    x = torch.zeros(2)
    with backend.use_backend("reference"):
        assert seen(x).tolist() == [1.0, 1.0]
    if traces_contextvars:  # a new block recompiles
        assert seen(x).tolist() == [-1.0, -1.0]
    torch._dynamo.reset()
