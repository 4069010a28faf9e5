"""Build prefrank and its compiled extension ``prefrank._C`` (package metadata lives in pyproject.toml).

Always builds the C++ CPU kernels (with OpenMP on compile *and* link, or ``at::parallel_for`` runs serially).
Adds the CUDA kernels when torch is a CUDA build and nvcc is found (``PREFRANK_CUDA=0/1`` forces it off/on),
for sm_80 and sm_90 unless ``TORCH_CUDA_ARCH_LIST`` says otherwise.

The extension links against torch's C++ library, so it must be compiled against the torch that will import
it: install torch first, then ``pip install --no-build-isolation .`` (``-e .`` for development; ``make build``
does that). Next to the extension the build writes ``prefrank/_build_info.json`` (torch, CUDA, flags it was
built with), which ``python -m prefrank.doctor`` and the extension's ImportError report.
"""

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _cuda_toolkit_root():
    """The toolkit root (the folder holding bin/nvcc and include/), resolving wrapper scripts on PATH."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for candidate in ("/usr/local/cuda", "/usr/local/cuda-13.0", "/opt/cuda"):
        if os.path.exists(os.path.join(candidate, "include", "cuda_runtime_api.h")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = Path(os.path.realpath(nvcc)).parent.parent
        if (root / "include" / "cuda_runtime_api.h").exists():
            return str(root)
    return None


# cpp_extension resolves CUDA_HOME when it is imported: set it first (a wrapper nvcc on PATH misleads it).
_toolkit = _cuda_toolkit_root()
if _toolkit:
    os.environ["CUDA_HOME"] = _toolkit
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

try:
    import torch
except ImportError:
    sys.exit("prefrank compiles its extension against the installed torch, and none was found in this build "
             "environment. Install torch first, then build without pip's build isolation (an isolated build "
             "would not see your torch): pip install --no-build-isolation prefrank  (in a source tree: pip "
             "install --no-build-isolation .)")
from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def source_hash():
    """Hash of every extension source; prefrank._extension compares it to detect a stale build."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(str(ROOT / "csrc" / "*"))):
        digest.update(Path(path).name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def want_cuda():
    forced = os.environ.get("PREFRANK_CUDA")
    if forced is not None:
        if forced == "1" and not (torch.version.cuda and _toolkit):
            raise RuntimeError("PREFRANK_CUDA=1 but torch is not a CUDA build or no CUDA toolkit was found "
                               "(set CUDA_HOME to the toolkit root, e.g. /usr/local/cuda)")
        return forced == "1"
    return bool(torch.version.cuda) and _toolkit is not None


CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--resource-usage"]


GENERATED = ROOT / "build" / "generated"  # headers written by this script (not sources: not hashed)


def write_source_hash_header():
    """The source hash goes to csrc/module.cpp through a generated header, not a -D flag: a flag that changes
    with every csrc edit changes every compile command, so ninja would rebuild every file after any edit."""
    header = GENERATED / "prefrank_source_hash.h"
    text = f'#define PREFRANK_SOURCE_HASH "{source_hash()}"\n'
    if not header.exists() or header.read_text() != text:  # unchanged: module.cpp is not rebuilt
        GENERATED.mkdir(parents=True, exist_ok=True)
        header.write_text(text)


def extension(cuda):
    write_source_hash_header()
    cpu_sources = sorted(p for p in glob.glob("csrc/*.cpp") if not p.endswith("_cuda_glue.cpp"))
    common = dict(define_macros=[("PREFRANK_WITH_CUDA", "1" if cuda else "0")], include_dirs=[str(GENERATED)],
                  extra_link_args=["-fopenmp"])
    if not cuda:
        return CppExtension("prefrank._C", cpu_sources, extra_compile_args={"cxx": CXX_FLAGS}, **common)
    cuda_sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*_cuda_glue.cpp"))
    return CUDAExtension("prefrank._C", cpu_sources + cuda_sources,
                         extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS}, **common)


def nvcc_version():
    nvcc = Path(_toolkit, "bin", "nvcc") if _toolkit else None
    if nvcc is None or not nvcc.exists():
        return None
    output = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout
    return next((line.strip() for line in output.splitlines() if "release" in line), output.strip() or None)


def build_info(cuda):
    """What this build was compiled against: written next to the extension for prefrank.doctor."""
    return {"source_hash": source_hash(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "with_cuda": cuda, "python": sys.version.split()[0],
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI), "cxx_flags": CXX_FLAGS,
            "nvcc_flags": NVCC_FLAGS if cuda else None, "cuda_home": _toolkit if cuda else None,
            "nvcc": nvcc_version() if cuda else None,
            "cuda_arch_list": os.environ["TORCH_CUDA_ARCH_LIST"] if cuda else None}


class BuildExtensionWithInfo(BuildExtension.with_options(use_ninja=True)):
    def build_extensions(self):
        super().build_extensions()
        self._write_build_info(Path(self.get_ext_fullpath("prefrank._C")).parent)

    def copy_extensions_to_source(self):  # --inplace and editable installs: next to the copied extension
        super().copy_extensions_to_source()
        self._write_build_info(Path(self.get_finalized_command("build_py").get_package_dir("prefrank")))

    @staticmethod
    def _write_build_info(folder):
        (folder / "_build_info.json").write_text(json.dumps(build_info(CUDA), indent=1) + "\n")


CUDA = want_cuda()
# prefrank.triton_kernels lives in triton_kernels/ (mapped below); a checkout may also hold a symlink to it
PACKAGES = find_packages(include=["prefrank", "prefrank.*"], exclude=["prefrank.triton_kernels"])

setup(
    packages=[*PACKAGES, "prefrank.triton_kernels"],
    package_dir={"prefrank.triton_kernels": "triton_kernels"},
    ext_modules=[extension(CUDA)],
    cmdclass={"build_ext": BuildExtensionWithInfo},
)
