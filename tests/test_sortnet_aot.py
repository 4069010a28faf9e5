"""AOT compile of the sorting-network Triton kernels for sm_80 / sm_90: no spills, shared memory fits."""

import pytest
from prefrank.triton_kernels import sortnet as kernels

from tests.triton_aot import assert_healthy, compile_reports

_MODULE = "prefrank.triton_kernels.sortnet:"


def _specs(n, dtype="fp32"):
    """Every constexpr combination the launchers use for lists of n items."""
    block_n, rows_forward, rows_backward, num_warps = kernels.launch_config(n)
    f, i64 = f"*{dtype}", "*i64"
    specs = []
    values_forward = {"x_ptr": f, "sizes_ptr": i64, "values_ptr": f, "alpha_ptr": f, "xs_ptr": f, "n": "i32",
                      "max_layers": "i32", "network": "i32", "relaxation": "i32", "s": "fp32", "lam": "fp32",
                      "HAS_SIZES": "constexpr", "BLOCK_N": "constexpr"}
    rows_forward_sig = {"alpha_ptr": f, "sizes_ptr": i64, "perm_ptr": f, "lo_ptr": i64, "hi_ptr": i64,
                        "row_loss_ptr": f, "n": "i32", "max_layers": "i32", "network": "i32",
                        "HAS_SIZES": "constexpr", "MODE": "constexpr", "BLOCK_R": "constexpr",
                        "BLOCK_N": "constexpr"}
    rows_backward_sig = {"alpha_ptr": f, "sizes_ptr": i64, "grad_perm_ptr": f, "grad_loss_ptr": f,
                         "lo_ptr": i64, "hi_ptr": i64, "ckpt_ptr": f, "dalpha_ptr": f, "n": "i32",
                         "max_layers": "i32", "num_ckpt": "i32", "ckpt_every": "i32", "network": "i32",
                         "HAS_SIZES": "constexpr", "MODE": "constexpr", "BLOCK_R": "constexpr",
                         "BLOCK_N": "constexpr"}
    values_backward = {"grad_values_ptr": f, "xs_ptr": f, "alpha_ptr": f, "dalpha_ptr": f,
                       "sizes_ptr": i64, "grad_x_ptr": f, "n": "i32", "max_layers": "i32", "network": "i32",
                       "relaxation": "i32", "s": "fp32", "lam": "fp32", "HAS_GRAD_VALUES": "constexpr",
                       "HAS_DALPHA": "constexpr", "HAS_SIZES": "constexpr", "BLOCK_N": "constexpr"}
    for has_sizes in (False, True):  # soft_sort / rank losses
        specs.append(("_values_forward_kernel", values_forward, {"HAS_SIZES": has_sizes, "BLOCK_N": block_n}))
    for mode in (0, 1, 2):  # P / block loss / permutation loss
        specs.append(("_rows_forward_kernel", rows_forward_sig,
                      {"HAS_SIZES": mode > 0, "MODE": mode, "BLOCK_R": rows_forward, "BLOCK_N": block_n}))
        specs.append(("_rows_backward_kernel", rows_backward_sig,
                      {"HAS_SIZES": mode > 0, "MODE": mode, "BLOCK_R": rows_backward, "BLOCK_N": block_n}))
    for grad_values, dalpha, has_sizes in ((True, True, False), (True, False, False), (False, True, False),
                                           (False, True, True)):
        specs.append(("_values_backward_kernel", values_backward,
                      {"HAS_GRAD_VALUES": grad_values, "HAS_DALPHA": dalpha, "HAS_SIZES": has_sizes,
                       "BLOCK_N": block_n}))
    return [{"kernel": _MODULE + name, "signature": sig, "constexprs": constexprs, "num_warps": num_warps}
            for name, sig, constexprs in specs]


@pytest.mark.slow
def test_sortnet_kernels_compile_healthy():
    # Every constexpr variant at the smallest tile, and the register-heavy row kernels (the values kernels
    # stay near 40 registers at every size) at the first 8-warp tile (n = 256) and at the limit n = MAX_N.
    # A full sweep of every variant at n = 512 (≈ 4 min) gave 0 spills, ≤ 184 registers, ≤ 8 KiB shared;
    # at n = 1024 the row kernels spilled, hence MAX_N = 512.
    specs = _specs(16)
    heavy = {(0, "_rows_forward_kernel"), (0, "_rows_backward_kernel"), (2, "_rows_backward_kernel")}
    for n in (256, kernels.MAX_N):
        specs += [s for s in _specs(n)
                  if (s["constexprs"].get("MODE"), s["kernel"].split(":")[1]) in heavy]
    reports = compile_reports(specs)
    assert len(reports) == 2 * len(specs)
    assert_healthy(reports)
