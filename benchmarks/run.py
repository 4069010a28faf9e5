"""Run every benchmark case and write results/<machine>.csv, a Markdown table and a PNG plot.

    python benchmarks/run.py [--device cpu|cuda] [--only SUBSTRING] [--no-memory]

Times are medians over repeated runs (CPU: wall clock; CUDA: triton.testing.do_bench, which synchronises).
Peak memory is the extra memory one forward+backward needs beyond its inputs, measured in a fresh
subprocess per case: on CPU the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs)
minus the resident set before the call; on CUDA torch.cuda.max_memory_allocated minus the allocation
before the call. "Temporaries" is the part of that peak the call does not hand back: the peak minus what is
still live after it returns (the returned gradients), i.e. the scratch memory of the implementation.
Impls named "prefrank <variant>" are options of the prefrank op (e.g. inplace_backward) and are compared
with the same baseline as plain "prefrank".
"""

import argparse
import csv
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def case_modules():
    return sorted(p.stem for p in (ROOT / "benchmarks").glob("cases_*.py"))


def all_cases(device):
    out = []
    for name in case_modules():
        module = importlib.import_module(f"benchmarks.{name}")
        out += [(name, i, c) for i, c in enumerate(module.cases(device))]
    return out


def median_ms(fn, device, budget_s=1.0, min_runs=5, max_runs=100):
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _status_kib(field):
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def peak_extra_bytes(module, index, device):
    """Runs in a fresh process (see --peak-of): (peak, retained) bytes of one forward+backward beyond its
    inputs; retained = still live after the call (what it returns), so peak − retained = its temporaries."""
    case = importlib.import_module(f"benchmarks.{module}").cases(device)[index]
    _, forward_backward = case.make()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = forward_backward()
        torch.cuda.synchronize()
        peak, retained = torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
    else:
        base = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        result = forward_backward()
        peak, retained = (_status_kib("VmHWM") - base) * 1024, (_status_kib("VmRSS") - base) * 1024
    del result
    return peak, max(retained, 0)


def measure_peak(module, index, device):
    # a fixed mmap threshold makes glibc return every large freed block, so the resident set tracks what
    # is live instead of what the allocator kept
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, __file__, "--peak-of", module, str(index), "--device", device],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    peak, retained = (int(v) for v in out.stdout.strip().splitlines()[-1].split())
    return peak, retained


def device_bandwidth(device):
    """Peak DRAM bandwidth in bytes/s (CUDA only), from the memory clock and bus width."""
    if device != "cuda":
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def roofline_ms(module, case, device):
    """fwd+bwd time at the device's bandwidth for the bytes the op must move (cases that define it)."""
    bytes_moved = getattr(importlib.import_module(f"benchmarks.{module}"), "min_bytes_moved", None)
    bandwidth = device_bandwidth(device)
    if bytes_moved is None or bandwidth is None:
        return ""
    return bytes_moved(case)[1] / bandwidth * 1e3


