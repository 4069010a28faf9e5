"""Sequence log-probabilities (``sequence_logprobs``) and the fused lm-head (``linear_sequence_logprobs``).

Op layer (the team's one pattern, issue #11). Every kernel op is a ``torch.library.custom_op`` under
``torch.ops.prefrank`` with a cpu kernel, a cuda kernel, a fake kernel and ``register_autograd``; each
backward is itself such an op. The public functions below are thin validate-then-call wrappers.

===================================  ====================================================================
op                                   what it computes
===================================  ====================================================================
``sequence_logprobs_fwd``            per-token (logp, lse) of a ``(rows, T, V)`` logits view; its autograd
                                     calls ``sequence_logprobs_bwd`` (a new gradient buffer) or, with
                                     ``inplace_backward=True``, ``sequence_logprobs_bwd_``
``sequence_logprobs_bwd``            grad_logits in the logits' dtype from a per-token gradient
``sequence_logprobs_bwd_``           the same written over the logits (``mutates_args=("logits",)``): the
                                     in-place variant is a flag of the forward op that selects this
                                     mutating backward op, so it stays one pattern
``linear_sequence_logprobs_fwd``     per-token (logp, lse) of ``hidden @ weight.T + bias`` over the
                                     labelled tokens, chunked, plus what its backward needs
``linear_sequence_logprobs_bwd``     grad_hidden, grad_weight, grad_bias from the kept or recomputed logits
``linear_sequence_logprobs_bwd_``    the same turning the kept logits into the gradient in place
                                     (``mutates_args=("saved",)``); the eager backward picks it when the
                                     graph is not retained (torch.compile's "donated buffer" rule), so
                                     ``retain_graph=True`` and gradcheck still work
===================================  ====================================================================

Which kernel runs (``impl=`` per call, default from :mod:`prefrank.backend`):

- ``impl="reference"``: :mod:`prefrank.reference` (pure PyTorch, differentiable, no custom op);
- ``impl="auto"``, CPU tensors: the C++ kernels ``torch.ops.prefrank_C.sequence_logprobs_{fwd,bwd,bwd_}``
  (csrc/logprobs_cpu.cpp); the lm-head op runs its GEMMs with torch and these row kernels per chunk;
- ``impl="auto"``, CUDA tensors: the Triton kernels (triton_kernels/logprobs.py);
- ``impl="triton"``: the Triton kernels on CPU tensors too (only under ``TRITON_INTERPRET=1``: how CI tests
  them); the ops carry this as their trailing ``use_triton`` argument.

Data checks (label range, NaN/+inf logits at a labelled token) read values, so they run only where
:func:`prefrank._checks.data_checks_enabled` allows (CPU tensors eagerly, any device in ``prefrank.debug()``,
never while compiling) and raise ValueError naming the user's argument. Elsewhere (CUDA by default, or under
torch.compile) nothing is read back to the host: a label outside ``[0, V)`` gives a NaN log-prob (never an
out-of-bounds read) and NaN/+inf logits at a labelled token give NaN; a NaN on an ignored token is never
read. Per-token values are reduced per sequence/segment here with deterministic torch ops on the tiny
``(tokens,)`` vector, whose autograd maps the per-sequence gradient back to tokens.

Second-order gradients are not implemented: a double backward raises RuntimeError.
"""

import math
from typing import Literal

import torch
from torch import Tensor

from prefrank import _checks, _extension, backend, reference

# live logits of one linear_sequence_logprobs chunk, by device (the default chunk_size derives from it)
CHUNK_BUDGET_BYTES = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}
# chunk_size=None: when the labelled tokens' logits fit this budget they are one chunk, kept from forward to
# backward (three GEMMs instead of four) or, with a frozen head, turned into U·W at once (one GEMM of each
# kind instead of one per 32 MiB chunk: ~10% faster on CPU). On CUDA the recompute costs little next to the
# memory, so they never are.
KEEP_LOGITS_BUDGET_BYTES = {"cpu": 1 * 2**30, "cuda": 0}

Reduction = Literal["none", "mean", "sum"]


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton():
    from prefrank.triton_kernels import logprobs as kernels  # imports triton: only on the Triton path

    return kernels


def _double_backward_error(name):
    return RuntimeError(f"double backward of prefrank.{name} is not implemented (second-order gradients of "
                        f"log-probs are not supported); use impl='reference' for higher-order autograd")


# ---------------------------------------------------------------------------------------------------------
# Per-token kernels without autograd: the C++ ops (prefrank_C) or the Triton launchers
# ---------------------------------------------------------------------------------------------------------

