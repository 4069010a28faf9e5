"""Triton kernels for per-token log-probabilities of labelled tokens (the GPU path of sequence_logprobs).

One program per token row of ``logits`` ``(rows, T, V)`` (any strides on rows/T, unit stride on V). With
``z = logits[row, t, :] / temperature`` and label ``y``:

forward   lse = log Σ_v exp(z_v) by an online max/sum over vocabulary tiles (fp32, or fp64 for fp64
          logits), then logp = z_y − lse. Tokens whose label is ``ignore_index`` run no iteration and write
          logp = lse = 0: their row is never read.
backward  logp = z_y − lse(z) gives ∂logp/∂logits_v = (δ_vy − softmax(z)_v) / temperature, so with the
          per-token upstream gradient g: grad_v = g · (δ_vy − exp(z_v − lse)) / temperature. The saved lse
          makes this a single read of the row and a single write of the gradient in the logits' dtype (no
          fp32 row buffer); ignored rows get zeros without reading the logits. Each element is read before
          it is written by the same program, so ``out`` may be the logits themselves (the lm-head path
          turns its own chunk of logits into the gradient in place; so does ``inplace_backward=True``).
          A label outside [0, V) (not checked on CUDA by default) gives a NaN logp and never an
          out-of-bounds access.

The loop over vocabulary tiles covers any V (including V > 256k and V not a multiple of the tile). The
per-token results are reduced per sequence/segment by the caller (a deterministic torch reduction over a
vector of ``tokens`` floats).
"""

import triton
import triton.language as tl


@triton.jit
def logprobs_fwd_kernel(logits_ptr, labels_ptr, logp_ptr, lse_ptr, T, V, stride_b, stride_t, ignore_index,
                        inv_temp, BLOCK_V: tl.constexpr):
    """logp[n] = logits[n, y]/τ − logsumexp(logits[n, :]/τ), lse[n] = that logsumexp (0, 0 if ignored)."""
    n = tl.program_id(0).to(tl.int64)
    acc_ty = lse_ptr.dtype.element_ty
    row = logits_ptr + (n // T) * stride_b + (n % T) * stride_t
    label = tl.load(labels_ptr + n)
    active = label != ignore_index
    v_end = tl.where(active, V, 0)  # ignored token: no iteration, the row is never read
    m = tl.full((), float("-inf"), acc_ty)
    s = tl.zeros((), acc_ty)
    for start in range(0, v_end, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(row + offs, mask=offs < V, other=float("-inf")).to(acc_ty) * inv_temp
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # a tile of -inf only (masked vocabulary) keeps m = -inf: shift by 0 there instead of NaN (-inf + inf)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        m = m_new
    label_ok = active & (label >= 0) & (label < V)
    z_label = tl.load(row + label, mask=label_ok, other=0.0).to(acc_ty) * inv_temp
    lse = m + tl.log(tl.where(active, s, 1.0))  # ignored token: s = 0, keep log() finite
    tl.store(lse_ptr + n, tl.where(active, lse, 0.0))
    # a label outside [0, V) (only unchecked on CUDA): NaN, never an out-of-bounds read
    logp = tl.where(label_ok, z_label - lse, float("nan"))
    tl.store(logp_ptr + n, tl.where(active, logp, 0.0))


@triton.jit
def logprobs_bwd_kernel(grad_ptr, logits_ptr, labels_ptr, lse_ptr, out_ptr, T, V, stride_b, stride_t,
                        out_stride_b, out_stride_t, ignore_index, inv_temp, BLOCK_V: tl.constexpr):
    """out[n, v] = g[n]·(δ_{v,y} − exp(logits[n, v]/τ − lse[n]))/τ in out's dtype; 0 rows for ignored."""
    n = tl.program_id(0).to(tl.int64)
    acc_ty = lse_ptr.dtype.element_ty
    b = n // T
    t = n % T
    row = logits_ptr + b * stride_b + t * stride_t
    out_row = out_ptr + b * out_stride_b + t * out_stride_t
    label = tl.load(labels_ptr + n)
    active = label != ignore_index
    lse = tl.load(lse_ptr + n).to(acc_ty)
    scale = tl.load(grad_ptr + n).to(acc_ty) * inv_temp
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        inside = offs < V
        z = tl.load(row + offs, mask=inside & active, other=0.0).to(acc_ty) * inv_temp
        grad = scale * (tl.where(offs == label, 1.0, 0.0) - tl.exp(z - lse))
        grad = tl.where(active, grad, 0.0)
        tl.store(out_row + offs, grad.to(out_ptr.dtype.element_ty), mask=inside)


def config(V):
    """(BLOCK_V, num_warps, num_stages) the launcher uses for a vocabulary of V (also the AOT-tested set)."""
    if V <= 1024:
        return 1024, 4, 2
    return 4096, 8, 2


CONFIGS = ((1024, 4, 2), (4096, 8, 2))


def forward(logits, labels, ignore_index, temperature, logp, lse):
    """Launch the forward kernel: logits (rows, T, V) unit V stride; labels (rows, T) contiguous int64;
    logp/lse (rows, T) contiguous fp32 (fp64 for fp64 logits), every element written."""
    rows, T, V = logits.shape
    n_tokens = rows * T
    if n_tokens == 0:
        return
    block, warps, stages = config(V)
    logprobs_fwd_kernel[(n_tokens,)](logits, labels, logp, lse, T, V, logits.stride(0), logits.stride(1),
                                     ignore_index, 1.0 / temperature, BLOCK_V=block, num_warps=warps,
                                     num_stages=stages)


def backward(grad_logp, logits, labels, lse, ignore_index, temperature, out):
    """Launch the backward kernel into ``out`` (rows, T, V), unit V stride; ``out`` may be ``logits``."""
    rows, T, V = logits.shape
    n_tokens = rows * T
    if n_tokens == 0:
        return
    block, warps, stages = config(V)
    logprobs_bwd_kernel[(n_tokens,)](grad_logp, logits, labels, lse, out, T, V, logits.stride(0),
                                     logits.stride(1), out.stride(0), out.stride(1), ignore_index,
                                     1.0 / temperature, BLOCK_V=block, num_warps=warps, num_stages=stages)
