"""Sequence log-probabilities: argument handling, dispatch, reductions and autograd registration.

The kernels compute per-token results on a canonical ``(rows, T, V)`` view of the logits (no copy for the
usual layouts, ``logits[:, :-1]`` included) with ``labels`` ``(rows, T)`` int64 where tokens to skip carry
``ignore_index``:

- ``prefrank::sequence_logprobs_fwd`` → per-token logp and log-sum-exp (0 for skipped tokens; the lse is the
  only thing kept for backward besides the inputs);
- ``prefrank::sequence_logprobs_bwd`` → grad_logits in the logits' dtype from a per-token gradient;
- ``prefrank::sequence_logprobs_bwd_`` → the same written over the logits (lm-head chunks only).

CPU tensors run the C++ kernels (csrc/logprobs_cpu.cpp); CUDA tensors the Triton kernels
(triton_kernels/logprobs.py), registered as the CUDA implementation of the same ops; backend "triton" runs
the Triton kernels on CPU tensors too (under TRITON_INTERPRET=1). Per-token values are reduced to
per-sequence or per-segment sums here with deterministic torch ops on the tiny ``(tokens,)`` vector, whose
autograd maps the per-sequence gradient back to tokens (g[segment]).
"""

import torch

from prefrank import _checks, _extension, backend, reference

# live logits of one linear_sequence_logprobs chunk, by device (the default chunk_size derives from it)
CHUNK_BUDGET_BYTES = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton():
    from prefrank.triton_kernels import logprobs as kernels  # imports triton: only on the Triton path

    return kernels


# ---------------------------------------------------------------------------------------------------------
# Kernel entry points without autograd (Triton launchers; the C++ ops are called through torch.ops)
# ---------------------------------------------------------------------------------------------------------

def _fwd_triton(logits, labels, ignore_index, temperature):
    acc = _acc_dtype(logits.dtype)
    logp = _checks.new_output(labels.shape, dtype=acc, device=logits.device)
    lse = _checks.new_output(labels.shape, dtype=acc, device=logits.device)
    _triton().forward(logits, labels.contiguous(), ignore_index, temperature, logp, lse)
    return logp, lse


def _bwd_triton_into(grad_logp, logits, labels, lse, ignore_index, temperature, out):
    acc = _acc_dtype(logits.dtype)
    _triton().backward(grad_logp.to(acc).contiguous(), logits, labels.contiguous(), lse.to(acc).contiguous(),
                       ignore_index, temperature, out)


def _bwd_triton(grad_logp, logits, labels, lse, ignore_index, temperature):
    out = _checks.new_output(logits.shape, dtype=logits.dtype, device=logits.device)
    _bwd_triton_into(grad_logp, logits, labels, lse, ignore_index, temperature, out)
    return out


def _bwd_triton_inplace(grad_logp, logits, labels, lse, ignore_index, temperature):
    _bwd_triton_into(grad_logp, logits, labels, lse, ignore_index, temperature, logits)


def _use_triton(device):
    return device.type == "cuda" or backend.get_backend() == "triton"


def _token_fwd(logits, labels, ignore_index, temperature):
    """(logp, lse) per token, no autograd: Triton on CUDA / backend "triton", else the C++ op."""
    if _use_triton(logits.device):
        return _fwd_triton(logits, labels, ignore_index, temperature)
    return torch.ops.prefrank.sequence_logprobs_fwd(logits, labels, ignore_index, temperature)


def _token_bwd_inplace(grad_logp, logits, labels, lse, ignore_index, temperature):
    if _use_triton(logits.device):
        _bwd_triton_inplace(grad_logp, logits, labels, lse, ignore_index, temperature)
    else:
        torch.ops.prefrank.sequence_logprobs_bwd_(grad_logp, logits, labels, lse, ignore_index, temperature)


