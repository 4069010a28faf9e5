"""Run the benchmark cases of every ``benchmarks/cases_*.py``: prefrank against its peers, side by side.

    python benchmarks/run.py [FILTER ...] [--device cpu|cuda] [--quick] [--memory auto|subprocess|inprocess|none]
                             [--csv PATH] [--no-plot]
    python benchmarks/run.py --report PATH.csv      # print the Markdown tables of a (possibly partial) CSV

FILTER: run only the cases whose name (``op[shape,dtype,device]-impl``) contains one of these substrings
(case-insensitive; a group's "prefrank" case always runs, as every peer is checked against it).
``--quick``: the modules' tiny shapes, and torch.compile peers on the "aot_eager" backend (no code generation
wait): a fast run of every code path for the tests of this script, not a measurement.

For each (op, shape, dtype): the plain "prefrank" case runs once, then every other implementation runs once
on the same inputs and is compared with it (forward result and gradients; ``benchmarks.harness``). A peer
that disagrees is reported, not timed; a peer whose package is missing is reported as skipped; "reference"
(``prefrank.reference``, the oracle) is a correctness check only. The rest (prefrank, its options and the
agreeing peers) are timed in interleaved rounds (medians; CPU and CUDA: wall clock over back-to-back calls,
CUDA synchronised around each batch, so per-call overhead counts as in a training step). The headline ratio of
a prefrank row is against its strongest (fastest) agreeing peer: peer time / prefrank time.

Peak memory is the extra memory one forward+backward needs beyond its inputs, after a warm-up call. On CPU it
is measured in a fresh subprocess per case: the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) minus the resident set before the call. On CUDA it is torch.cuda.max_memory_allocated
minus the allocation before the call, in a fresh subprocess too (``--memory inprocess``: in this process, which
is exact on CUDA as well since the counter counts live tensors, and saves the start-up of one process per case).
"Temporaries" is the part of that peak the call does not hand back (peak minus the returned gradients).
Rows are appended to the CSV as they are measured (a run cut short still leaves its rows); the Markdown table
and PNG plot are written next to it at the end.
"""

import argparse
import csv
import gc
import importlib
import inspect
import json
import math
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

from benchmarks import harness  # noqa: E402
from benchmarks.harness import PREFRANK, default_rtol  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FIELDS = ["op", "shape", "dtype", "device", "impl", "role", "status", "check", "fwd_ms", "fwd_bwd_ms", "peak_mib",
          "temporaries_mib", "roofline_ms"]
MIN_ROUNDS, SLOW_MIN_ROUNDS, VERY_SLOW_MIN_ROUNDS, MAX_ROUNDS = 5, 3, 1, 200
COMPARE_CHUNK = 1 << 24  # elements widened to float64 at a time when a peer is checked (128 MiB)


def case_modules():
    return sorted(p.stem for p in (ROOT / "benchmarks").glob("cases_*.py"))


def module_cases(name, device, quick=False):
    """The module's cases; with quick, its tiny shapes (a module without a ``quick`` parameter has none: it
    is left out of a quick run, which must stay fast)."""
    module = importlib.import_module(f"benchmarks.{name}")
    if "quick" in inspect.signature(module.cases).parameters:
        return module.cases(device, quick=quick)
    if quick:
        print(f"{name}: cases() takes no quick=, left out of this --quick run", flush=True)
        return []
    return module.cases(device)


def all_cases(device, quick=False):
    """[(module name, index in that module's list, Case)] over every cases_*.py."""
    out = []
    for name in case_modules():
        out += [(name, i, c) for i, c in enumerate(module_cases(name, device, quick))]
    return out


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- checks


def _tensors(result):
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in _tensors(item)]
    return []


def snapshot(result):
    """The result's tensors as CPU copies in their own dtype (a later call may overwrite the originals in
    place); not float64, which would double a 2.5 GB gradient: ``compare`` widens chunk by chunk."""
    return [t.detach().to("cpu", copy=True).flatten() for t in _tensors(result)]


def _chunks(t):
    return t.split(COMPARE_CHUNK) if t.numel() else [t]


