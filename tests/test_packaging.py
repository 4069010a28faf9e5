"""Packaging: the sdist holds every source a build needs and builds CPU-only into a wheel that imports and
runs outside the checkout; torch is never a build requirement (build against the installed torch with
--no-build-isolation); the extras are complete; the missing-extension ImportError fits the user's situation."""

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from prefrank import __version__, _extension

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _tracked(folder):
    listed = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True, check=True)
    return {line for line in listed.stdout.splitlines() if line}


def _clean_env(**extra):
    """The environment of a fresh process that must not see the checkout (no PYTHONPATH into it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PREFRANK_BACKEND")}
    env.update(extra)
    return env


def test_torch_is_not_a_build_requirement():
    """A build requirement `torch` makes pip's isolated build compile against a freshly downloaded torch."""
    requires = PYPROJECT["build-system"]["requires"]
    assert not any(r.split("=")[0].split(">")[0].split("<")[0].strip() == "torch" for r in requires), requires
    assert "torch" in " ".join(PYPROJECT["project"]["dependencies"])


def test_setup_without_torch_says_how_to_build():
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']\n"
            "runpy.run_path('setup.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env=_clean_env())
    assert result.returncode != 0
    assert "pip install --no-build-isolation" in result.stderr and "torch" in result.stderr


def test_extras_are_complete():
    extras = {name: {r.split("=")[0].split(">")[0].strip().lower() for r in requirements}
              for name, requirements in PYPROJECT["project"]["optional-dependencies"].items()}
    assert {"matplotlib", "pyyaml", "transformers", "safetensors", "pillow", "tqdm"} <= extras["train"]
    assert {"trl", "peft"} <= extras["trl"]
    assert "triton" in extras["triton"]


@pytest.mark.parametrize("source, expected", [
    ("index", "--no-binary prefrank prefrank=="),
    ("/tmp/dl/prefrank-0.1.0.tar.gz", "--force-reinstall /tmp/dl/prefrank-0.1.0.tar.gz"),
    ("git+https://example.org/prefrank.git@abc123", "--force-reinstall git+https://example.org/prefrank.git@abc123"),
])
def test_installed_copy_rebuild_command(monkeypatch, source, expected):
    """An installed copy is rebuilt by pip from its own source, against this torch, never by `make build`."""
    monkeypatch.setattr(_extension, "is_source_tree", lambda: False)
    monkeypatch.setattr(_extension, "install_source", lambda: source)
    command = _extension.rebuild_command()
    assert expected in command and "make build" not in command
    assert f"{sys.executable} -m pip install --no-build-isolation" in command


@pytest.mark.slow
def test_sdist_builds_cpu_only_and_runs_outside_the_checkout(tmp_path):
    """sdist → unpack → `pip wheel --no-build-isolation` with PREFRANK_CUDA=0 → unpack the wheel → a fresh
    process outside the checkout imports it and runs one op on the compiled kernel (< 2 min on 2 cores)."""
    env = _clean_env(PREFRANK_CUDA="0", MAX_JOBS="2")
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist",
                    "--dist-dir", str(tmp_path / "dist")], cwd=ROOT, env=env, check=True, capture_output=True)
    (sdist,) = (tmp_path / "dist").glob("prefrank-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        archive.extractall(tmp_path / "src", filter="data")
    needed = _tracked("csrc") | _tracked("triton_kernels") | {"setup.py", "pyproject.toml", "MANIFEST.in"}
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
    assert not [n for n in names if n.endswith((".so", "_build_info.json"))]

    (source,) = (tmp_path / "src").iterdir()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                            "-w", str(tmp_path / "wheels"), str(source)], env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("prefrank-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        members = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    runtime = {"prefrank/triton_kernels/" + Path(p).name for p in _tracked("triton_kernels") if p.endswith(".py")}
    runtime |= {"prefrank/_build_info.json", "prefrank/train/loop.py", "prefrank/ops.py"}
    assert not runtime - members, sorted(runtime - members)
    assert any(m.startswith("prefrank/_C") and m.endswith(".so") for m in members)

    site = tmp_path / "site"
    code = ("import torch, prefrank, prefrank.ops as ops, prefrank.reference\n"
            f"assert prefrank.__file__.startswith({str(site)!r}), prefrank.__file__\n"
            "facts = prefrank.info()\n"
            "assert facts['extension']['loaded'] and facts['prefrank']['install'] == 'installed', facts\n"
            "assert facts['extension']['build']['torch'] == torch.__version__, facts\n"
            "assert not facts['extension']['cuda_kernels']\n"
            "nll = ops.plackett_luce_nll(torch.tensor([[2.0, 1.0, 0.0]]))\n"
            "ref = prefrank.reference.plackett_luce_nll(torch.tensor([[2.0, 1.0, 0.0]]))\n"
            "torch.testing.assert_close(nll, ref)\n"
            "print('OK', float(nll))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(PYTHONPATH=str(site)),
                         capture_output=True, text=True)
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr

    # the same installed copy without its extension: the error names the pip command, not `make build`
    broken = ("import sys; sys.modules['prefrank._C'] = None\n"
              "import torch, prefrank.ops as ops\n"
              "try:\n    ops.plackett_luce_nll(torch.randn(2, 3))\n"
              "except ImportError as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", broken], cwd=tmp_path, capture_output=True, text=True,
                         env=_clean_env(PYTHONPATH=str(site)))
    message = run.stdout
    assert "-m pip install --no-build-isolation --no-deps --force-reinstall" in message, message + run.stderr
    assert f"prefrank=={__version__}" in message and "make build" not in message
    assert 'impl="reference"' in message and "PREFRANK_BACKEND=reference" in message
    assert f"built against torch {__import__('torch').__version__}" in message
