"""AOT compile of the sorting-network Triton kernels for sm_80 / sm_90: no spills, shared memory fits."""

import pytest

from prefrank._options import Relaxation, Target
from prefrank.triton_kernels import sortnet as kernels
from tests.triton_aot import assert_healthy, compile_reports

_MODULE = "prefrank.triton_kernels.sortnet:"


def _specs(n, dtype="fp32", relaxations=tuple(Relaxation)):
    """Every constexpr combination the launchers use for lists of n items (the values kernels once per
    relaxation in ``relaxations``: each is its own compiled specialisation)."""
    block_n, rows_forward, rows_backward, num_warps = kernels.launch_config(n)
    f, i64 = f"*{dtype}", "*i64"
    specs = []
    values_forward = {"x_ptr": f, "sizes_ptr": i64, "values_ptr": f, "alpha_ptr": f, "n": "i32",
                      "max_layers": "i32", "network": "i32", "s": "fp32", "lam": "fp32",
                      "RELAXATION": "constexpr", "HAS_SIZES": "constexpr", "BLOCK_N": "constexpr"}
    rows_forward_sig = {"alpha_ptr": f, "sizes_ptr": i64, "perm_ptr": f, "lo_ptr": i64, "hi_ptr": i64,
                        "row_loss_ptr": f, "n": "i32", "max_layers": "i32", "network": "i32",
                        "HAS_SIZES": "constexpr", "TARGET": "constexpr", "BLOCK_R": "constexpr",
                        "BLOCK_N": "constexpr"}
    rows_backward_sig = {"alpha_ptr": f, "sizes_ptr": i64, "grad_perm_ptr": f, "grad_loss_ptr": f,
                         "lo_ptr": i64, "hi_ptr": i64, "ckpt_ptr": f, "dalpha_ptr": f, "n": "i32",
                         "max_layers": "i32", "num_ckpt": "i32", "ckpt_every": "i32", "network": "i32",
                         "HAS_SIZES": "constexpr", "TARGET": "constexpr", "BLOCK_R": "constexpr",
                         "BLOCK_N": "constexpr"}
    values_backward = {"grad_values_ptr": f, "x_ptr": f, "alpha_ptr": f, "dalpha_ptr": f, "sizes_ptr": i64,
                       "xs_ptr": f, "grad_x_ptr": f, "n": "i32", "max_layers": "i32", "network": "i32",
                       "s": "fp32", "lam": "fp32", "RELAXATION": "constexpr", "HAS_GRAD_VALUES": "constexpr",
                       "HAS_DALPHA": "constexpr", "HAS_SIZES": "constexpr", "BLOCK_N": "constexpr"}
    for relaxation in relaxations:
        for has_sizes in (False, True):  # soft_sort / rank losses
            specs.append(("_values_forward_kernel", values_forward,
                          {"RELAXATION": int(relaxation), "HAS_SIZES": has_sizes, "BLOCK_N": block_n}))
        for grad_values, dalpha, has_sizes in ((True, True, False), (True, False, False), (False, True, True)):
            specs.append(("_values_backward_kernel", values_backward,
                          {"RELAXATION": int(relaxation), "HAS_GRAD_VALUES": grad_values, "HAS_DALPHA": dalpha,
                           "HAS_SIZES": has_sizes, "BLOCK_N": block_n}))
    for target in (kernels.WRITE_P, int(Target.block), int(Target.permutation)):  # P / the two loss targets
        constexprs = {"HAS_SIZES": target != kernels.WRITE_P, "TARGET": target}
        specs.append(("_rows_forward_kernel", rows_forward_sig,
                      {**constexprs, "BLOCK_R": rows_forward, "BLOCK_N": block_n}))
        specs.append(("_rows_backward_kernel", rows_backward_sig,
                      {**constexprs, "BLOCK_R": rows_backward, "BLOCK_N": block_n}))
    return [{"kernel": _MODULE + name, "signature": sig, "constexprs": constexprs, "num_warps": num_warps}
            for name, sig, constexprs in specs]


@pytest.mark.slow
def test_values_kernels_compile_healthy_for_every_relaxation():
    """Each relaxation is its own compiled specialisation of the two values kernels (``if RELAXATION == …``
    on a constexpr): every one, in every variant, at the largest tile (n = MAX_N)."""
    specs = [s for s in _specs(kernels.MAX_N) if "_values_" in s["kernel"]]
    reports = compile_reports(specs, timeout=1800)
    assert len(reports) == 2 * len(specs)
    assert_healthy(reports)
    compiled = {(r["kernel"].split(":")[1], r["constexprs"]["RELAXATION"]) for r in reports}
    assert compiled == {(kernel, int(relaxation)) for relaxation in Relaxation
                        for kernel in ("_values_forward_kernel", "_values_backward_kernel")}


@pytest.mark.slow
def test_row_kernels_compile_healthy():
    """The register-heavy row kernels (independent of the relaxation), every TARGET variant, at the smallest
    tile, the first 8-warp tile (n = 256) and the limit n = MAX_N. At n = 1024 they spilled, hence MAX_N = 512."""
    specs = [s for n in (16, 256, kernels.MAX_N) for s in _specs(n, relaxations=()) if "_rows_" in s["kernel"]]
    reports = compile_reports(specs, timeout=1800)
    assert len(reports) == 2 * len(specs)
    assert_healthy(reports)