def _token_fwd(logits, labels, ignore_index, temperature, use_triton):
    """(logp, lse) per token of a (rows, T, V) view; labels (rows, T) contiguous int64."""
    if not use_triton:
        _extension.require()
        return torch.ops.prefrank_C.sequence_logprobs_fwd(logits, labels, ignore_index, temperature)
    acc = _acc_dtype(logits.dtype)
    logp = _checks.new_output(labels.shape, dtype=acc, device=logits.device)
    lse = _checks.new_output(labels.shape, dtype=acc, device=logits.device)
    _triton().forward(logits, labels, ignore_index, temperature, logp, lse)
    return logp, lse


def _token_bwd_into(grad_logp, logits, labels, lse, ignore_index, temperature, out, use_triton):
    """out (rows, T, V) = d/dlogits; ``out=None``: written over ``logits`` (each row is read before it is
    written)."""
    acc = _acc_dtype(logits.dtype)
    grad_logp = grad_logp.to(acc).contiguous()
    if out is None:
        out = logits
    if not use_triton:
        _extension.require()
        if out is logits:
            torch.ops.prefrank_C.sequence_logprobs_bwd_(grad_logp, logits, labels, lse, ignore_index, temperature)
        else:
            out.copy_(torch.ops.prefrank_C.sequence_logprobs_bwd(grad_logp, logits, labels, lse, ignore_index,
                                                                  temperature))
        return
    _triton().backward(grad_logp, logits, labels, lse.to(acc).contiguous(), ignore_index, temperature, out)


def _token_bwd(grad_logp, logits, labels, lse, ignore_index, temperature, use_triton):
    if not use_triton:
        _extension.require()
        acc = _acc_dtype(logits.dtype)
        return torch.ops.prefrank_C.sequence_logprobs_bwd(grad_logp.to(acc).contiguous(), logits, labels, lse,
                                                          ignore_index, temperature)
    out = _checks.new_output(logits.shape, dtype=logits.dtype, device=logits.device)
    _token_bwd_into(grad_logp, logits, labels, lse, ignore_index, temperature, out, True)
    return out


# ---------------------------------------------------------------------------------------------------------
# Custom ops: sequence_logprobs
# ---------------------------------------------------------------------------------------------------------

@torch.library.custom_op("prefrank::sequence_logprobs_fwd", mutates_args=())
def _sequence_fwd(logits: Tensor, labels: Tensor, ignore_index: int, temperature: float, inplace_backward: bool,
                  use_triton: bool) -> tuple[Tensor, Tensor]:
    """(logp, lse) per token of logits (rows, T, V) (unit stride on V) and labels (rows, T) int64."""
    raise NotImplementedError(f"prefrank::sequence_logprobs_fwd has no kernel for device {logits.device.type}")


@_sequence_fwd.register_kernel("cpu")
def _(logits, labels, ignore_index, temperature, inplace_backward, use_triton):
    return _token_fwd(logits, labels, ignore_index, temperature, use_triton)


@_sequence_fwd.register_kernel("cuda")
def _(logits, labels, ignore_index, temperature, inplace_backward, use_triton):
    return _token_fwd(logits, labels, ignore_index, temperature, True)


@_sequence_fwd.register_fake
def _(logits, labels, ignore_index, temperature, inplace_backward, use_triton):
    acc = _acc_dtype(logits.dtype)
    return labels.new_empty(labels.shape, dtype=acc), labels.new_empty(labels.shape, dtype=acc)


@torch.library.custom_op("prefrank::sequence_logprobs_bwd", mutates_args=())
def _sequence_bwd(grad_logp: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, ignore_index: int,
                  temperature: float, use_triton: bool) -> Tensor:
    """d/dlogits (rows, T, V) in the logits' dtype from the per-token gradient grad_logp (rows, T)."""
    raise NotImplementedError(f"prefrank::sequence_logprobs_bwd has no kernel for device {logits.device.type}")


@_sequence_bwd.register_kernel("cpu")
def _(grad_logp, logits, labels, lse, ignore_index, temperature, use_triton):
    return _token_bwd(grad_logp, logits, labels, lse, ignore_index, temperature, use_triton)


@_sequence_bwd.register_kernel("cuda")
def _(grad_logp, logits, labels, lse, ignore_index, temperature, use_triton):
    return _token_bwd(grad_logp, logits, labels, lse, ignore_index, temperature, True)


