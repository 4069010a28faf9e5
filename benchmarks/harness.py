"""Benchmark cases shared by the pytest-benchmark suites and ``benchmarks/run.py``.

Each op family adds a module ``benchmarks/cases_<family>.py`` with a function ``cases(device) -> list[Case]``.
A case builds its inputs when ``make()`` is called and returns two closures: one forward pass and one
forward+backward pass (each must finish its work before returning; run.py synchronises CUDA itself).
"""

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    op: str          # e.g. "plackett_luce_nll"
    shape: str       # e.g. "B=16384,K=16"
    dtype: str       # e.g. "float32"
    impl: str        # "prefrank", "reference" or a peer ("diffsort", "torch")
    make: Callable[[], tuple[Callable[[], object], Callable[[], object]]]
    device: str = "cpu"

    @property
    def name(self):
        return f"{self.op}[{self.shape},{self.dtype},{self.device}]-{self.impl}"
