"""Build prefrank and its compiled extension ``prefrank._C``.

Always builds the C++ CPU kernels (with OpenMP on compile *and* link, or ``at::parallel_for`` runs serially).
Adds the CUDA kernels when torch is a CUDA build and nvcc is found (``PREFRANK_CUDA=0/1`` forces it off/on),
for sm_80 and sm_90 unless ``TORCH_CUDA_ARCH_LIST`` says otherwise.

Install with ``pip install --no-build-isolation -e .`` so the extension is compiled against the torch that
will import it.
"""

import glob
import hashlib
import os
import shutil
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

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
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


def extension():
    cuda = want_cuda()
    cpu_sources = sorted(p for p in glob.glob("csrc/*.cpp") if not p.endswith("_cuda_glue.cpp"))
    define = [("PREFRANK_SOURCE_HASH", f'"{source_hash()}"'), ("PREFRANK_WITH_CUDA", "1" if cuda else "0")]
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    if not cuda:
        return CppExtension("prefrank._C", cpu_sources, define_macros=define,
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    cuda_sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*_cuda_glue.cpp"))
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "--resource-usage"]
    return CUDAExtension("prefrank._C", cpu_sources + cuda_sources, define_macros=define,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])


setup(
    name="prefrank",
    version="0.1.0",
    description="Fused GPU kernels and drop-in losses for listwise and group preference alignment",
    python_requires=">=3.10",
    packages=["prefrank", "prefrank.triton_kernels", "prefrank.train"],
    package_dir={"prefrank.triton_kernels": "triton_kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton"], "train": ["transformers", "safetensors", "pillow", "tqdm"]},
)