@_sequence_bwd.register_fake
def _(grad_logp, logits, labels, lse, ignore_index, temperature, use_triton):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("prefrank::sequence_logprobs_bwd_", mutates_args=("logits",))
def _sequence_bwd_inplace(grad_logp: Tensor, logits: Tensor, labels: Tensor, lse: Tensor, ignore_index: int,
                          temperature: float, use_triton: bool) -> None:
    """The backward written over ``logits`` (which then hold d/dlogits)."""
    raise NotImplementedError(f"prefrank::sequence_logprobs_bwd_ has no kernel for device {logits.device.type}")


@_sequence_bwd_inplace.register_kernel("cpu")
def _(grad_logp, logits, labels, lse, ignore_index, temperature, use_triton):
    _token_bwd_into(grad_logp, logits, labels, lse, ignore_index, temperature, None, use_triton)


@_sequence_bwd_inplace.register_kernel("cuda")
def _(grad_logp, logits, labels, lse, ignore_index, temperature, use_triton):
    _token_bwd_into(grad_logp, logits, labels, lse, ignore_index, temperature, None, True)


@_sequence_bwd_inplace.register_fake
def _(grad_logp, logits, labels, lse, ignore_index, temperature, use_triton):
    return None


def _sequence_setup_context(ctx, inputs, output):
    logits, labels, ignore_index, temperature, inplace_backward, use_triton = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(logits, labels, lse)
    ctx.options = (ignore_index, temperature, use_triton)
    ctx.inplace_backward = inplace_backward


def _sequence_backward(ctx, grad_logp, _grad_lse):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None
    logits, labels, lse = ctx.saved_tensors
    if ctx.inplace_backward:
        if torch.is_grad_enabled():  # create_graph=True: the gradient would overwrite what it depends on
            raise _double_backward_error("sequence_logprobs")
        # writes over the saved logits and bumps their version: a second use of them raises in autograd
        torch.ops.prefrank.sequence_logprobs_bwd_(grad_logp, logits, labels, lse, *ctx.options)
        return logits, None, None, None, None, None
    grad = torch.ops.prefrank.sequence_logprobs_bwd(grad_logp, logits, labels, lse, *ctx.options)
    return grad, None, None, None, None, None


_sequence_fwd.register_autograd(_sequence_backward, setup_context=_sequence_setup_context)


def _no_double_backward_setup(ctx, inputs, output):
    pass


def _sequence_double_backward(ctx, *grads):
    raise _double_backward_error("sequence_logprobs")


_sequence_bwd.register_autograd(_sequence_double_backward, setup_context=_no_double_backward_setup)


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
        if _checks.data_checks_enabled(segment_ids) and segment_ids.numel() and bool(
                ((segment_ids < -1) | (segment_ids >= num_segments)).any()):
            raise ValueError(f"segment_ids must lie in [0, {num_segments}) or be -1 (skip)")
    if _checks.data_checks_enabled(labels) and labels.numel():
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if segment_ids is not None:
            bad &= segment_ids >= 0
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {V}) (the vocabulary) or equal ignore_index="
                             f"{ignore_index}; got {labels[bad].flatten()[0].item()}")


def _check_finite_lse(lse, active, what, tensors):
    """Data check after the kernel: a labelled token whose lse is not finite had NaN/+inf (or only -inf)."""
    if _checks.data_checks_enabled(*tensors) and lse.numel() and bool(
            (active.reshape(-1) & ~torch.isfinite(lse.reshape(-1))).any()):
        raise ValueError(f"{what} contain NaN or +inf (or only -inf) at a labelled token: its log-prob is "
                         f"undefined (NaN on an ignored token is never read)")


def _effective_labels(labels, segment_ids, ignore_index):
    """int64 labels where tokens outside every segment are ignored too, plus the mask of counted tokens."""
    labels = labels.to(torch.int64)
    if segment_ids is not None:
        labels = torch.where(segment_ids >= 0, labels, ignore_index)
    return labels, labels != ignore_index


