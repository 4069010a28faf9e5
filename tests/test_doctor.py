"""`python -m prefrank.doctor` / `prefrank.info()`: the facts a bug report needs, correct for this process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import prefrank
from prefrank import _extension, backend, doctor

ROOT = Path(__file__).resolve().parent.parent


def test_info_describes_this_process():
    facts = prefrank.info()
    assert set(facts) == {"prefrank", "python", "torch", "triton", "nvcc", "extension", "backend", "environment"}
    assert facts["prefrank"]["version"] == prefrank.__version__
    assert facts["prefrank"]["location"] == str(Path(prefrank.__file__).parent)
    assert facts["prefrank"]["install"] == "source tree"  # the tests run from the checkout
    assert facts["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert facts["torch"]["version"] == torch.__version__ and facts["torch"]["cuda"] == torch.version.cuda
    assert facts["torch"]["cuda_available"] == torch.cuda.is_available()
    assert len(facts["torch"]["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    extension = facts["extension"]
    assert extension["loaded"] is _extension.available() and extension["stale"] is False
    assert extension["source_hash"] == _extension._C.source_hash
    assert extension["cuda_kernels"] == _extension.has_cuda_kernels()
    assert "make build" in extension["rebuild"]
    # a build by this setup.py records what it was built against (None only for builds by an older one)
    assert extension["build"] is None or extension["build"]["source_hash"] == extension["source_hash"]
    json.dumps(facts)  # pasteable as JSON


def test_info_reports_the_backend_default_and_environment(monkeypatch):
    monkeypatch.setenv("PREFRANK_DEBUG", "1")
    with backend.use_backend("reference"):
        facts = prefrank.info()
    assert facts["backend"] == {"default": "reference", "debug": True}
    assert facts["environment"]["PREFRANK_DEBUG"] == "1"


def test_stale_and_missing_builds_are_reported(monkeypatch):
    monkeypatch.setattr(_extension, "_load_error", ImportError("prefrank._C is stale: ..."))
    monkeypatch.setattr(_extension, "_stale_C", _extension._C)
    monkeypatch.setattr(_extension, "_C", None)
    stale = prefrank.info()["extension"]
    assert stale["loaded"] is False and stale["stale"] is True and "stale" in stale["error"]
    assert stale["source_hash"] is not None  # the stale build is still described
    monkeypatch.setattr(_extension, "_stale_C", None)
    missing = prefrank.info()["extension"]
    assert missing["stale"] is False and missing["cuda_kernels"] is None and missing["source_hash"] is None


def test_build_info_is_read_from_the_file_the_build_writes(monkeypatch, tmp_path):
    built = {"source_hash": "abc", "torch": "2.0.0", "torch_cuda": "12.1", "with_cuda": True,
             "cxx_flags": ["-O3"], "nvcc_flags": ["-O3"], "cuda_arch_list": "8.0;9.0"}
    (tmp_path / "_build_info.json").write_text(json.dumps(built))
    monkeypatch.setattr(_extension, "BUILD_INFO_FILE", tmp_path / "_build_info.json")
    assert prefrank.info()["extension"]["build"] == built
    assert "built against torch 2.0.0 (CUDA 12.1)" in _extension._built_against()
    text = doctor.report()
    assert "cuda_arch_list: 8.0;9.0" in text and "torch: 2.0.0" in text


def test_doctor_command_prints_the_report_and_json():
    env = {**{k: v for k, v in os.environ.items() if k != "PREFRANK_BACKEND"}, "PYTHONPATH": str(ROOT)}
    text = subprocess.run([sys.executable, "-m", "prefrank.doctor"], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True)
    assert "RuntimeWarning" not in text.stderr
    for line in (f"version: {torch.__version__}", "extension:", "loaded: True", "stale: False",
                 "cuda_kernels:", "backend:", "default: auto", "nvcc:", "triton:"):
        assert line in text.stdout, line
    as_json = subprocess.run([sys.executable, "-m", "prefrank.doctor", "--json"], cwd=ROOT, env=env,
                             capture_output=True, text=True, check=True)
    facts = json.loads(as_json.stdout)
    assert facts["torch"]["version"] == torch.__version__ and facts["extension"]["loaded"] is True
