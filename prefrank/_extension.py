"""Loads the compiled extension ``prefrank._C``, reports a missing or stale build actionably, and collects
what a bug report needs (:func:`info`, printed by ``python -m prefrank.doctor``).

Import never fails here (so the ``reference`` backend works without a build); an op that needs the
extension calls :func:`require`, which raises the ImportError recorded at import time. There is no silent
fallback to the reference implementation. The ImportError says what to do in the user's situation: in a
source tree, rebuild it there; in an installed copy (a wheel built for another torch, say), reinstall it
from source against the torch of this process (the exact pip command); always, the reference backend.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch  # loads libc10/libtorch, which prefrank._C links against

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_ROOT = PACKAGE_DIR.parent
BUILD_INFO_FILE = PACKAGE_DIR / "_build_info.json"  # written by setup.py's build_ext next to the extension
REFERENCE_HINT = ('or, without the extension, pass impl="reference" to the op or set PREFRANK_BACKEND=reference '
                  "to run the pure-PyTorch implementations")
ENVIRONMENT_VARIABLES = ("PREFRANK_BACKEND", "PREFRANK_DEBUG", "PREFRANK_CUDA", "TRITON_INTERPRET", "CUDA_HOME",
                         "TORCH_CUDA_ARCH_LIST", "CUDA_VISIBLE_DEVICES")


def _source_hash(csrc):
    digest = hashlib.sha256()
    for path in sorted(csrc.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def is_source_tree() -> bool:
    """True when prefrank is imported from a source tree (a checkout or an unpacked sdist), not installed."""
    return (SOURCE_ROOT / "setup.py").is_file() and (SOURCE_ROOT / "csrc").is_dir()


def build_info() -> dict | None:
    """What the extension was compiled against (torch, CUDA, flags), or None if no build wrote it."""
    try:
        return json.loads(BUILD_INFO_FILE.read_text())
    except (OSError, ValueError):
        return None


def _distribution():
    try:
        return importlib.metadata.distribution("prefrank")
    except importlib.metadata.PackageNotFoundError:
        return None


def install_source() -> str | None:
    """Where an installed prefrank came from: its PEP 610 direct URL (a local sdist, folder or VCS), "index"
    for a registry install, None when prefrank is not installed as a distribution."""
    distribution = _distribution()
    if distribution is None:
        return None
    text = distribution.read_text("direct_url.json")
    if not text:
        return "index"
    direct = json.loads(text)
    url = direct["url"]
    if "vcs_info" in direct:
        vcs = direct["vcs_info"]
        return f"{vcs['vcs']}+{url}@{vcs['commit_id']}"
    return url.removeprefix("file://")


def rebuild_command() -> str:
    """The exact command that rebuilds the extension against the torch of this process."""
    if is_source_tree():
        return "`make build` (or `pip install --no-build-isolation -e .`) in " + str(SOURCE_ROOT)
    source = install_source()
    pip = f"{sys.executable} -m pip install --no-build-isolation --no-deps --force-reinstall"
    if source is None or source == "index":  # (runs while prefrank/__init__ is importing: no __version__ yet)
        distribution = _distribution()
        pinned = f"prefrank=={distribution.version}" if distribution is not None else "prefrank"
        return f"`{pip} --no-binary prefrank {pinned}`"
    return f"`{pip} {source}`"


def _built_against():
    info = build_info()
    if info is None:
        return ""
    return (f" It was built against torch {info['torch']} (CUDA {info['torch_cuda']}); this process runs torch "
            f"{torch.__version__} (CUDA {torch.version.cuda}).")


def _load():
    """(module or None, the ImportError to raise or None, stale build module or None)."""
    try:
        from prefrank import _C
    except ImportError as err:
        return None, ImportError(
            f"prefrank's compiled extension prefrank._C could not be loaded ({err}).{_built_against()} "
            f"Rebuild it for this torch with {rebuild_command()}; {REFERENCE_HINT}"), None
    csrc = SOURCE_ROOT / "csrc"
    if is_source_tree() and _source_hash(csrc) != _C.source_hash:
        return None, ImportError(
            f"prefrank._C is stale: the sources in {csrc} changed since it was built. Rebuild it with "
            f"{rebuild_command()}; {REFERENCE_HINT}"), _C
    return _C, None, None


_C, _load_error, _stale_C = _load()


def require():
    """Raise the recorded ImportError if the extension is missing or stale."""
    if _load_error is not None:
        raise _load_error


def available():
    return _load_error is None


def has_cuda_kernels():
    return _C is not None and bool(_C.with_cuda)


def _nvcc():
    toolkit = os.environ.get("CUDA_HOME")
    nvcc = str(Path(toolkit, "bin", "nvcc")) if toolkit and Path(toolkit, "bin", "nvcc").exists() else None
    nvcc = nvcc or shutil.which("nvcc")
    if nvcc is None:
        return {"path": None, "version": None}
    try:
        output = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return {"path": nvcc, "version": f"unavailable ({err})"}
    release = [line.strip() for line in output.splitlines() if "release" in line]
    return {"path": nvcc, "version": release[0] if release else output.strip()}


def _triton():
    try:
        import triton
    except ImportError as err:
        return {"version": None, "error": str(err)}
    return {"version": triton.__version__, "error": None}


def _devices():
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [{"name": torch.cuda.get_device_name(i),
                 "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))} for i in range(count)]
    except RuntimeError as err:  # a broken driver: report it instead of failing the report
        return [{"error": str(err)}]


def info() -> dict[str, Any]:
    """Everything a bug report needs, as a dict: python, torch (CUDA build, devices), triton, nvcc, how
    prefrank is installed, its compiled extension (loaded? stale? CUDA kernels? what it was built against,
    with which flags) and the default backend. ``python -m prefrank.doctor`` prints it."""
    from prefrank import __version__, _checks, backend

    module = _C if _C is not None else _stale_C
    kernels = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("prefrank_C::"))
    return {
        "prefrank": {"version": __version__, "location": str(PACKAGE_DIR),
                     "install": "source tree" if is_source_tree() else "installed",
                     "install_source": None if is_source_tree() else install_source()},
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "platform": platform.platform()},
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "hip": torch.version.hip,
                  "cuda_available": torch.cuda.is_available(), "devices": _devices(),
                  "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI)},
        "triton": _triton(),
        "nvcc": _nvcc(),
        "extension": {"loaded": available(), "error": None if _load_error is None else str(_load_error),
                      "stale": _stale_C is not None,
                      "cuda_kernels": None if module is None else bool(module.with_cuda),
                      "source_hash": None if module is None else module.source_hash,
                      "kernels": kernels, "build": build_info(),
                      "rebuild": rebuild_command()},
        "backend": {"default": backend.get_backend(), "debug": _checks.debug_enabled()},
        "environment": {name: os.environ[name] for name in ENVIRONMENT_VARIABLES if name in os.environ},
    }
