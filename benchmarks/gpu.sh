#!/usr/bin/env bash
# Build, test and benchmark prefrank on a bare CUDA machine, then write ONE report: OUTDIR/report.md (environment,
# build log tail, test summary with failures, benchmark tables) and OUTDIR/benchmarks.csv (the benchmark rows).
#
#   bash benchmarks/gpu.sh OUTDIR          # on the GPU machine
#   PYTHON=/path/to/python bash benchmarks/gpu.sh OUTDIR --cpu   # dry run of the same steps on a CPU machine
#
# Expects: a python (PYTHON, default python3; 3.10+) that already holds torch (a CUDA build) with triton, pytest
# and numpy, the CUDA toolkit's nvcc matching torch's CUDA major version (CUDA_HOME or /usr/local/cuda), an
# NVIDIA GPU. Needs no network: no venv, no make, no pip. Optional peers (diffsort, trl, cut_cross_entropy,
# liger_kernel, torchsurv) and hypothesis are used when importable; a missing one is skipped and the report
# says so. The extension is built in place against that python's torch (build/, prefrank/_C*.so and the link
# prefrank/triton_kernels -> ../triton_kernels, all git-ignored); nothing else in the checkout is written.
# Every step has a time limit and a failing step is recorded in the report while the next ones still run; the
# whole script stays within GPU_SH_BUDGET_S seconds (default 450: the benchmark step gets what is left).
# Knobs: GPU_SH_TESTS (pytest paths, default "tests"), GPU_SH_BENCH_ARGS (extra benchmarks/run.py arguments,
# e.g. case-name filters), GPU_SH_BUDGET_S, GPU_SH_TIME_BUDGET_S (run.py --budget-s: seconds of timing per
# implementation and pass, default 0.25), MAX_JOBS (parallel compile jobs, default nproc). The benchmarks run
# the most important shapes of every family first, so a run cut off by the budget still has the headline rows.
# --cpu: no nvidia-smi, CPU-only build (PREFRANK_CUDA=0), `pytest -m cuda` (every test skips without a GPU), and
# the benchmarks on the CPU in --quick mode (tiny shapes): it checks the script, it measures nothing.
set -uo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: bash benchmarks/gpu.sh OUTDIR [--cpu]" >&2
    exit 2
fi
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || { echo "cannot create $1" >&2; exit 2; }
MODE=cuda
[[ ${2:-} == --cpu ]] && MODE=cpu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
BUDGET=${GPU_SH_BUDGET_S:-450}
TESTS=${GPU_SH_TESTS:-tests}
LOGS=$OUT/logs
REPORT=$OUT/report.md
CSV=$OUT/benchmarks.csv
mkdir -p "$LOGS"
rm -f "$CSV" "$LOGS/benchmarks.csv"
START=$SECONDS
STEPS=()

# step NAME LIMIT_S FUNCTION: runs the (exported) FUNCTION in a child bash with a time limit, output to logs/NAME.log, records the outcome
step() {
    local name=$1 limit=$2 started=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=15 "$limit" bash -c "$*" >"$LOGS/$name.log" 2>&1
    rc=$?
    local status="ok"
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        status="**timed out** after ${limit}s"
    elif [[ $rc -ne 0 ]]; then
        status="**failed** (exit $rc)"
    fi
    STEPS+=("| $name | $status | $((SECONDS - started)) |")
    echo "   $status"
    return $rc
}

left() {  # seconds left of the budget, minus a reserve for the report
    local remaining=$((BUDGET - (SECONDS - START) - 20))
    ((remaining < 30)) && remaining=30
    echo $remaining
}

environment() {
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); host: $(hostname); kernel: $(uname -sr); cpus: $(nproc)"
    echo "mode: $MODE; python: $PY ($("$PY" --version 2>&1))"
    if [[ $MODE == cuda ]]; then
        nvidia-smi || echo "nvidia-smi failed"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
    else
        echo "nvidia-smi: not run (--cpu)"
    fi
    local nvcc
    nvcc=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
    if [[ -x $nvcc ]]; then echo "nvcc ($nvcc): $("$nvcc" --version | tail -n 2 | tr '\n' ' ')"; else echo "nvcc: not found"; fi
    "$PY" - <<'EOF'
import importlib.util
import torch
print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as err:
    print(f"triton: not importable ({err})")
for name in ("transformers", "pytest", "hypothesis", "diffsort", "trl", "cut_cross_entropy", "liger_kernel",
             "torchsurv", "matplotlib"):
    found = importlib.util.find_spec(name) is not None
    print(f"{name}: {'installed' if found else 'NOT installed (its peers/tests are skipped)'}")
EOF
}

