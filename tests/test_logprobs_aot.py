"""Every Triton configuration the logprobs launcher can pick compiles for sm_80 and sm_90 with no register
spills and shared memory within each architecture's limit (AOT, no GPU needed)."""

from prefrank.triton_kernels import logprobs as kernels
from tests.triton_aot import assert_healthy, compile_reports

MODULE = "prefrank.triton_kernels.logprobs"
# logits dtype -> accumulator (logp/lse) dtype; the launcher accepts every float dtype
DTYPES = {"fp32": "fp32", "fp16": "fp32", "bf16": "fp32", "fp64": "fp64"}


def _specs():
    specs = []
    for block, warps, stages in kernels.CONFIGS:
        for dtype, acc in DTYPES.items():
            common = {"constexprs": {"BLOCK_V": block}, "num_warps": warps, "num_stages": stages}
            specs.append({"kernel": f"{MODULE}:logprobs_fwd_kernel", **common, "signature": {
                "logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "logp_ptr": f"*{acc}", "lse_ptr": f"*{acc}",
                "T": "i32", "V": "i32", "stride_b": "i64", "stride_t": "i64", "ignore_index": "i32",
                "inv_temp": "fp32", "BLOCK_V": "constexpr"}})
            specs.append({"kernel": f"{MODULE}:logprobs_bwd_kernel", **common, "signature": {
                "grad_ptr": f"*{acc}", "logits_ptr": f"*{dtype}", "labels_ptr": "*i64", "lse_ptr": f"*{acc}",
                "out_ptr": f"*{dtype}", "T": "i32", "V": "i32", "stride_b": "i64", "stride_t": "i64",
                "out_stride_b": "i64", "out_stride_t": "i64", "ignore_index": "i32", "inv_temp": "fp32",
                "BLOCK_V": "constexpr"}})
    return specs


def test_configs_cover_the_launcher():
    picked = {kernels.config(V) for V in (1, 7, 1000, 1024, 1025, 32000, 151936, 262147)}
    assert picked == set(kernels.CONFIGS)


def test_every_config_compiles_without_spills():
    reports = compile_reports(_specs())
    assert len(reports) == len(_specs()) * 2
    assert_healthy(reports)