class _TokenLogprobs(torch.autograd.Function):
    """Per-token logps through the Python-side launchers, for the two cases the registered op does not cover:

    - backend "triton" on CPU tensors (interpreter): the registered ops would route CPU to C++;
    - ``inplace_backward=True`` (any device): the backward writes the gradient over the saved logits and
      returns them. That saves the T×V gradient buffer the default path allocates (the peers' in-place
      cross-entropy trick). The write bumps the logits' version counter, so anything that still needs the
      old values (a second backward through this graph, an op that saved the same tensor) raises autograd's
      "modified by an inplace operation" error instead of reading the gradient.
    """

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, temperature, inplace):
        logp, lse = _token_fwd(logits, labels, ignore_index, temperature)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index, ctx.temperature, ctx.inplace = ignore_index, temperature, inplace
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, labels, lse = ctx.saved_tensors
        if not ctx.inplace:  # backend "triton" on CPU tensors
            grad = _bwd_triton(grad_logp, logits, labels, lse, ctx.ignore_index, ctx.temperature)
            return grad, None, None, None, None
        _token_bwd_inplace(grad_logp, logits, labels, lse, ctx.ignore_index, ctx.temperature)  # casts grad_logp
        torch.autograd.graph.increment_version(logits)
        return logits, None, None, None, None


def _token_logprobs(logits, labels, ignore_index, temperature, inplace_backward=False):
    """Differentiable per-token logps (rows, T) of the canonical layout."""
    if inplace_backward and logits.requires_grad:
        if not _use_triton(logits.device):
            _extension.require()
        return _TokenLogprobs.apply(logits, labels, ignore_index, temperature, True)
    if backend.get_backend() == "triton" and logits.device.type != "cuda":
        return _TokenLogprobs.apply(logits, labels, ignore_index, temperature, False)
    _extension.require()
    logp, _ = torch.ops.prefrank.sequence_logprobs_fwd(logits, labels, ignore_index, temperature)
    return logp


# ---------------------------------------------------------------------------------------------------------
# Validation and reductions
# ---------------------------------------------------------------------------------------------------------

def _check_common(input_name, input, labels, V, segment_ids, num_segments, ignore_index, temperature,
                  reduction):
    """Checks shared by both ops; ``input`` is the logits/hidden tensor whose last dim labels drop."""
    _checks.int_tensor("labels", labels)
    expected_shape = input.shape[:-1]
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"labels must have shape {tuple(expected_shape)} ({input_name} without its last "
                         f"dim), got {tuple(labels.shape)}")
    _checks.same_device(input_name, input, labels=labels, segment_ids=segment_ids)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    _checks.choice("reduction", reduction, _checks.REDUCTIONS)
    if segment_ids is None:
        if num_segments is not None:
            raise ValueError("num_segments is only meaningful together with segment_ids")
    else:
        _checks.int_tensor("segment_ids", segment_ids)
        _checks.same_shape("labels", labels, segment_ids=segment_ids)
        if num_segments is None:
            raise ValueError("segment_ids needs num_segments (the number of output slots)")
        if isinstance(num_segments, bool) or not isinstance(num_segments, int):
            raise TypeError(f"num_segments must be an int, got {type(num_segments).__name__}")
        if num_segments < 0:
            raise ValueError(f"num_segments must be >= 0, got {num_segments}")
        if not _checks.compiling() and segment_ids.numel() and (
                (segment_ids < -1) | (segment_ids >= num_segments)).any():
            raise ValueError(f"segment_ids must lie in [0, {num_segments}) or be -1 (skip)")
    if not _checks.compiling() and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bad.any():
            raise ValueError(f"labels must lie in [0, {V}) (the vocabulary) or equal ignore_index="
                             f"{ignore_index}; got {labels[bad].flatten()[0].item()}")


def _effective_labels(labels, segment_ids, ignore_index):
    """int64 labels where tokens outside every segment are ignored too, plus the mask of counted tokens."""
    labels = labels.to(torch.int64)
    if segment_ids is not None:
        labels = torch.where(segment_ids >= 0, labels, ignore_index)
    return labels, labels != ignore_index


