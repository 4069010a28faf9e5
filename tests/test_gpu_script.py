"""benchmarks/gpu.sh and benchmarks/run.py without a GPU: the harness's check-then-time rules on synthetic
cases, and a dry run of gpu.sh (--cpu: this python, the in-place build, the CPU benchmarks on tiny shapes)."""

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import run
from benchmarks.harness import Case

ROOT = Path(__file__).resolve().parent.parent


def _case(impl, fn, requires=()):
    def make():
        x = torch.linspace(-1, 1, 7)

        def forward():
            return fn(x)

        def forward_backward():
            leaf = x.detach().requires_grad_()
            fn(leaf).sum().backward()
            return leaf.grad

        return forward, forward_backward

    return Case("toy", "n=7", "float32", impl, make, "cpu", requires=requires)


def _group(*cases):
    args = SimpleNamespace(device="cpu", budget_s=0.002, memory="none", quick=True)
    return {r["impl"]: r for r in run.run_group([("toy", i, c) for i, c in enumerate(cases)], args)}


def test_a_disagreeing_peer_is_reported_not_timed():
    rows = _group(_case("prefrank", torch.exp), _case("reference", torch.exp), _case("same", lambda x: x.exp()),
                  _case("wrong gradient", lambda x: torch.exp(x.detach()) + x - x.detach()), _case("wrong", torch.sin),
                  _case("nan", lambda x: x.exp() * torch.nan))
    assert rows["prefrank"]["status"] == "ok" and rows["prefrank"]["fwd_bwd_ms"] > 0
    assert rows["same"]["status"] == "ok" and rows["same"]["fwd_bwd_ms"] > 0
    assert rows["reference"]["status"] == "ok" and rows["reference"]["fwd_bwd_ms"] == ""  # oracle: never timed
    assert rows["wrong gradient"]["status"] == "mismatch" and rows["wrong gradient"]["check"].startswith("gradient")
    assert rows["wrong"]["status"] == "mismatch" and rows["wrong"]["check"].startswith("forward")
    assert rows["nan"]["status"] == "mismatch" and "non-finite" in rows["nan"]["check"]
    for impl in ("wrong gradient", "wrong", "nan"):
        assert rows[impl]["fwd_ms"] == rows[impl]["fwd_bwd_ms"] == ""


def test_missing_and_failing_peers_are_reported():
    def broken(x):
        raise RuntimeError("peer exploded")

    rows = _group(_case("prefrank", torch.exp), _case("absent", torch.exp, requires=("no_such_module_xyz",)),
                  _case("broken", broken))
    assert rows["absent"]["status"] == "skipped" and "no_such_module_xyz" in rows["absent"]["check"]
    assert rows["broken"]["status"] == "error" and "peer exploded" in rows["broken"]["check"]
    assert rows["prefrank"]["fwd_bwd_ms"] > 0


def test_headline_is_against_the_fastest_agreeing_peer():
    def row(impl, role, ms, status="ok"):
        return {"op": "toy", "shape": "n=7", "dtype": "float32", "device": "cpu", "impl": impl, "role": role,
                "status": status, "check": "", "fwd_ms": ms, "fwd_bwd_ms": ms, "peak_mib": None,
                "temporaries_mib": None, "roofline_ms": None}

    rows = [row("prefrank", "prefrank", 2.0), row("reference", "oracle", None), row("slow", "peer", 8.0),
            row("fast", "peer", 3.0), row("fastest but wrong", "peer", None, "mismatch")]
    assert run.strongest_peer(rows)["impl"] == "fast"
    headline = run.markdown_report(rows, "t").split("### Every")[0]
    assert "| fast | 3.000 | **1.50×** |" in headline


def _gpu_script(out, **env):
    env = {**os.environ, "PYTHON": sys.executable, **env}
    env.pop("TRITON_INTERPRET", None)  # as on a fresh shell: the script decides
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out), "--cpu"], env=env,
                          capture_output=True, text=True, timeout=1200)
    report = (out / "report.md").read_text()
    with open(out / "benchmarks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return done, report, rows


def test_dry_run_of_gpu_script(tmp_path):
    """gpu.sh --cpu with this python (no venv, no pip, no make): every step runs and is recorded, and the
    report holds the environment, the test summary and the benchmark tables (one family, to stay fast)."""
    done, report, rows = _gpu_script(tmp_path / "out", GPU_SH_TESTS="tests/test_options.py",
                                     GPU_SH_BENCH_ARGS="soft_sort")
    assert done.returncode == 0, done.stdout + done.stderr + report
    for name in ("environment", "build", "tests", "benchmarks"):
        assert f"| {name} | ok |" in report
    assert f"torch {torch.__version__}" in report and "nvidia-smi: not run (--cpu)" in report
    assert "## Tests" in report and "### Headline" in report and "| soft_sort |" in report
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["benchmarks.csv", "logs", "report.md"]
    assert {r["impl"]: r["status"] for r in rows if r["shape"] == "B=8,n=4,odd_even"} == {
        "prefrank": "ok", "diffsort": "ok"}
    assert all(float(r["fwd_bwd_ms"]) > 0 for r in rows)


@pytest.mark.slow
def test_gpu_script_records_a_failing_step_and_goes_on(tmp_path):
    done, report, rows = _gpu_script(tmp_path / "out", GPU_SH_TESTS="tests/no_such_test_file.py",
                                     GPU_SH_BENCH_ARGS="soft_sort")
    assert done.returncode == 1
    assert "| tests | **failed** (exit 4) |" in report and "| benchmarks | ok |" in report
    assert rows and "| soft_sort |" in report


@pytest.mark.slow
def test_quick_run_of_every_case_module(tmp_path):
    """run.py --quick over every cases_*.py: every peer installed here agrees with prefrank and is timed."""
    out = tmp_path / "quick.csv"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--device", "cpu", "--csv",
                    str(out), "--memory", "inprocess", "--no-plot"], check=True, cwd=ROOT, timeout=1200,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    rows = run.read_csv(out)
    modules = {p.stem for p in (ROOT / "benchmarks").glob("cases_*.py")}
    assert len({(r["op"], r["shape"]) for r in rows}) >= len(modules)
    bad = [(r["impl"], r["op"], r["check"]) for r in rows if r["status"] in ("mismatch", "error")]
    assert not bad, bad
    timed_peers = {r["impl"] for r in rows if r["role"] == "peer" and r["fwd_bwd_ms"]}
    assert {"torch idiom", "torch.compile idiom", "torch vectorised", "F.cross_entropy", "torch.compile naive",
            "torch filtered naive", "diffsort"} <= timed_peers
    assert all(r["fwd_bwd_ms"] > 0 for r in rows if r["role"] == "prefrank")
    assert (out.with_suffix(".md")).read_text().count("| prefrank |") >= len({(r["op"], r["shape"]) for r in rows})
