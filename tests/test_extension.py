"""The compiled extension: built with CUDA kernels here, every .cu compiles spill-free for sm_80/sm_90,
and a missing or stale build raises an actionable ImportError (never a silent fallback)."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

from prefrank import _extension

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc").glob("*.cu"))
NVCC = shutil.which("nvcc")


def test_extension_is_current():
    assert _extension.available()
    assert _extension._C.source_hash == _extension._source_hash(ROOT / "csrc")


# every public custom op (torch.ops.prefrank.*) and the CUDA C++ kernels behind the PL ones (prefrank_C)
PUBLIC_OPS = ("plackett_luce_nll", "plackett_luce_nll_backward", "sequence_logprobs_fwd", "sequence_logprobs_bwd",
              "sequence_logprobs_bwd_", "linear_sequence_logprobs_fwd", "linear_sequence_logprobs_bwd",
              "linear_sequence_logprobs_bwd_", "sortnet_forward", "sortnet_backward", "sortnet_loss_forward",
              "sortnet_loss_backward")


def test_every_public_op_has_cpu_and_cuda_kernels():
    import prefrank.ops  # noqa: F401  (registers the custom ops)

    for op in PUBLIC_OPS:
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"prefrank::{op}", key), (op, key)


@pytest.mark.skipif(not (torch.version.cuda and NVCC), reason="needs a CUDA build of torch and nvcc")
def test_cuda_kernels_are_built_and_registered():
    assert _extension.has_cuda_kernels()
    for op in ("plackett_luce_nll_fwd", "plackett_luce_nll_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"prefrank_C::{op}", "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"prefrank_C::{op}", "CPU")


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_without_spills(tmp_path, source):
    cmd = [NVCC, "-c", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "--resource-usage",
           "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
           "-Xcompiler", "-fPIC", f"-I{ROOT / 'csrc'}", str(source), "-o", str(tmp_path / "k.o")]
    log = subprocess.run(cmd, capture_output=True, text=True)
    assert log.returncode == 0, log.stderr
    usage = log.stdout + log.stderr
    assert "sm_80" in usage and "sm_90" in usage
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", usage)]
    assert spills and not any(spills), usage


AARCH64_CXX = shutil.which("aarch64-linux-gnu-g++")
CPU_KERNEL_SOURCES = sorted((ROOT / "csrc").glob("*_cpu.cpp"))


@pytest.mark.skipif(AARCH64_CXX is None, reason="needs the aarch64 cross compiler (Debian: g++-aarch64-linux-gnu)")
@pytest.mark.parametrize("source", CPU_KERNEL_SOURCES, ids=lambda p: p.name)
def test_cpu_kernels_compile_for_aarch64(tmp_path, source):
    """Grace/Graviton hosts build the CPU kernels too: x86-only attributes stay behind their guards (the PL
    kernel's target_clones("avx2") once broke this build)."""
    cmd = [AARCH64_CXX, "-c", "-O3", "-std=c++20", "-fopenmp", "-fPIC", "-DPREFRANK_WITH_CUDA=0",
           "-DTORCH_EXTENSION_NAME=_C", f"-I{ROOT / 'csrc'}", f"-I{sysconfig.get_paths()['include']}",
           *(f"-I{path}" for path in include_paths()), str(source), "-o", str(tmp_path / "k.o")]
    log = subprocess.run(cmd, capture_output=True, text=True)
    assert log.returncode == 0, log.stderr[-4000:]


def test_stale_sources_change_the_hash(tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    before = _extension._source_hash(csrc)
    (csrc / "plackett_luce_math.h").write_text((csrc / "plackett_luce_math.h").read_text() + "\n// edit\n")
    assert _extension._source_hash(csrc) != before


def test_missing_extension_raises_actionable_import_error():
    code = ("import sys; sys.modules['prefrank._C'] = None\n"
            "import torch, prefrank.ops as ops\n"
            "try:\n    ops.plackett_luce_nll(torch.randn(2, 3))\n"
            "except ImportError as e:\n    print('ERR', e)\n"
            "with ops.use_backend('reference'):\n    print('REF', ops.plackett_luce_nll(torch.randn(2, 3)).shape)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PREFRANK_BACKEND": "auto"}).stdout
    assert "ERR" in out and "make build" in out and "pip install --no-build-isolation" in out
    assert "REF torch.Size([2])" in out
