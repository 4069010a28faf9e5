"""Ahead-of-time compile Triton kernels for real GPUs without one, and report their resource use.

``compile_reports(specs)`` compiles every spec in ONE subprocess without ``TRITON_INTERPRET`` (an AOT
compile fails in an interpreter process), for the given architectures, and returns for each: registers,
spill bytes (``ptxas -v`` bundled with triton), dynamic shared memory (``metadata.shared``) and the
shared-memory limit of that architecture. A spec is a dict:

    {"kernel": "prefrank.triton_kernels.logprobs:_forward_kernel",   # module:attribute of a @triton.jit
     "signature": {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
     "constexprs": {"BLOCK": 1024},
     "num_warps": 4, "num_stages": 3}                                  # optional
"""

import json
import os
import subprocess
import sys

ARCHS = (80, 90)
# opt-in dynamic shared memory per block
SHARED_LIMIT = {80: 166912, 90: 232448}

_WORKER = r"""
import importlib, json, re, subprocess, sys, tempfile, os
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

specs, archs = json.load(sys.stdin)
out = []
for spec in specs:
    module, attr = spec["kernel"].split(":")
    fn = getattr(importlib.import_module(module), attr)
    for arch in archs:
        src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec.get("constexprs", {}))
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.get("num_warps", 4),
                                     "num_stages": spec.get("num_stages", 3)})
        ptxas = triton.knobs.nvidia.ptxas_blackwell.path if arch >= 90 else triton.knobs.nvidia.ptxas.path
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            open(ptx, "w").write(ck.asm["ptx"])
            log = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", ptx, "-o", os.devnull],
                                 capture_output=True, text=True, check=True).stderr
        stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log))
        loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log))
        regs = max(int(x) for x in re.findall(r"Used (\d+) registers", log))
        out.append({"kernel": spec["kernel"], "constexprs": spec.get("constexprs", {}), "arch": arch,
                    "num_warps": spec.get("num_warps", 4), "registers": regs, "spill_stores": stores,
                    "spill_loads": loads, "shared": ck.metadata.shared})
json.dump(out, sys.stdout)
"""


def compile_reports(specs, archs=ARCHS, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _WORKER], input=json.dumps([specs, list(archs)]),
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile failed:\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout)


def assert_healthy(reports):
    """Every compiled configuration: no spills and shared memory within its architecture's limit."""
    for r in reports:
        where = f"{r['kernel']} {r['constexprs']} num_warps={r['num_warps']} sm_{r['arch']}"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{where} spills: {r}"
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], f"{where} needs {r['shared']} B shared memory"
        assert r["registers"] <= 255, f"{where} uses {r['registers']} registers"
