"""Benchmark cases shared by the pytest-benchmark suites and ``benchmarks/run.py``.

Each op family adds a module ``benchmarks/cases_<family>.py`` with a function
``cases(device, quick=False) -> list[Case]`` (``quick``: tiny shapes only, for the tests of the harness).
A case builds its inputs when ``make()`` is called and returns two closures: one forward pass and one
forward+backward pass (each must finish its work before returning; run.py synchronises CUDA itself).

Every implementation of one (op, shape, dtype) must compute the same numbers: ``forward()`` returns the same
result (up to shape: results are compared flattened) and ``forward_backward()`` the same gradients as the
plain "prefrank" case of its group. run.py checks this before it times anything: a peer that disagrees is
reported, not timed; "reference" (``prefrank.reference``, the oracle) is only checked, never timed.
"""

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

PREFRANK = "prefrank"
ORACLE = "reference"


@dataclass(frozen=True)
class Case:
    op: str          # e.g. "plackett_luce_nll"
    shape: str       # e.g. "B=16384,K=16"
    dtype: str       # e.g. "float32"
    impl: str        # "prefrank", "prefrank <option>", "reference" (the oracle) or a peer ("torch idiom", ...)
    make: Callable[[], tuple[Callable[[], object], Callable[[], object]]]
    device: str = "cpu"
    requires: tuple[str, ...] = ()  # modules a peer needs; a missing one skips the case with that reason
    rtol: float | None = None       # check tolerance when the peer approximates on purpose (say why there)

    @property
    def name(self):
        return f"{self.op}[{self.shape},{self.dtype},{self.device}]-{self.impl}"

    @property
    def group(self):
        return (self.op, self.shape, self.dtype, self.device)

    @property
    def role(self):
        """"prefrank" (our op or one of its options), "oracle" (checked only) or "peer" (checked and timed)."""
        if self.impl == PREFRANK or self.impl.startswith(PREFRANK + " "):
            return "prefrank"
        return "oracle" if self.impl == ORACLE else "peer"

    def missing(self):
        """Why this case cannot run here ("" if it can): the first required module that is not installed."""
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        return ""


def default_rtol(dtype):
    """Check tolerance, relative to the largest magnitude of the prefrank result: loose enough for
    accumulation-order differences, tight enough to catch a peer computing another quantity."""
    return 2e-2 if dtype in ("bfloat16", "float16") else 1e-4


# run.py --quick sets "aot_eager": the tests of the harness then trace the compiled peers without waiting for
# inductor's code generation (their times are not measurements)
COMPILE_BACKEND = {"backend": "inductor"}


def compile_static(fn):
    """``torch.compile`` of a peer, specialised to each shape (its best case: no dynamic-shape kernels);
    every case compiles its own graph, so the recompile limit is raised above the number of shapes."""
    import torch

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    return torch.compile(fn, dynamic=False, backend=COMPILE_BACKEND["backend"])