def _segment_sum(values, segment_ids, num_segments):
    """Σ of values per segment id in [0, num_segments) (-1 skipped), deterministic on every device.

    Stable sort by segment, fp64 running sum, difference at the segment ends: no float atomics (index_add
    on CUDA would make the result depend on the scheduling). Differentiable in values.
    """
    key = torch.where(segment_ids >= 0, segment_ids, num_segments).to(torch.int64)
    order = torch.argsort(key, stable=True)
    running = torch.cat([values.new_zeros(1, dtype=torch.float64),
                         torch.cumsum(values[order].to(torch.float64), 0)])
    counts = torch.zeros(num_segments + 1, dtype=torch.int64, device=values.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    ends = torch.cumsum(counts, 0)[:num_segments]
    starts = ends - counts[:num_segments]
    return (running[ends] - running[starts]).to(values.dtype), counts[:num_segments]


def _reduce(token_logp, active, labels_shape, segment_ids, num_segments, reduction):
    """token_logp (rows·T,) with 0 at skipped tokens → output of the requested reduction."""
    if reduction == "none":
        return token_logp.reshape(labels_shape)
    if segment_ids is None:
        sums = token_logp.reshape(labels_shape).sum(-1)
        counts = active.reshape(labels_shape).sum(-1)
    else:  # tokens with a segment but no label are not counted
        slots = torch.where(active, segment_ids, -1).reshape(-1)
        sums, counts = _segment_sum(token_logp, slots, num_segments)
    if reduction == "mean":
        sums = sums / counts.clamp(min=1).to(sums.dtype)
    return sums


def _as_rows(logits):
    """(rows, T, V) view of (..., T, V) logits; a copy only when the leading dims cannot be merged."""
    T, V = logits.shape[-2], logits.shape[-1]
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    try:
        return logits.view(-1, T, V)
    except RuntimeError:
        return logits.reshape(-1, T, V)


def sequence_logprobs(logits, labels, *, segment_ids=None, num_segments=None, ignore_index=-100,
                      temperature=1.0, reduction="sum", inplace_backward=False):
    """Σ_t log softmax(logits/temperature)[t, labels[t]] per sequence (or segment), never materialising it.

    Args:
        logits: ``(..., T, V)`` float tensor (fp32/fp16/bf16/fp64) with unit stride on V; other strides are
            free (``logits[:, :-1]`` is read in place, no copy).
        labels: ``(..., T)`` integer tensor: ``logits[..., t, :]`` scores ``labels[..., t]``; tokens equal to
            ``ignore_index`` are skipped (their logits rows are never read).
        segment_ids: optional ``(..., T)`` integer tensor: token t is summed into output slot
            ``segment_ids[..., t]`` (-1 = skip) instead of its row; packed/varlen batches, several
            responses after one shared prompt.
        num_segments: the number of output slots (required with ``segment_ids``).
        ignore_index: label value of tokens to skip.
        temperature: logits are divided by it (> 0).
        reduction: ``"sum"`` (per-sequence/segment sum), ``"mean"`` (divided by the number of counted
            tokens; 0 when there are none) or ``"none"`` (per-token logps shaped like labels, 0 at skipped
            tokens).
        inplace_backward: opt-in: the backward writes d/dlogits over ``logits`` itself and passes that
            tensor on as the gradient, so fwd+bwd needs no logits-sized buffer at all (the default backward
            allocates one, the gradient). Use it when nothing reads the logits after the loss (the usual
            ``logits = model(...).logits``); their values are the gradient afterwards. (A view of) a leaf
            tensor that requires grad (a parameter) is refused with ValueError. A second backward
            through the same graph, or another op that saved the same logits, then raises autograd's
            "modified by an inplace operation" error. Logits whose leading dims cannot be merged without a
            copy get their gradient in that copy instead (same result, no saving). Ignored by backend
            "reference".

    Returns:
        ``(...)`` (or ``(num_segments,)``, or labels' shape for "none"), float32 for fp32/fp16/bf16 logits
        and float64 for float64 logits. Backward gives d/dlogits in the logits' dtype without any fp32
        ``(…, T, V)`` temporary; nothing is saved when no input requires grad.
    """
    _checks.float_tensor("logits", logits)
    if logits.dim() < 2:
        raise ValueError(f"logits must be (..., T, V) with at least 2 dims, got shape {tuple(logits.shape)}")
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits has an empty vocabulary dim (V = 0)")
    if V > 1 and logits.stride(-1) != 1:
        raise ValueError(f"logits must have unit stride on the vocabulary (last) dim, got stride "
                         f"{logits.stride(-1)}; slice other dims freely, or call .contiguous()")
    _check_common("logits", logits, labels, V, segment_ids, num_segments, ignore_index, temperature,
                  reduction)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if inplace_backward and logits.requires_grad and (
            logits.is_leaf or (logits._base is not None and logits._base.is_leaf)):
        raise ValueError("inplace_backward=True would write the gradient over logits, which are (a view of) a leaf "
                         "tensor that requires grad, e.g. a parameter; it is meant for activations such as "
                         "model(...).logits (torch refuses in-place ops on such leaves for the same reason)")
    if backend.get_backend() == "reference":
        return reference.sequence_logprobs(logits, labels, segment_ids=segment_ids, num_segments=num_segments,
                                           ignore_index=ignore_index, temperature=temperature,
                                           reduction=reduction)
    rows = _as_rows(logits)
    eff_labels, active = _effective_labels(labels, segment_ids, ignore_index)
    eff_labels = eff_labels.reshape(rows.shape[:2]).contiguous()
    token_logp = _token_logprobs(rows, eff_labels, ignore_index, float(temperature), inplace_backward)
    return _reduce(token_logp.reshape(-1), active, labels.shape, segment_ids, num_segments, reduction)


# ---------------------------------------------------------------------------------------------------------
# Fused lm-head
# ---------------------------------------------------------------------------------------------------------

def _chunk_logits(h, weight, bias):
    return torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())