def machine_name(device):
    if device == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def write_outputs(rows, machine):
    RESULTS.mkdir(parents=True, exist_ok=True)
    fields = ["op", "shape", "dtype", "device", "impl", "fwd_ms", "fwd_bwd_ms", "peak_mib", "temporaries_mib",
              "roofline_ms"]
    with open(RESULTS / f"{machine}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r[k] for k in fields} for r in rows)
    (RESULTS / f"{machine}.md").write_text(markdown_table(rows, machine))
    plot(rows, RESULTS / f"{machine}.png", machine)


def _ratio(a, b):
    return f"{a / b:.1f}×" if a and b else "—"


def _memory_ratio(a, b):
    """Like _ratio, for MiB: a baseline under 1 MiB is within the measurement's noise, and prefrank under
    0.1 MiB measures as nothing (the resident set moves in pages and allocator blocks)."""
    if a == "" or a < 1:
        return "—"
    return "prefrank ≈ 0" if b < 0.1 else _ratio(a, b)


def _mib(value):
    return f"{value:.1f}" if value != "" else "—"


def markdown_table(rows, machine):
    """One line per (op, shape, impl). A baseline line (reference or peer) gives its speed-up and memory
    ratios over plain prefrank; a "prefrank <variant>" line gives the baseline's ratios over that variant."""
    lines = [f"Benchmarks on `{machine}` (torch {torch.__version__}; medians; peak = extra memory of one "
             "forward+backward beyond its inputs; temp. = the part of the peak not returned, i.e. peak minus "
             "the returned gradients).", "",
             "| op | shape | dtype | impl | fwd ms | fwd+bwd ms | peak MiB | temp. MiB | fwd+bwd speed-up | "
             "peak ratio | temp. ratio | roofline ms |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_key = {}
    for r in rows:
        by_key.setdefault((r["op"], r["shape"], r["dtype"]), {})[r["impl"]] = r
    for (op, shape, dtype), impls in by_key.items():
        ours = impls.get("prefrank")
        baseline = next((r for impl, r in impls.items() if not impl.startswith("prefrank")), None)
        for impl, r in impls.items():
            slow, fast = (r, ours) if not impl.startswith("prefrank") else (baseline, r)
            ratios = ["", "", ""]
            if impl != "prefrank" and slow is not None and fast is not None:
                ratios = [_ratio(slow["fwd_bwd_ms"], fast["fwd_bwd_ms"]),
                          *(_memory_ratio(slow[key], fast[key]) for key in ("peak_mib", "temporaries_mib"))]
            roof = f"{r['roofline_ms']:.3f}" if r["roofline_ms"] != "" else ""
            lines.append(f"| {op} | {shape} | {dtype} | {impl} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                         f"{_mib(r['peak_mib'])} | {_mib(r['temporaries_mib'])} | {' | '.join(ratios)} | {roof} |")
    return "\n".join(lines) + ("\n\n(ratios: baseline over prefrank, or over the prefrank variant on that line; "
                              "> 1 means prefrank is faster / leaner; roofline: fwd+bwd bytes the op must move "
                              "over the device bandwidth, CUDA only)\n")


def plot(rows, path, machine):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops_ = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(len(ops_), 1, figsize=(10, 3.2 * len(ops_)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops_):
        sel = [r for r in rows if r["op"] == op]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        impls = list(dict.fromkeys(r["impl"] for r in sel))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            ys = [next((r["fwd_bwd_ms"] for r in sel if r["shape"] == s and r["impl"] == impl), 0) for s in shapes]
            ax.bar([i + j * width for i in range(len(shapes))], ys, width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd ms (median)")
        ax.set_title(f"{op} on {machine}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default="", help="run the cases whose name contains this substring")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--peak-of", nargs=2, metavar=("MODULE", "INDEX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_of:
        print(*peak_extra_bytes(args.peak_of[0], int(args.peak_of[1]), args.device))
        return
    rows = []
    for module, index, case in all_cases(args.device):
        if args.only not in case.name:
            continue
        forward, forward_backward = case.make()
        peak, retained = ("", "") if args.no_memory else measure_peak(module, index, args.device)
        row = {"op": case.op, "shape": case.shape, "dtype": case.dtype, "device": case.device, "impl": case.impl,
               "fwd_ms": median_ms(forward, args.device), "fwd_bwd_ms": median_ms(forward_backward, args.device),
               "peak_mib": "" if peak == "" else peak / 2**20,
               "temporaries_mib": "" if peak == "" else max(peak - retained, 0) / 2**20,
               "roofline_ms": roofline_ms(module, case, args.device)}
        del forward, forward_backward
        print(json.dumps(row), flush=True)
        rows.append(row)
    machine = machine_name(args.device)
    write_outputs(rows, machine)
    print(f"wrote {RESULTS / machine}.csv/.md/.png")


if __name__ == "__main__":
    main()
