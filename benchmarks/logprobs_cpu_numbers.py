"""Ad-hoc CPU numbers of the logprobs family: median times and peak extra memory, one fresh process per case.

Peak extra memory = the peak resident size (VmHWM, reset through /proc/self/clear_refs once the inputs
exist) during the call minus the resident size before it (Linux).
"grad-excluded" subtracts the gradient tensors every implementation must return (logits.grad, or
hidden/weight/bias grads), i.e. the working memory on top of inputs and outputs.
Usage: python benchmarks/logprobs_cpu_numbers.py [reps]
"""

import json
import os
import subprocess
import sys

_WORKER = r"""
import json, statistics, sys, time
import torch
sys.path.insert(0, ".")
from benchmarks.cases_logprobs import cases
case = cases("cpu")[int(sys.argv[1])]
reps = int(sys.argv[2])
forward, forward_backward = case.make()

def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))

def reset_peak():
    # writing 5 to clear_refs resets VmHWM (the peak RSS), so input creation does not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS")

base = reset_peak()
forward()
peak_fwd = status_kib("VmHWM") - base
base = reset_peak()
grads = forward_backward()
peak_fb = status_kib("VmHWM") - base
grads = grads if isinstance(grads, list) else [grads]
grad_kib = sum(g.numel() * g.element_size() for g in grads) // 1024
del grads

def median_s(fn):
    times = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return statistics.median(times)

print(json.dumps({"name": case.name, "fwd_s": median_s(forward), "fwd_bwd_s": median_s(forward_backward),
                  "peak_fwd_mib": peak_fwd / 1024, "peak_fwd_bwd_mib": peak_fb / 1024,
                  "grad_mib": grad_kib / 1024}))
"""


def main():
    reps = sys.argv[1] if len(sys.argv) > 1 else "3"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    from benchmarks.cases_logprobs import cases

    # glibc otherwise raises its mmap threshold after the first large free and keeps later buffers (≤ 32
    # MiB) on its heap, where freed chunks still count as resident: give every large buffer its own mapping
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for i in range(len(cases("cpu"))):
        out = subprocess.run([sys.executable, "-c", _WORKER, str(i), reps], cwd=root, capture_output=True,
                             text=True, check=True, env=env)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    by_name = {r["name"]: r for r in rows}
    print("\n| case | impl | fwd s | fwd+bwd s | peak fwd MiB | peak fwd+bwd MiB | excl. grads MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        case, impl = r["name"].rsplit("-", 1)
        print(f"| {case} | {impl} | {r['fwd_s']:.3f} | {r['fwd_bwd_s']:.3f} | {r['peak_fwd_mib']:.0f} | "
              f"{r['peak_fwd_bwd_mib']:.0f} | {r['peak_fwd_bwd_mib'] - r['grad_mib']:.0f} |")
    print("\n| case | fwd speed-up | fwd+bwd speed-up | peak fwd+bwd ratio | excl. grads ratio |")
    print("|---|---|---|---|---|")
    for name, r in by_name.items():
        if not name.endswith("-prefrank"):
            continue
        ref = by_name[name.removesuffix("-prefrank") + "-reference"]
        extra = lambda x: max(x["peak_fwd_bwd_mib"] - x["grad_mib"], 0.0)  # noqa: E731
        print(f"| {name.removesuffix('-prefrank')} | {ref['fwd_s'] / r['fwd_s']:.1f}x | "
              f"{ref['fwd_bwd_s'] / r['fwd_bwd_s']:.1f}x | "
              f"1/{ref['peak_fwd_bwd_mib'] / max(r['peak_fwd_bwd_mib'], 1e-9):.1f} | "
              f"1/{extra(ref) / max(extra(r), 1.0):.0f} |")


if __name__ == "__main__":
    main()