def _segment_sum(values, segment_ids, num_segments):
    """Σ of values per segment id in [0, num_segments) (-1, and out-of-range ids, skipped), deterministic.

    Stable sort by segment, fp64 running sum of the finite values, difference at the segment ends: no float
    atomics (index_add on CUDA would make the result depend on the scheduling). A running sum cannot carry
    -inf or NaN (every later difference would be -inf − -inf = NaN), so those are added per segment apart:
    a sum of values from {0, -inf, NaN} is the same in any order. Differentiable in values (every value
    reaches its segment through exactly one of the two parts).
    """
    inside = (segment_ids >= 0) & (segment_ids < num_segments)  # never an out-of-bounds write on CUDA
    key = torch.where(inside, segment_ids, num_segments).to(torch.int64)
    wide = values.to(torch.float64)
    finite = torch.isfinite(wide)
    order = torch.argsort(key, stable=True)
    running = torch.cat([wide.new_zeros(1), torch.cumsum(torch.where(finite, wide, 0)[order], 0)])
    non_finite = wide.new_zeros(num_segments + 1).index_add(0, key, torch.where(finite, 0, wide))
    counts = torch.zeros(num_segments + 1, dtype=torch.int64, device=values.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    ends = torch.cumsum(counts, 0)[:num_segments]
    starts = ends - counts[:num_segments]
    sums = running[ends] - running[starts] + non_finite[:num_segments]
    return sums.to(values.dtype), counts[:num_segments]


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
    rows = math.prod(logits.shape[:-2])
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    try:
        return logits.view(rows, T, V)
    except RuntimeError:
        return logits.reshape(rows, T, V)


def _use_triton(impl, device):
    if impl == "triton":
        return True
    if device.type != "cuda":
        _extension.require()
    return False


# ---------------------------------------------------------------------------------------------------------
# sequence_logprobs
# ---------------------------------------------------------------------------------------------------------

def sequence_logprobs(logits: Tensor, labels: Tensor, *, segment_ids: Tensor | None = None,
                      num_segments: int | None = None, ignore_index: int = -100, temperature: float = 1.0,
                      reduction: Reduction = "sum", inplace_backward: bool = False,
                      impl: str = "auto") -> Tensor:
    """Σ_t log softmax(logits/temperature)[t, labels[t]] per sequence (or segment), never materialising it.

    Equivalent PyTorch (the oracle, :func:`prefrank.reference.sequence_logprobs`)::

        logp = torch.log_softmax(logits.float() / temperature, -1)
        keep = labels != ignore_index
        token = torch.where(keep, logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0], 0.0)
        out = token.sum(-1)

    Args:
        logits: ``(..., T, V)`` float tensor (fp32/fp16/bf16/fp64) with unit stride on V; other strides are
            free (``logits[:, :-1]`` is read in place, no copy). T = 0 or empty leading dims give zeros.
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
            copy get their gradient in that copy instead (same result, no saving). Ignored by
            ``impl="reference"``.
        impl: ``"auto"`` (C++ on CPU, Triton on CUDA, or the :mod:`prefrank.backend` default),
            ``"reference"`` or ``"triton"`` (see the module docstring).

    Returns:
        ``(...)`` (or ``(num_segments,)``, or labels' shape for "none"), float32 for fp32/fp16/bf16 logits
        and float64 for float64 logits. Backward gives d/dlogits in the logits' dtype without any fp32
        ``(…, T, V)`` temporary; nothing is saved when no input requires grad.

    Raises:
        ValueError: on CPU tensors (and in ``prefrank.debug()``): a label outside ``[0, V)`` other than
            ``ignore_index``, or NaN/+inf logits at a labelled token. On CUDA by default these give NaN.

    Example::

        >>> logits = torch.randn(2, 5, 11)
        >>> labels = torch.randint(0, 11, (2, 5))
        >>> sequence_logprobs(logits, labels).shape
        torch.Size([2])
    """
    _checks.float_tensor("logits", logits)
    if logits.dim() < 2:
        raise ValueError(f"logits must be (..., T, V) with at least 2 dims, got shape {tuple(logits.shape)}")
    V = logits.shape[-1]
    if V == 0:
        raise ValueError("logits has an empty vocabulary dim (V = 0)")
    if V > 1 and logits.stride(-1) != 1 and logits.numel():
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
    impl = backend.resolve(impl)
    if impl == "reference":
        return reference.sequence_logprobs(logits, labels, segment_ids=segment_ids, num_segments=num_segments,
                                           ignore_index=ignore_index, temperature=temperature,
                                           reduction=reduction)
    use_triton = _use_triton(impl, logits.device)
    rows = _as_rows(logits)
    eff_labels, active = _effective_labels(labels, segment_ids, ignore_index)
    eff_labels = eff_labels.reshape(rows.shape[:2]).contiguous()
    token_logp, lse = torch.ops.prefrank.sequence_logprobs_fwd(rows, eff_labels, ignore_index, float(temperature),
                                                               inplace_backward, use_triton)
    _check_finite_lse(lse, active, "logits (divided by temperature)", (logits,))
    return _reduce(token_logp.reshape(-1), active, labels.shape, segment_ids, num_segments, reduction)


# ---------------------------------------------------------------------------------------------------------
# Fused lm-head: custom ops
# ---------------------------------------------------------------------------------------------------------

def _chunk_logits(h, weight, bias, out=None):
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def _picked_tokens(labels, ignore_index, compact):
    """Indices of the tokens that meet the lm-head: the labelled ones (CPU), or all of them (``compact`` False:
    CUDA, where finding them would read a count back to the host; unlabelled rows cost a GEMM row there and
    the row kernels skip them)."""
    if compact:
        return (labels != ignore_index).nonzero().squeeze(1)
    return None


def _rows(t, picked, s, e):
    """Rows s:e of the token list: a view without compaction, else an index_select of one chunk only."""
    return t[s:e] if picked is None else t.index_select(0, picked[s:e])


def _one_chunk(M, V, dtype, device, chunk_size):
    """Whether every labelled token's logits form a single chunk (default chunk_size, within the budget)."""
    budget = KEEP_LOGITS_BUDGET_BYTES.get(device.type, 0)
    return chunk_size == 0 and M * V * dtype.itemsize <= budget


@torch.library.custom_op("prefrank::linear_sequence_logprobs_fwd", mutates_args=())
def _linear_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                temperature: float, chunk_size: int, frozen_head: bool,
                use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) int64 (ignored: ``ignore_index``).

    Returns logp (N,) and lse (N,) (0 at ignored tokens) and ``saved`` for the backward: the labelled tokens'
    logits (M, V) when kept (chunk_size 0 = default and they fit KEEP_LOGITS_BUDGET_BYTES), U·W (N, H) for a
    frozen head, else an empty (0, V) tensor.
    """
    raise NotImplementedError(f"prefrank::linear_sequence_logprobs_fwd has no kernel for {hidden.device.type}")


def _linear_fwd_impl(hidden, weight, bias, labels, ignore_index, temperature, chunk_size, frozen_head,
                     use_triton):
    N, V = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    picked = _picked_tokens(labels, ignore_index, compact=hidden.device.type != "cuda")
    M = N if picked is None else picked.shape[0]
    one_chunk = _one_chunk(M, V, hidden.dtype, hidden.device, chunk_size)
    keep = one_chunk and not frozen_head
    # one GEMM over every labelled token streams the weight once
    chunk = max(1, M if one_chunk else chunk_size or default_chunk_size(V, hidden.dtype, hidden.device))
    logp = _checks.new_output((N,), dtype=acc, device=hidden.device)
    lse = _checks.new_output((N,), dtype=acc, device=hidden.device)
    if picked is not None:  # unlabelled tokens: logp = lse = 0, never computed
        logp.zero_()
        lse.zero_()
    if keep:
        saved = torch.empty((M, V), dtype=hidden.dtype, device=hidden.device)
    elif frozen_head:
        saved = hidden.new_zeros(hidden.shape) if picked is not None else _checks.new_output(
            hidden.shape, dtype=hidden.dtype, device=hidden.device)
    else:
        saved = hidden.new_empty((0, V))
    y = labels if picked is None else labels.index_select(0, picked)
    for s in range(0, M, chunk):
        e = min(s + chunk, M)
        logits = _chunk_logits(_rows(hidden, picked, s, e), weight, bias, out=saved[s:e] if keep else None)
        y_chunk = y[s:e].unsqueeze(0)
        lp, ls = _token_fwd(logits.unsqueeze(0), y_chunk, ignore_index, temperature, use_triton)
        if picked is None:
            logp[s:e], lse[s:e] = lp[0], ls[0]
        else:
            logp.index_copy_(0, picked[s:e], lp[0])
            lse.index_copy_(0, picked[s:e], ls[0])
        if frozen_head:  # U = (onehot − softmax)/τ in place over the chunk (unit upstream gradient), then U·W
            unit = torch.ones((1, e - s), dtype=acc, device=hidden.device)
            _token_bwd_into(unit, logits.unsqueeze(0), y_chunk, ls, ignore_index, temperature, None, use_triton)
            if picked is None:
                torch.mm(logits, weight, out=saved[s:e])
            else:
                saved.index_copy_(0, picked[s:e], torch.mm(logits, weight))
        del logits  # free this chunk before the next one is allocated: one chunk live at a time
    return logp, lse, saved


@_linear_fwd.register_kernel("cpu")
def _(hidden, weight, bias, labels, ignore_index, temperature, chunk_size, frozen_head, use_triton):
    return _linear_fwd_impl(hidden, weight, bias, labels, ignore_index, temperature, chunk_size, frozen_head,
                            use_triton)


@_linear_fwd.register_kernel("cuda")
def _(hidden, weight, bias, labels, ignore_index, temperature, chunk_size, frozen_head, use_triton):
    return _linear_fwd_impl(hidden, weight, bias, labels, ignore_index, temperature, chunk_size, frozen_head,
                            True)


@_linear_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, chunk_size, frozen_head, use_triton):
    N, V = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    if frozen_head:
        saved = hidden.new_empty(hidden.shape)
    elif hidden.device.type == "cuda" or chunk_size != 0:  # never kept
        saved = hidden.new_empty((0, V))
    else:  # the labelled tokens' logits, or nothing: a data-dependent row count
        saved = hidden.new_empty((torch.library.get_ctx().new_dynamic_size(), V))
    return hidden.new_empty((N,), dtype=acc), hidden.new_empty((N,), dtype=acc), saved


@torch.library.custom_op("prefrank::linear_sequence_logprobs_bwd", mutates_args=())
def _linear_bwd(grad_logp: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                lse: Tensor, saved: Tensor, ignore_index: int, temperature: float, chunk_size: int,
                need_hidden: bool, need_weight: bool, need_bias: bool,
                use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_hidden (N, H), grad_weight (V, H), grad_bias (V,)); an empty tensor for a gradient not needed.

    Reads kept logits in ``saved`` (turning one chunk at a time into the gradient in a scratch buffer) or
    recomputes each chunk's logits."""
    raise NotImplementedError(f"prefrank::linear_sequence_logprobs_bwd has no kernel for {hidden.device.type}")