def compare(got, expected, rtol):
    """"" if ``got`` matches ``expected`` (max |difference| <= rtol * max |expected|), else why not."""
    if len(got) != len(expected):
        return f"{len(got)} result tensors, prefrank has {len(expected)}"
    worst = 0.0
    for a, b in zip(got, expected):
        if a.numel() != b.numel():
            return f"{a.numel()} values, prefrank has {b.numel()}"
        if not all(torch.isfinite(c).all() for c in _chunks(a)):
            return "non-finite values"
        scale = max((c.abs().max().item() for c in _chunks(b)), default=0.0) if b.numel() else 0.0
        difference = max(((x.double() - y.double()).abs().max().item() for x, y in zip(_chunks(a), _chunks(b))),
                         default=0.0) if a.numel() else 0.0
        worst = max(worst, difference / max(scale, 1e-30))
    return "" if worst <= rtol else f"max error {worst:.1e} (relative to the largest value) > {rtol:.0e}"


def run_once(case, closures):
    """Both closures once: (forward result, gradients) as snapshots."""
    forward, forward_backward = closures
    out = snapshot(forward())
    grads = snapshot(forward_backward())
    synchronize(case.device)
    return out, grads


# ---------------------------------------------------------------------------------------------- timing


def _batch_ms(fn, calls, device):
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3 / calls


def time_side_by_side(fns, device, budget_s):
    """Median ms per call of each fn, measured in interleaved rounds (one batch of back-to-back calls of each
    fn per round), so that load changes on the machine hit every fn alike. A batch lasts about budget_s/20;
    each fn gets budget_s of rounds (at least MIN_ROUNDS; SLOW_MIN_ROUNDS when one call exceeds budget_s, and
    VERY_SLOW_MIN_ROUNDS past 10 budget_s: torchsurv's per-list loop at large B, orders of magnitude off)."""
    calls, min_rounds = [], []
    for fn in fns:
        once = _batch_ms(fn, 1, device)  # second call after the check's: compiled, cached, warm
        calls.append(max(1, int(budget_s * 1e3 / 20 / max(once, 1e-3))))
        min_rounds.append(VERY_SLOW_MIN_ROUNDS if once > 10e3 * budget_s else
                          SLOW_MIN_ROUNDS if once > 1e3 * budget_s else MIN_ROUNDS)
    times = [[] for _ in fns]
    spent = [0.0 for _ in fns]
    for _ in range(MAX_ROUNDS):
        active = [i for i in range(len(fns)) if len(times[i]) < min_rounds[i] or spent[i] < budget_s * 1e3]
        if not active:
            break
        for i in active:
            ms = _batch_ms(fns[i], calls[i], device)
            times[i].append(ms)
            spent[i] += ms * calls[i]
    return [statistics.median(t) for t in times]


# ---------------------------------------------------------------------------------------------- memory


def _status_kib(field):
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def peak_extra_bytes(forward_backward, device):
    """(peak, retained) bytes of one forward+backward beyond what is live before it, after a warm-up call;
    retained = still live after the call (what it returns), so peak − retained = its temporaries."""
    del_result = forward_backward()
    del del_result
    gc.collect()
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


