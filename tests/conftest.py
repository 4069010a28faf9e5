"""Test harness. TRITON_INTERPRET must be set before anything imports triton, so it is set here, first."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("PREFRANK_POISON_OUTPUTS", "1")  # compiled ops allocate NaN-filled outputs

import pytest  # noqa: E402
import torch  # noqa: E402

from prefrank import backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_backend():
    """Every test starts on the default backend, whatever the previous one selected."""
    previous = backend.get_backend()
    yield
    backend.set_backend(previous)


@pytest.fixture
def seed(request):
    """A fresh seed per test (printed on failure through the test id), different across tests."""
    value = abs(hash(request.node.nodeid)) % (2**31)
    torch.manual_seed(value)
    print(f"seed={value}")  # shown with the output of a failing test
    return value