@torch.library.custom_op("prefrank::linear_sequence_logprobs_bwd_", mutates_args=("saved",))
def _linear_bwd_inplace(grad_logp: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                        lse: Tensor, saved: Tensor, ignore_index: int, temperature: float, chunk_size: int,
                        need_hidden: bool, need_weight: bool, need_bias: bool,
                        use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_linear_bwd` turning the kept logits in ``saved`` into the gradient in place (no scratch)."""
    raise NotImplementedError(f"prefrank::linear_sequence_logprobs_bwd_ has no kernel for {hidden.device.type}")


def _linear_bwd_impl(grad_logp, hidden, weight, bias, labels, lse, saved, ignore_index, temperature, chunk_size,
                     need_hidden, need_weight, need_bias, use_triton, inplace):
    acc = _acc_dtype(hidden.dtype)
    empty = hidden.new_empty((0,))
    grad_logp = grad_logp.to(acc)
    N, V = hidden.shape[0], weight.shape[0]
    picked = _picked_tokens(labels, ignore_index, compact=hidden.device.type != "cuda")
    M = N if picked is None else picked.shape[0]
    keep = saved.shape[0] == M and M > 0
    # kept logits in fp32/fp64: one chunk, so each of G·W and Gᵀ·h is one GEMM (grad_w written once); in
    # fp16/bf16 Gᵀ·h runs in fp32 per chunk (an fp32 copy of one chunk, not of all the kept logits)
    whole = keep and saved.dtype == acc
    chunk = max(1, M if whole else chunk_size or default_chunk_size(V, hidden.dtype, hidden.device))
    grad_h = empty
    if need_hidden:
        grad_h = _checks.new_output(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        if picked is not None:
            grad_h.zero_()
    # the first chunk writes grad_w / grad_b, later ones accumulate (no zero fill of a weight-sized buffer)
    grad_w = _checks.new_output(weight.shape, dtype=acc, device=hidden.device) if need_weight else empty
    grad_b = _checks.new_output((V,), dtype=acc, device=hidden.device) if need_bias else empty
    if M == 0:  # no labelled token: no chunk writes the weight/bias gradients
        grad_w.zero_()
        grad_b.zero_()
    y = labels if picked is None else labels.index_select(0, picked)
    g_tok = grad_logp if picked is None else grad_logp.index_select(0, picked)
    lse_tok = lse if picked is None else lse.index_select(0, picked)
    for s in range(0, M, chunk):
        e = min(s + chunk, M)
        h_chunk = _rows(hidden, picked, s, e)
        # G of this chunk: over its recomputed logits, over the kept ones (inplace), or from them into scratch
        logits = saved[s:e] if keep else _chunk_logits(h_chunk, weight, bias)
        scratch = keep and not inplace
        g = torch.empty_like(logits) if scratch else logits
        _token_bwd_into(g_tok[s:e].unsqueeze(0), logits.unsqueeze(0), y[s:e].unsqueeze(0),
                        lse_tok[s:e].unsqueeze(0), ignore_index, temperature, g.unsqueeze(0) if scratch else None,
                        use_triton)
        del logits
        if need_hidden:
            if picked is None:
                torch.mm(g, weight, out=grad_h[s:e])
            else:
                grad_h.index_copy_(0, picked[s:e], torch.mm(g, weight))
        if need_weight:  # fp16/bf16: this chunk's product in fp32 (bounded by the chunk), summed in fp32
            g_t, h_acc = (g.t(), h_chunk) if g.dtype == acc else (g.t().to(acc), h_chunk.to(acc))
            if s == 0:
                torch.mm(g_t, h_acc, out=grad_w)
            else:
                grad_w.addmm_(g_t, h_acc)
        if need_bias:
            if s == 0:
                torch.sum(g, 0, dtype=acc, out=grad_b)
            else:
                grad_b += g.sum(0, dtype=acc)
        del g  # one chunk live at a time
    return grad_h, grad_w.to(weight.dtype), grad_b.to(weight.dtype)


def _register_linear_bwd(op, inplace):
    @op.register_kernel("cpu")
    def _(grad_logp, hidden, weight, bias, labels, lse, saved, ignore_index, temperature, chunk_size, need_hidden,
          need_weight, need_bias, use_triton):
        return _linear_bwd_impl(grad_logp, hidden, weight, bias, labels, lse, saved, ignore_index, temperature,
                                chunk_size, need_hidden, need_weight, need_bias, use_triton, inplace)

    @op.register_kernel("cuda")
    def _(grad_logp, hidden, weight, bias, labels, lse, saved, ignore_index, temperature, chunk_size, need_hidden,
          need_weight, need_bias, use_triton):
        return _linear_bwd_impl(grad_logp, hidden, weight, bias, labels, lse, saved, ignore_index, temperature,
                                chunk_size, need_hidden, need_weight, need_bias, True, inplace)

    @op.register_fake
    def _(grad_logp, hidden, weight, bias, labels, lse, saved, ignore_index, temperature, chunk_size, need_hidden,
          need_weight, need_bias, use_triton):
        empty = hidden.new_empty((0,))
        return (hidden.new_empty(hidden.shape) if need_hidden else empty,
                weight.new_empty(weight.shape) if need_weight else empty,
                weight.new_empty((weight.shape[0],)) if need_bias else empty)


_register_linear_bwd(_linear_bwd, inplace=False)
_register_linear_bwd(_linear_bwd_inplace, inplace=True)


def _donates_saved_logits(saved):
    """Whether this backward may overwrite its saved logits: eager (a plain tensor, not one being traced), and
    the graph is not kept for another backward (``retain_graph``/``create_graph``), as torch.compile's
    donated buffers do."""
    if torch.compiler.is_compiling() or type(saved) is not torch.Tensor:
        return False
    try:
        return not torch._C._autograd._get_current_graph_task_keep_graph()
    except RuntimeError:  # not inside an autograd graph task
        return False


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, temperature, chunk_size, frozen_head, use_triton = inputs
    _, lse, saved = output
    ctx.mark_non_differentiable(lse, saved)
    ctx.set_materialize_grads(False)  # else autograd builds a zero "gradient" the size of the kept logits
    if frozen_head:
        ctx.save_for_backward(saved)
    elif any(ctx.needs_input_grad[:3]):
        ctx.save_for_backward(hidden, weight, labels, lse, saved, *(() if bias is None else (bias,)))
    ctx.options = (ignore_index, temperature, chunk_size, frozen_head)
    ctx.use_triton = use_triton


def _linear_backward(ctx, grad_logp, _grad_lse, _grad_saved):
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if not (need_hidden or need_weight or need_bias):
        return (None,) * 9
    if torch.is_grad_enabled():  # create_graph=True: no second-order kernels
        raise _double_backward_error("linear_sequence_logprobs")
    ignore_index, temperature, chunk_size, frozen_head = ctx.options
    if grad_logp is None:  # only lse/saved were used downstream: they carry no gradient
        return (None,) * 9
    if frozen_head:  # saved = U·W per token (formed in the forward): grad_h = g·(U·W), no GEMM
        (unit_grad_h,) = ctx.saved_tensors
        grad_h = (grad_logp.to(_acc_dtype(unit_grad_h.dtype))[:, None] * unit_grad_h).to(unit_grad_h.dtype)
        return (grad_h,) + (None,) * 8
    hidden, weight, labels, lse, saved, *bias = ctx.saved_tensors
    bias = bias[0] if bias else None
    op = torch.ops.prefrank.linear_sequence_logprobs_bwd_ if _donates_saved_logits(saved) else \
        torch.ops.prefrank.linear_sequence_logprobs_bwd
    grad_h, grad_w, grad_b = op(
        grad_logp, hidden, weight, bias, labels, lse, saved, ignore_index, temperature, chunk_size, need_hidden,
        need_weight, need_bias, ctx.use_triton)
    return (grad_h if need_hidden else None, grad_w if need_weight else None, grad_b if need_bias else None,
            None, None, None, None, None, None)


_linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def default_chunk_size(V: int, dtype: torch.dtype, device: torch.device | str) -> int:
    """Tokens per lm-head chunk so one chunk of logits stays within CHUNK_BUDGET_BYTES for the device."""
    budget = CHUNK_BUDGET_BYTES.get(torch.device(device).type, CHUNK_BUDGET_BYTES["cpu"])
    return max(1, budget // (max(V, 1) * dtype.itemsize))


def linear_sequence_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                             segment_ids: Tensor | None = None, num_segments: int | None = None,
                             ignore_index: int = -100, temperature: float = 1.0, reduction: Reduction = "sum",
                             chunk_size: int | None = None, impl: str = "auto") -> Tensor:
    """``sequence_logprobs(hidden @ weight.T + bias, labels, ...)`` without the full ``(…, T, V)`` logits.

    Equivalent PyTorch (the oracle, :func:`prefrank.reference.linear_sequence_logprobs`)::

        sequence_logprobs(hidden @ weight.T + bias, labels, ...)   # with the logits materialised

    Args:
        hidden: ``(..., T, H)`` float tensor (the final hidden states).
        weight: ``(V, H)`` lm-head weight, same dtype and device as ``hidden``.
        labels: ``(..., T)`` integer tensor aligned with ``hidden`` (``ignore_index`` = skip).
        bias: optional ``(V,)`` lm-head bias.
        segment_ids, num_segments, ignore_index, temperature, reduction: as in :func:`sequence_logprobs`.
        chunk_size: labelled tokens per lm-head chunk. ``None`` (default): chunks of at most
            ``CHUNK_BUDGET_BYTES`` of logits (32 MiB on CPU, 256 MiB on CUDA), and on CPU the labelled
            tokens' logits are kept from forward to backward when they fit ``KEEP_LOGITS_BUDGET_BYTES``
            (1 GiB): three GEMMs per fwd+bwd (logits, G·W, Gᵀ·h) instead of four, for M·V saved values;
            with a frozen head they are then one chunk, live during the forward only.
            An explicit ``chunk_size`` selects the lean path: only one chunk of logits is ever live (peak ≈
            grad_weight + one chunk) and the backward recomputes each chunk's logits (four GEMMs).
        impl: ``"auto"``, ``"reference"`` or ``"triton"`` (see the module docstring).

    On CPU only tokens with a label (and a segment) enter the matmul: prompt and image tokens cost nothing.
    On CUDA every token does (finding the labelled ones would read their count back to the host, a device
    synchronisation); the row kernels skip the unlabelled ones. With a frozen head (only ``hidden`` requires
    grad) the forward forms U·W (per chunk, or at once within ``KEEP_LOGITS_BUDGET_BYTES`` by default on
    CPU) and the backward only scales it (two GEMMs in all).

    The GEMMs are the FLOP ceiling: 2·M·V·H FLOPs each (M labelled tokens) against ~10·M·V for the row
    kernels, so at H = 1024 the GEMMs are > 99% of the arithmetic and fwd+bwd can at best be as fast as
    three GEMMs of that size.

    Returns float32 (float64 for float64 inputs). Gradients flow to hidden, weight and bias.

    Example::

        >>> hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8)
        >>> linear_sequence_logprobs(hidden, weight, torch.randint(0, 11, (2, 5))).shape
        torch.Size([2])
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
    impl = backend.resolve(impl)
    if impl == "reference":
        return reference.linear_sequence_logprobs(hidden, weight, labels, bias=bias, segment_ids=segment_ids,
                                                  num_segments=num_segments, ignore_index=ignore_index,
                                                  temperature=temperature, reduction=reduction)
    use_triton = _use_triton(impl, hidden.device)
    H = hidden.shape[-1]
    eff_labels, active = _effective_labels(labels, segment_ids, ignore_index)
    grad = torch.is_grad_enabled()
    frozen_head = grad and hidden.requires_grad and not weight.requires_grad and not (
        bias is not None and bias.requires_grad)
    token_logp, lse, _ = torch.ops.prefrank.linear_sequence_logprobs_fwd(
        hidden.reshape(-1, H), weight, bias, eff_labels.reshape(-1).contiguous(), ignore_index,
        float(temperature), chunk_size or 0, frozen_head, use_triton)
    _check_finite_lse(lse, active, "the logits hidden @ weight.T (+ bias)", (hidden, weight))
    return _reduce(token_logp, active, labels.shape, segment_ids, num_segments, reduction)
