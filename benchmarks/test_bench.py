"""pytest-benchmark suite over every case of benchmarks/cases_*.py (prefrank and the peers installed here; the
oracle and the numerical checks are run.py's):

    pytest benchmarks/test_bench.py --benchmark-only [-k plackett]
"""

import pytest
import torch

from benchmarks.run import all_cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [c for _, _, c in all_cases(DEVICE) if c.role != "oracle"]


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.skip(reason=c.missing())) if c.missing() else c
                                  for c in CASES], ids=[c.name for c in CASES])
@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
def test_benchmark(benchmark, case, pass_):
    forward, forward_backward = case.make()
    fn = forward if pass_ == "fwd" else forward_backward
    if DEVICE == "cuda":
        def fn_synced():
            fn()
            torch.cuda.synchronize()
        benchmark(fn_synced)
    else:
        benchmark(fn)