build() {
    ln -sfn ../triton_kernels prefrank/triton_kernels || return 1
    local want_cuda=0
    [[ $MODE == cuda ]] && want_cuda=1
    # an in-place build that is current (source hash) and has the wanted kernels is kept: reruns are cheap
    if PYTHONPATH=$ROOT "$PY" -c "
import sys
from prefrank import _extension as e
sys.exit(0 if e.available() and (not $want_cuda or e.has_cuda_kernels()) else 1)" 2>/dev/null; then
        echo "prefrank._C in place is current (source hash matches): build skipped"
    else
        PREFRANK_CUDA=$want_cuda MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py build_ext --inplace || return 1
    fi
    PYTHONPATH=$ROOT "$PY" -c "
import prefrank, prefrank.triton_kernels as t
from prefrank import _extension as e
e.require()
print('prefrank', prefrank.__file__, '| triton_kernels', t.__file__, '| CUDA kernels:', e.has_cuda_kernels())
assert e.has_cuda_kernels() or not $want_cuda, 'the extension was built without its CUDA kernels'"
}

tests() {
    local interpret=()
    [[ $MODE == cuda ]] && interpret=(env TRITON_INTERPRET=0)  # conftest.py defaults it to 1 (CPU interpreter)
    # a test module that cannot be imported here (a missing optional package) must not stop the others
    PYTHONPATH=$ROOT "${interpret[@]}" "$PY" -m pytest $TESTS -m cuda -q -rfEs -p no:cacheprovider \
        --continue-on-collection-errors
    local rc=$?
    [[ $rc -eq 5 ]] && { echo "(no test marked cuda was collected)"; return 0; }
    return $rc
}

bench() {
    local extra=()
    [[ $MODE == cpu ]] && extra=(--quick)
    [[ $MODE == cuda ]] && export TRITON_INTERPRET=0  # compiled Triton kernels, whatever the caller's shell says
    unset PREFRANK_BACKEND PREFRANK_DEBUG PREFRANK_POISON_OUTPUTS  # measure the defaults
    # in-process peak memory: exact on CUDA (the allocator's counter) and saves one process start per case
    PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT "$PY" benchmarks/run.py --device "$MODE" --csv "$LOGS/benchmarks.csv" \
        --memory inprocess \
        --no-plot --budget-s "${GPU_SH_TIME_BUDGET_S:-0.25}" "${extra[@]}" ${GPU_SH_BENCH_ARGS:-}
}

export MODE PY ROOT TESTS LOGS
export -f environment build tests bench
FAILED=0
step environment 60 environment || FAILED=1
if step build 300 build; then
    step tests 150 tests || FAILED=1
    step benchmarks "$(left)" bench || FAILED=1
    [[ -f $LOGS/benchmarks.csv ]] && cp "$LOGS/benchmarks.csv" "$CSV"  # the rows written, all or up to a cut-off
else
    FAILED=1
    STEPS+=("| tests | not run: the build failed | 0 |" "| benchmarks | not run: the build failed | 0 |")
fi

{
    echo "# prefrank on $( [[ $MODE == cuda ]] && echo "a CUDA machine" || echo "the CPU (dry run: --cpu, quick shapes)" )"
    echo
    echo "Written by \`benchmarks/gpu.sh\` at $(date -u '+%Y-%m-%d %H:%M:%S UTC') in $((SECONDS - START)) s;"
    if COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null); then
        git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || COMMIT="$COMMIT with uncommitted changes"
    else
        COMMIT="unknown (not a git checkout)"
    fi
    echo "commit $COMMIT. Full logs: \`logs/\`."
    echo
    echo "## Steps"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---:|"
    printf '%s\n' "${STEPS[@]}"
    echo
    echo "## Environment"
    echo
    echo '```'
    cat "$LOGS/environment.log"
    echo '```'
    echo
    echo "## Build (last 25 lines)"
    echo
    echo '```'
    tail -n 25 "$LOGS/build.log" 2>/dev/null
    echo '```'
    echo
    echo "## Tests (\`pytest $TESTS -m cuda\`)"
    echo
    if [[ -f $LOGS/tests.log ]]; then
        echo "Failures and errors:"
        echo
        echo '```'
        grep -E '^(FAILED|ERROR) ' "$LOGS/tests.log" || echo "(none)"
        echo '```'
        echo
        echo "Summary (last 15 lines):"
        echo
        echo '```'
        tail -n 15 "$LOGS/tests.log"
        echo '```'
    else
        echo "(not run)"
    fi
    echo
    echo "## Benchmarks"
    echo
    if [[ -s $CSV ]]; then
        PYTHONPATH=$ROOT "$PY" benchmarks/run.py --report "$CSV" 2>&1
        echo
        echo "Rows are in \`benchmarks.csv\`. Benchmark log, last 15 lines:"
    else
        echo "No benchmark rows were written. Benchmark log, last 15 lines:"
    fi
    echo
    echo '```'
    tail -n 15 "$LOGS/benchmarks.log" 2>/dev/null
    echo '```'
} >"$REPORT"
echo "wrote $REPORT and $CSV in $((SECONDS - START)) s"
exit $FAILED