def measure_peak(module, index, device, quick=False):
    # a fixed mmap threshold makes glibc return every large freed block, so the resident set tracks what
    # is live instead of what the allocator kept
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [sys.executable, __file__, "--peak-of", module, str(index), "--device", device]
    out = subprocess.run(command + (["--quick"] if quick else []), capture_output=True, text=True, cwd=ROOT,
                         env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    peak, retained = (int(v) for v in out.stdout.strip().splitlines()[-1].split())
    return peak, retained


# ---------------------------------------------------------------------------------------------- rooflines


def device_bandwidth(device):
    """Peak DRAM bandwidth in bytes/s (CUDA only), from the memory clock and bus width."""
    if device != "cuda":
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def roofline_ms(module, case, device):
    """fwd+bwd time at the device's bandwidth for the bytes the op must move (cases that define it)."""
    bandwidth = device_bandwidth(device)
    if bandwidth is None:
        return ""
    bytes_moved = getattr(importlib.import_module(f"benchmarks.{module}"), "min_bytes_moved", None)
    if bytes_moved is None:
        return ""
    return bytes_moved(case)[1] / bandwidth * 1e3


def machine_name(device):
    if device == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


# ---------------------------------------------------------------------------------------------- one group


def _row(case, status, check="", **values):
    row = {k: "" for k in FIELDS}
    row.update(op=case.op, shape=case.shape, dtype=case.dtype, device=case.device, impl=case.impl, role=case.role,
               status=status, check=check, **values)
    return row


def _error(err):
    """One line for a table cell: the exception's type and the first line of its message."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def run_group(entries, args):
    """Check, then time, one (op, shape, dtype) group: [(module, index, case)] -> rows (prefrank's first)."""
    base = next((entry for entry in entries if entry[2].impl == PREFRANK), None)
    if base is None:
        return [_row(c, "error", "no plain prefrank case in this group to check against") for _, _, c in entries]
    ordered = [base] + [e for e in entries if e is not base]
    rows, timed = {}, []
    expected = None
    for module, index, case in ordered:
        why_missing = case.missing()
        if why_missing:
            rows[case.impl] = _row(case, "skipped", why_missing)
            print(f"skip {case.name}: {why_missing}", flush=True)
            continue
        try:
            closures = case.make()
            got = run_once(case, closures)
        except Exception as err:  # a peer that cannot run here is reported, and the others still run
            rows[case.impl] = _row(case, "error", _error(err))
            print(f"error {case.name}: {_error(err)}", flush=True)
            if case is base[2]:
                return [rows[case.impl]] + [_row(c, "error", "not checked: prefrank failed") for _, _, c in entries
                                            if c is not case]
            continue
        if case is base[2]:
            expected, status, check = got, "ok", ""
        else:
            rtol = case.rtol or default_rtol(case.dtype)
            why = compare(got[0], expected[0], rtol)
            why = f"forward: {why}" if why else compare(got[1], expected[1], rtol)
            why = why if why.startswith("forward") or not why else f"gradient: {why}"
            status, check = ("mismatch", why) if why else ("ok", f"agrees (rtol {rtol:.0e})")
            if why:
                print(f"MISMATCH {case.name}: {why}", flush=True)
        del got  # a gradient at V = 151936 is 2.5 GB: one peer's copy at a time
        rows[case.impl] = _row(case, status, check)
        if status == "ok" and case.role != "oracle":
            timed.append((module, index, case, closures))
        else:
            del closures
    del expected  # the timing holds only the closures
    if timed:
        fns = [f for _, _, _, closures in timed for f in closures]
        medians = time_side_by_side(fns, args.device, args.budget_s)
        for j, (module, _, case, _) in enumerate(timed):
            rows[case.impl].update(fwd_ms=medians[2 * j], fwd_bwd_ms=medians[2 * j + 1],
                                   roofline_ms=roofline_ms(module, case, args.device))
    for module, index, case, closures in timed:
        if args.memory == "none":
            continue
        try:
            if args.memory == "inprocess":
                peak, retained = peak_extra_bytes(closures[1], args.device)
            else:
                peak, retained = measure_peak(module, index, args.device, args.quick)
            rows[case.impl].update(peak_mib=peak / 2**20, temporaries_mib=max(peak - retained, 0) / 2**20)
        except Exception as err:
            rows[case.impl]["check"] += f"; memory not measured ({_error(err)})"
    del timed
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return [rows[c.impl] for _, _, c in ordered]


# ---------------------------------------------------------------------------------------------- reports


def _num(value):
    return float(value) if value not in ("", None) else None


def read_csv(path):
    with open(path, newline="") as f:
        return [{k: (_num(v) if k in ("fwd_ms", "fwd_bwd_ms", "peak_mib", "temporaries_mib", "roofline_ms")
                     else v) for k, v in r.items()} for r in csv.DictReader(f)]


def _groups(rows):
    """Rows by (op, shape, dtype, device), ops in alphabetical order, shapes in the order they ran."""
    by_key = {}
    for r in rows:
        by_key.setdefault((r["op"], r["shape"], r["dtype"], r["device"]), []).append(r)
    return dict(sorted(by_key.items(), key=lambda item: item[0][0]))


def strongest_peer(impls):
    """The fastest peer (fwd+bwd) that agreed with prefrank and was timed, or None."""
    peers = [r for r in impls if r["role"] == "peer" and r["status"] == "ok" and r["fwd_bwd_ms"]]
    return min(peers, key=lambda r: r["fwd_bwd_ms"], default=None)


def _ratio(slow, fast):
    return f"{slow / fast:.2f}×" if slow and fast else "—"


def _ms(value):
    return "—" if value is None else (f"{value:.3f}" if value < 100 else f"{value:.0f}")


def _mib(value):
    return "—" if value is None else f"{value:.1f}"


def _oracle(impls):
    oracle = next((r for r in impls if r["role"] == "oracle"), None)
    if oracle is None:
        return "—"
    return {"ok": "agrees", "mismatch": "**MISMATCH**"}.get(oracle["status"], oracle["status"])


def markdown_report(rows, title):
    """Headline table (each prefrank row vs its strongest peer), then every implementation with its check."""
    lines = [title, "", "### Headline: prefrank vs its strongest peer", "",
             "Speed-up = strongest peer's time / prefrank's time (medians, fwd+bwd and fwd, measured side by side "
             "in one run; > 1: prefrank is faster). Strongest peer = the fastest that agreed with prefrank "
             "numerically. Peak = extra memory of one forward+backward (MiB). Oracle = `prefrank.reference` "
             "(correctness only).", "",
             "| op | shape | dtype | prefrank | fwd+bwd ms | strongest peer | peer fwd+bwd ms | fwd+bwd speed-up "
             "| fwd speed-up | peak MiB (prefrank / peer) | oracle |",
             "|---|---|---|---|---:|---|---:|---:|---:|---:|---|"]
    groups = _groups(rows)
    for (op, shape, dtype, _), impls in groups.items():
        peer = strongest_peer(impls)
        for r in impls:
            if r["role"] != "prefrank":
                continue
            if r["status"] != "ok":
                lines.append(f"| {op} | {shape} | {dtype} | {r['impl']} | {r['status']}: {r['check']} | | | | | | "
                             f"{_oracle(impls)} |")
                continue
            if peer is None:
                peer_cells = "no peer timed | — | — | —"
            else:
                peer_cells = (f"{peer['impl']} | {_ms(peer['fwd_bwd_ms'])} | "
                              f"**{_ratio(peer['fwd_bwd_ms'], r['fwd_bwd_ms'])}** | "
                              f"{_ratio(peer['fwd_ms'], r['fwd_ms'])}")
            memory = f"{_mib(r['peak_mib'])} / {_mib(peer['peak_mib']) if peer else '—'}"
            lines.append(f"| {op} | {shape} | {dtype} | {r['impl']} | {_ms(r['fwd_bwd_ms'])} | {peer_cells} | "
                         f"{memory} | {_oracle(impls)} |")
    lines += ["", "### Every implementation", "",
              "Ratio = this row's time / prefrank's (fwd+bwd; > 1: prefrank is faster). A peer that disagreed "
              "with prefrank, failed or is not installed is listed with the reason and not timed.", "",
              "| op | shape | dtype | impl | role | check | fwd ms | fwd+bwd ms | vs prefrank | peak MiB | temp. MiB "
              "| roofline ms |",
              "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (op, shape, dtype, _), impls in groups.items():
        ours = next((r for r in impls if r["impl"] == PREFRANK), None)
        for r in impls:
            check = r["check"] if r["status"] == "ok" else f"**{r['status']}**: {r['check']}"
            ratio = _ratio(r["fwd_bwd_ms"], ours["fwd_bwd_ms"]) if ours and r["impl"] != PREFRANK else ""
            lines.append(f"| {op} | {shape} | {dtype} | {r['impl']} | {r['role']} | {check} | {_ms(r['fwd_ms'])} | "
                         f"{_ms(r['fwd_bwd_ms'])} | {ratio} | {_mib(r['peak_mib'])} | {_mib(r['temporaries_mib'])} | "
                         f"{_ms(r['roofline_ms']) if r['roofline_ms'] is not None else ''} |")
    return "\n".join(lines) + "\n"


def plot(rows, path, machine):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["fwd_bwd_ms"]]
    ops_ = list(dict.fromkeys(f"{r['op']} ({r['dtype']})" for r in rows))
    if not ops_:
        return
    fig, axes = plt.subplots(len(ops_), 1, figsize=(11, 3.4 * len(ops_)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops_):
        sel = [r for r in rows if f"{r['op']} ({r['dtype']})" == op]
        shapes = list(dict.fromkeys(r["shape"] for r in sel))
        impls = list(dict.fromkeys(r["impl"] for r in sel))
        width = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            ys = [next((r["fwd_bwd_ms"] for r in sel if r["shape"] == s and r["impl"] == impl), 0) for s in shapes]
            ax.bar([i + j * width for i in range(len(shapes))], ys, width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd ms (median)")
        ax.set_title(f"{op} on {machine}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("filters", nargs="*", help="substrings of case names to run (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", action="append", default=[], help="same as a FILTER (kept for old commands)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (tests of this script)")
    parser.add_argument("--memory", choices=("subprocess", "inprocess", "none"), default="subprocess")
    parser.add_argument("--no-memory", dest="memory", action="store_const", const="none", help=argparse.SUPPRESS)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="timing budget per implementation and pass (default 1.0; 0.02 with --quick)")
    parser.add_argument("--csv", type=Path, default=None, help="default: benchmarks/results/<machine>.csv")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--report", type=Path, help="print the Markdown tables of this CSV and exit")
    parser.add_argument("--peak-of", nargs=2, metavar=("MODULE", "INDEX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        print(markdown_report(read_csv(args.report), f"Benchmarks from `{args.report.name}`"))
        return
    if args.peak_of:
        if args.quick:
            harness.COMPILE_BACKEND["backend"] = "aot_eager"
        case = module_cases(args.peak_of[0], args.device, args.quick)[int(args.peak_of[1])]
        print(*peak_extra_bytes(case.make()[1], args.device))
        return
    if args.quick:
        harness.COMPILE_BACKEND["backend"] = "aot_eager"
        torch.set_num_threads(1)  # no OpenMP barrier stalls on a loaded machine: the quick run only has to run
    if args.budget_s is None:
        args.budget_s = 0.02 if args.quick else 1.0
    filters = [f.lower() for f in args.filters + args.only]
    machine = machine_name(args.device)
    csv_path = args.csv or RESULTS / f"{machine}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    groups = {}
    for module, index, case in all_cases(args.device, args.quick):
        if not filters or any(f in case.name.lower() for f in filters) or case.impl == PREFRANK:
            groups.setdefault(case.group, []).append((module, index, case))
    if filters:  # drop groups where only the always-kept prefrank case matched
        groups = {k: v for k, v in groups.items() if any(any(f in c.name.lower() for f in filters)
                                                         for _, _, c in v)}
    # round-robin over the modules (each lists its most important shapes first): a run cut short by a time
    # limit (gpu.sh) still has every family's first groups
    modules = list(dict.fromkeys(entries[0][0] for entries in groups.values()))
    rank = {}
    for key, entries in groups.items():
        rank[key] = (sum(1 for k in rank if groups[k][0][0] == entries[0][0]), modules.index(entries[0][0]))
    groups = dict(sorted(groups.items(), key=lambda item: rank[item[0]]))
    rows = []
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for entries in groups.values():
            for row in run_group(entries, args):
                writer.writerow(row)
                f.flush()
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
                                  for k, v in row.items()}), flush=True)
                rows.append(row)
    rows = read_csv(csv_path)
    title = (f"Benchmarks on `{machine}` (torch {torch.__version__}, {args.device}"
             f"{', quick shapes' if args.quick else ''})")
    csv_path.with_suffix(".md").write_text(markdown_report(rows, title))
    if not args.no_plot:
        plot(rows, csv_path.with_suffix(".png"), machine)
    print(f"wrote {csv_path} and its .md" + ("" if args.no_plot else " and .png"))


if __name__ == "__main__":
    main()