class _LinearTokenLogprobs(torch.autograd.Function):
    """Per-token logps of the labelled tokens h (M, H) under the lm-head (weight (V, H), bias (V,)).

    Forward keeps only the per-token lse. Backward recomputes each chunk's logits, turns them into
    G = ∂/∂logits in place, then grad_h = G·W, grad_W += Gᵀ·h and grad_b += Σ G (accumulated in fp32,
    fp64 for fp64 inputs).

    Frozen lm-head (only h requires grad, e.g. LoRA): G = g·U row by row with U = (onehot − softmax)/τ, so
    grad_h = g·(U·W). The forward forms U·W (M, H) while each chunk is live and the backward only scales its
    rows: two GEMMs per chunk instead of three (no recompute), for M·H saved values.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels, ignore_index, temperature, chunk):
        M = h.shape[0]
        acc = _acc_dtype(h.dtype)
        ctx.frozen_head = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
        logp = _checks.new_output((M,), dtype=acc, device=h.device)
        lse = _checks.new_output((M,), dtype=acc, device=h.device)
        unit_grad_h = _checks.new_output(h.shape, dtype=h.dtype, device=h.device) if ctx.frozen_head else None
        for s in range(0, M, chunk):
            e = min(s + chunk, M)
            logits = _chunk_logits(h[s:e], weight, bias)
            lp, ls = _token_fwd(logits.unsqueeze(0), labels[s:e].unsqueeze(0), ignore_index, temperature)
            logp[s:e] = lp[0]
            lse[s:e] = ls[0]
            if ctx.frozen_head:  # U in place over the chunk (unit upstream gradient), then U·W
                unit = torch.ones((1, e - s), dtype=acc, device=h.device)
                _token_bwd_inplace(unit, logits.unsqueeze(0), labels[s:e].unsqueeze(0), ls, ignore_index,
                                   temperature)
                torch.mm(logits, weight, out=unit_grad_h[s:e])
            del logits  # free this chunk before the next one is allocated: one chunk live at a time
        if ctx.frozen_head:
            ctx.save_for_backward(unit_grad_h)
        elif any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(h, weight, bias, labels, lse)
        ctx.ignore_index, ctx.temperature, ctx.chunk = ignore_index, temperature, chunk
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        if ctx.frozen_head:
            (unit_grad_h,) = ctx.saved_tensors
            grad_h = (grad_logp.to(_acc_dtype(unit_grad_h.dtype))[:, None] * unit_grad_h).to(unit_grad_h.dtype)
            return grad_h, None, None, None, None, None, None
        h, weight, bias, labels, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _acc_dtype(h.dtype)
        grad_h = _checks.new_output(h.shape, dtype=h.dtype, device=h.device) if need_h else None
        # the first chunk writes grad_w / grad_b, later ones accumulate (no zero fill of a weight-sized buffer)
        grad_w = _checks.new_output(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = _checks.new_output(bias.shape, dtype=acc, device=bias.device) if need_b else None
        grad_logp = grad_logp.to(acc).contiguous()
        M, chunk = h.shape[0], ctx.chunk
        if M == 0:  # no labelled token: no chunk writes the weight/bias gradients
            for buffer in (grad_w, grad_b):
                if buffer is not None:
                    buffer.zero_()
        for s in range(0, M, chunk):
            e = min(s + chunk, M)
            g = _chunk_logits(h[s:e], weight, bias)  # recomputed logits, turned into the gradient in place
            _token_bwd_inplace(grad_logp[s:e].unsqueeze(0), g.unsqueeze(0), labels[s:e].unsqueeze(0),
                               lse[s:e].unsqueeze(0), ctx.ignore_index, ctx.temperature)
            if need_h:
                torch.mm(g, weight, out=grad_h[s:e])
            if need_w:  # fp16/bf16: this chunk's product in fp32 (bounded by the chunk), summed in fp32
                g_t, h_chunk = (g.t(), h[s:e]) if g.dtype == acc else (g.t().to(acc), h[s:e].to(acc))
                if s == 0:
                    torch.mm(g_t, h_chunk, out=grad_w)
                else:
                    grad_w.addmm_(g_t, h_chunk)
            if need_b:
                if s == 0:
                    torch.sum(g, 0, dtype=acc, out=grad_b)
                else:
                    grad_b += g.sum(0, dtype=acc)
            del g  # one chunk live at a time
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def default_chunk_size(V, dtype, device):
    """Tokens per lm-head chunk so one chunk of logits stays within CHUNK_BUDGET_BYTES for the device."""
    budget = CHUNK_BUDGET_BYTES.get(torch.device(device).type, CHUNK_BUDGET_BYTES["cpu"])
    return max(1, budget // (max(V, 1) * dtype.itemsize))


def linear_sequence_logprobs(hidden, weight, labels, *, bias=None, segment_ids=None, num_segments=None,
                             ignore_index=-100, temperature=1.0, reduction="sum", chunk_size=None):
    """``sequence_logprobs(hidden @ weight.T + bias, labels, ...)`` holding one chunk of logits at a time.

    Args:
        hidden: ``(..., T, H)`` float tensor (the final hidden states).
        weight: ``(V, H)`` lm-head weight, same dtype and device as ``hidden``.
        labels: ``(..., T)`` integer tensor aligned with ``hidden`` (``ignore_index`` = skip).
        bias: optional ``(V,)`` lm-head bias.
        segment_ids, num_segments, ignore_index, temperature, reduction: as in :func:`sequence_logprobs`.
        chunk_size: labelled tokens per lm-head chunk; default: one chunk of logits within a fixed budget
            (``CHUNK_BUDGET_BYTES``: 32 MiB on CPU, 256 MiB on CUDA).

    Only tokens with a label (and a segment) enter the matmul: prompt and image tokens cost nothing. The
    forward keeps one log-sum-exp per labelled token; the backward recomputes each chunk of logits.
    Gradients flow to hidden, weight and bias. Returns float32 (float64 for float64 inputs).
    """
    _checks.float_tensor("hidden", hidden)
    _checks.float_tensor("weight", weight)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (..., T, H) with at least 2 dims, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got "
                         f"{tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    _checks.same_device("hidden", hidden, weight=weight, bias=bias)
    V = weight.shape[0]
    if V == 0:
        raise ValueError("weight has no rows (V = 0)")
    if bias is not None:
        _checks.float_tensor("bias", bias)
        if bias.shape != (V,) or bias.dtype != hidden.dtype:
            raise ValueError(f"bias must be ({V},) with dtype {hidden.dtype}, got {tuple(bias.shape)} "
                             f"{bias.dtype}")
    _checks.positive_int_or_none("chunk_size", chunk_size)
    _check_common("hidden", hidden, labels, V, segment_ids, num_segments, ignore_index, temperature,
                  reduction)
    if backend.get_backend() == "reference":
        return reference.linear_sequence_logprobs(hidden, weight, labels, bias=bias, segment_ids=segment_ids,
                                                  num_segments=num_segments, ignore_index=ignore_index,
                                                  temperature=temperature, reduction=reduction)
    if not _use_triton(hidden.device):
        _extension.require()
    H = hidden.shape[-1]
    eff_labels, active = _effective_labels(labels, segment_ids, ignore_index)
    flat_active = active.reshape(-1)
    picked = flat_active.nonzero().squeeze(1)  # the labelled tokens: the only ones that meet the lm-head
    h = hidden.reshape(-1, H).index_select(0, picked)
    y = eff_labels.reshape(-1).index_select(0, picked).contiguous()
    chunk = chunk_size or default_chunk_size(V, hidden.dtype, hidden.device)
    picked_logp = _LinearTokenLogprobs.apply(h, weight, bias, y, ignore_index, float(temperature), chunk)
    token_logp = picked_logp.new_zeros(flat_active.shape[0]).index_copy(0, picked, picked_logp)
    return _reduce(token_logp, active, labels.shape, segment_ids, num_segments, reduction)


# ---------------------------------------------------------------------------------------------------------
# Registration: fake kernels, autograd, and the Triton kernels as the CUDA implementation
# ---------------------------------------------------------------------------------------------------------

def _register():
    @torch.library.register_fake("prefrank::sequence_logprobs_fwd")
    def _fwd_fake(logits, labels, ignore_index, temperature):
        acc = _acc_dtype(logits.dtype)
        return labels.new_empty(labels.shape, dtype=acc), labels.new_empty(labels.shape, dtype=acc)

    @torch.library.register_fake("prefrank::sequence_logprobs_bwd")
    def _bwd_fake(grad_logp, logits, labels, lse, ignore_index, temperature):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("prefrank::sequence_logprobs_bwd_")
    def _bwd_inplace_fake(grad_logp, logits, labels, lse, ignore_index, temperature):
        return None

    def setup_context(ctx, inputs, output):
        logits, labels, ignore_index, temperature = inputs
        _, lse = output
        ctx.save_for_backward(logits, labels, lse)
        ctx.mark_non_differentiable(lse)
        ctx.ignore_index, ctx.temperature = ignore_index, temperature

    def backward(ctx, grad_logp, _grad_lse):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.ops.prefrank.sequence_logprobs_bwd(grad_logp, logits, labels, lse, ctx.ignore_index,
                                                        ctx.temperature)
        return grad, None, None, None

    torch.library.register_autograd("prefrank::sequence_logprobs_fwd", backward, setup_context=setup_context)

    torch.library.register_kernel("prefrank::sequence_logprobs_fwd", "cuda", _fwd_triton)
    torch.library.register_kernel("prefrank::sequence_logprobs_bwd", "cuda", _bwd_triton)
    torch.library.register_kernel("prefrank::sequence_logprobs_bwd_", "cuda", _bwd_triton_inplace)


if _extension.available():
    _register()
