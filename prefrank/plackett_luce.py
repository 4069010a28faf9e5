"""Plackett-Luce negative log-likelihood: argument checks, the ``prefrank::plackett_luce_nll`` custom ops, autograd.

Which kernel runs (``impl=`` per call, see :mod:`prefrank.backend`):

- ``"auto"`` on CPU tensors: the C++ CPU kernel (``torch.ops.prefrank_C.plackett_luce_nll_fwd/bwd``,
  csrc/plackett_luce_cpu.cpp); on CUDA tensors: the CUDA C++ kernel (csrc/plackett_luce_cuda.cu). Both run
  the per-list math of csrc/plackett_luce_math.h.
- ``"triton"``: Plackett-Luce has no Triton kernel; the same C++/CUDA kernels run (``use_triton`` is accepted
  by the custom ops for the team-wide signature and changes nothing here).
- ``"reference"``: :func:`prefrank.reference.plackett_luce_nll` (pure PyTorch, O(K²) per list).

The public custom ops, ``torch.ops.prefrank.plackett_luce_nll(scores, ranking, groups, mask, top_k, ties,
use_triton)`` and its backward ``plackett_luce_nll_backward(grad_nll, scores, ranking, groups, mask, top_k,
ties, use_triton)``, take ``(lists, items)`` tensors in the user's layout (any strides; ``ranking``/``groups``
int64, ``mask`` bool), ``top_k`` = -1 for "all" and ``ties`` a :class:`prefrank._options.Ties` code. The
kernels build each list's order themselves (no sort/scatter copies per call) and validate it on the way.
:func:`plackett_luce_nll` itself calls the same kernels through an autograd.Function (flash-attention's
pattern; the kernel ops have fake kernels, so it compiles): the custom-op layer's Python hops were half of
a forward+backward at training-step sizes.

Checks: shapes, dtypes, devices and options always (eager, also under torch.compile). Values (NaN/+inf in a
scored item, ranking entries out of range / repeated / -1 before the tail, groups below -1) are detected by
the kernels, which write NaN for such a list and never read out of bounds; when
``prefrank._checks.data_checks_enabled`` (CPU tensors, or ``prefrank.debug()``) a NaN result is explained
as the ValueError naming the argument. Values that are padding (``mask`` False, ``groups`` -1, items a
``ranking`` does not list) are never read: NaN there is ignored.
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake

from prefrank import _checks, _extension, _options, backend
from prefrank._options import Ties

TIES: tuple[str, ...] = _options.names(Ties)
"""The accepted ``ties`` strings ("breslow", "efron"), in code order."""


# ------------------------------------------------------------------------------------------------------------
# Argument checks (shared with prefrank.reference, so both implementations raise the same errors)
# ------------------------------------------------------------------------------------------------------------

def checked_arguments(scores, ranking, groups, mask, top_k, ties, dim, reduction):
    """Metadata checks of every argument; returns (scores, ranking, groups, mask) with the item axis last
    (views; ``ranking``/``groups`` as int64) and the ``ties`` code. Raises ValueError/TypeError naming the
    user's argument."""
    _checks.float_tensor("scores", scores)
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension (the items)")
    ties_code = _options.code(Ties, "ties", ties)
    _checks.choice("reduction", reduction, _checks.REDUCTIONS)
    _checks.positive_int_or_none("top_k", top_k)
    if ranking is not None and groups is not None:
        raise ValueError("pass either ranking or groups, not both")
    dim = _checks.normalized_dim("dim", dim, scores.dim())
    if ranking is not None:
        _checks.int_tensor("ranking", ranking)
        _checks.same_device("scores", scores, ranking=ranking)
        if ranking.shape != scores.shape:
            raise ValueError(
                f"ranking must have the shape of scores {tuple(scores.shape)} (one place per item), got "
                f"{tuple(ranking.shape)}: pad the places of absent items with -1; for a top-k observation list "
                f"the k observed items first, then the others in any order, and pass top_k=k")
    if groups is not None:
        _checks.int_tensor("groups", groups)
        _checks.same_device("scores", scores, groups=groups)
        _checks.same_shape("scores", scores, groups=groups)
    if mask is not None:
        _checks.bool_tensor("mask", mask)
        _checks.same_device("scores", scores, mask=mask)
        _checks.same_shape("scores", scores, mask=mask)
    if reduction == "mean" and math.prod(scores.shape[:dim] + scores.shape[dim + 1:]) == 0:
        raise ValueError(f"reduction='mean' over zero lists is undefined (scores has shape {tuple(scores.shape)})")

    def last(t):
        return None if t is None else (t if dim == t.dim() - 1 else t.movedim(dim, -1))

    def as_long(t):  # the kernels read int64 (no copy when it already is)
        return None if t is None else (t if t.dtype == torch.int64 else t.to(torch.int64))

    return last(scores), last(as_long(ranking)), last(as_long(groups)), last(mask), ties_code


def _listed(ranking, K):
    """(…, K) bool: the items a valid ranking lists (entries checked already)."""
    hit = torch.zeros(ranking.shape[:-1] + (K + 1,), dtype=torch.bool, device=ranking.device)
    return hit.scatter_(-1, torch.where(ranking >= 0, ranking, K), True)[..., :K]


def check_values(scores, ranking, groups, mask):
    """Value checks on item-last tensors (those the kernels detect by writing NaN): ValueError naming the
    argument. Padding (mask False, groups -1, items a ranking does not list) is not looked at."""
    K = scores.shape[-1]
    if ranking is not None:
        if ((ranking < -1) | (ranking >= K)).any():
            raise ValueError(f"ranking entries must be item indices in [0, {K}) or -1 (padding)")
        if ((ranking[..., :-1] < 0) & (ranking[..., 1:] >= 0)).any():
            raise ValueError("ranking may hold -1 only as padding at the tail of each list")
        counts = torch.zeros(ranking.shape[:-1] + (K + 1,), dtype=torch.int64, device=ranking.device)
        counts.scatter_add_(-1, torch.where(ranking >= 0, ranking, K), torch.ones_like(ranking))
        if (counts[..., :K] > 1).any():
            raise ValueError("ranking contains the same item twice in one list")
        valid = _listed(ranking, K)
    elif groups is not None:
        if (groups < -1).any():
            raise ValueError("groups must hold levels >= 0, or -1 for padding")
        valid = groups >= 0
    else:
        valid = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if mask is not None:
        valid = valid & mask
    if (valid & (torch.isnan(scores) | torch.isposinf(scores))).any():
        raise ValueError("scores contains NaN or +inf in an item that is scored (NaN is allowed only in padding: "
                         "mask False, groups -1, or items a ranking does not list)")


# ------------------------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------------------------

def _acc_dtype(scores):
    return torch.float64 if scores.dtype == torch.float64 else torch.float32


@torch.library.custom_op("prefrank::plackett_luce_nll", mutates_args=())
def _nll_op(scores: torch.Tensor, ranking: torch.Tensor | None, groups: torch.Tensor | None,
            mask: torch.Tensor | None, top_k: int, ties: int, use_triton: bool) -> torch.Tensor:
    """Per-list NLL (lists,) of (lists, items) inputs; NaN for a bad list (see the module docstring)."""
    raise NotImplementedError(f"prefrank::plackett_luce_nll has no kernel for {scores.device.type} tensors")


def _require_kernels(device):
    _extension.require()
    if device.type == "cuda" and not _extension.has_cuda_kernels():
        raise ImportError("prefrank._C was built without CUDA kernels; rebuild on a machine with nvcc and a "
                          "CUDA build of torch (PREFRANK_CUDA=1 make build)")


@_nll_op.register_kernel("cpu")
def _nll_cpu(scores, ranking, groups, mask, top_k, ties, use_triton):
    _require_kernels(scores.device)
    return torch.ops.prefrank_C.plackett_luce_nll_fwd(scores, ranking, groups, mask, top_k, ties)


@_nll_op.register_kernel("cuda")
def _nll_cuda(scores, ranking, groups, mask, top_k, ties, use_triton):
    _require_kernels(scores.device)
    return torch.ops.prefrank_C.plackett_luce_nll_fwd(scores, ranking, groups, mask, top_k, ties)


@_nll_op.register_fake
def _nll_fake(scores, ranking, groups, mask, top_k, ties, use_triton):
    return scores.new_empty(scores.shape[:1], dtype=_acc_dtype(scores))


@torch.library.custom_op("prefrank::plackett_luce_nll_backward", mutates_args=())
def _nll_backward_op(grad_nll: torch.Tensor, scores: torch.Tensor, ranking: torch.Tensor | None,
                     groups: torch.Tensor | None, mask: torch.Tensor | None, top_k: int, ties: int,
                     use_triton: bool) -> torch.Tensor:
    """grad_nll[b]·∂nll_b/∂scores (lists, items) in the scores' dtype; 0 for padding, NaN for a bad list."""
    raise NotImplementedError(f"prefrank::plackett_luce_nll_backward has no kernel for {scores.device.type} "
                              f"tensors")


@_nll_backward_op.register_kernel("cpu")
def _nll_backward_cpu(grad_nll, scores, ranking, groups, mask, top_k, ties, use_triton):
    return torch.ops.prefrank_C.plackett_luce_nll_bwd(grad_nll, scores, ranking, groups, mask, top_k, ties)


@_nll_backward_op.register_kernel("cuda")
def _nll_backward_cuda(grad_nll, scores, ranking, groups, mask, top_k, ties, use_triton):
    return torch.ops.prefrank_C.plackett_luce_nll_bwd(grad_nll, scores, ranking, groups, mask, top_k, ties)


@_nll_backward_op.register_fake
def _nll_backward_fake(grad_nll, scores, ranking, groups, mask, top_k, ties, use_triton):
    return torch.empty(scores.shape, dtype=scores.dtype, device=scores.device)


def _setup_nll(ctx, inputs, output):
    scores, ranking, groups, mask, top_k, ties, use_triton = inputs
    ctx.save_for_backward(scores, ranking, groups, mask)
    ctx.options = (top_k, ties, use_triton)


def _nll_grad(ctx, grad_nll):
    scores, ranking, groups, mask = ctx.saved_tensors
    grad = torch.ops.prefrank.plackett_luce_nll_backward.default(grad_nll, scores, ranking, groups, mask,
                                                                 *ctx.options)
    return grad, None, None, None, None, None, None


def _setup_backward(ctx, inputs, output):
    grad_nll, scores, ranking, groups, mask, top_k, ties, use_triton = inputs
    ctx.save_for_backward(grad_nll, scores, ranking, groups, mask)
    ctx.options = (top_k, ties)


def _nll_grad_grad(ctx, grad_grad):
    """Second order through the reference: the vector-Hessian product of the O(K²) oracle (correct, slower
    than the kernels; first-order training never runs it). torch.func.vjp, so it also runs under torch.func
    transforms and stays differentiable for a third order."""
    from prefrank import reference

    grad_nll, scores, ranking, groups, mask = ctx.saved_tensors
    top_k, ties = ctx.options

    def first_order(g, s):  # g · ∂nll/∂s, what the backward kernel computes
        nll = lambda t: reference.plackett_luce_nll_unchecked(  # noqa: E731
            t, ranking=ranking, groups=groups, mask=mask, top_k=None if top_k < 0 else top_k, ties=Ties(ties).name)
        return torch.func.vjp(nll, s)[1](g.to(_acc_dtype(s)))[0]

    d_grad_nll, d_scores = torch.func.vjp(first_order, grad_nll, scores)[1](grad_grad)
    return d_grad_nll, d_scores, None, None, None, None, None, None


_nll_op.register_autograd(_nll_grad, setup_context=_setup_nll)
_nll_backward_op.register_autograd(_nll_grad_grad, setup_context=_setup_backward)


# ------------------------------------------------------------------------------------------------------------
# The public function's autograd: the flash-attention pattern (an autograd.Function over the kernel ops)
# ------------------------------------------------------------------------------------------------------------

if _extension.available():  # the kernel ops exist only when the extension loaded
    @torch.library.register_fake("prefrank_C::plackett_luce_nll_fwd")
    def _kernel_fwd_fake(scores, ranking, groups, mask, top_k, ties):
        return _nll_fake(scores, ranking, groups, mask, top_k, ties, False)

    @torch.library.register_fake("prefrank_C::plackett_luce_nll_bwd")
    def _kernel_bwd_fake(grad_nll, scores, ranking, groups, mask, top_k, ties):
        return _nll_backward_fake(grad_nll, scores, ranking, groups, mask, top_k, ties, False)


def _fold_mapped(info, in_dims, tensors):
    """torch.func.vmap rules: each tensor's mapped dimension moved in front and merged into its lists (dim 0),
    so one kernel call scores the lists of every mapped slice; an unmapped tensor is expanded to match."""
    folded = []
    for t, d in zip(tensors, in_dims):
        if t is not None:
            t = t.expand(info.batch_size, *t.shape) if d is None else t.movedim(d, 0)
            t = t.reshape(-1, *t.shape[2:])
        folded.append(t)
    return folded


def _nll_forward(scores, ranking, groups, mask, top_k, ties):
    nll = torch.ops.prefrank_C.plackett_luce_nll_fwd(scores, ranking, groups, mask, top_k, ties)
    if _checks.data_checks_enabled(scores) and nll.isnan().any():
        check_values(scores, ranking, groups, mask)
        raise RuntimeError("prefrank.plackett_luce_nll returned NaN for inputs that pass its checks: please "
                           "report this as a bug")
    return nll


def _save_nll_context(ctx, scores, ranking, groups, mask, top_k, ties):
    ctx.save_for_backward(scores, ranking, groups, mask)
    ctx.options = (top_k, ties)


def _nll_backward(ctx, grad_nll):
    scores, ranking, groups, mask = ctx.saved_tensors
    top_k, ties = ctx.options
    if torch.is_grad_enabled():  # create_graph=True (and torch.func): a graph of the gradient itself
        grad = _PlackettLuceNllBackward.apply(grad_nll, scores, ranking, groups, mask, top_k, ties)
    else:
        grad = torch.ops.prefrank_C.plackett_luce_nll_bwd(grad_nll, scores, ranking, groups, mask, top_k, ties)
    return grad, None, None, None, None, None


def _apply_nll(scores, ranking, groups, mask, top_k, ties):
    """The forward kernel, through the autograd.Function behind :func:`plackett_luce_nll` when a gradient is
    needed: the plain one (~10 µs per call), or under torch.func transforms the one they need
    (``setup_context`` and a ``vmap`` rule cost ~80 µs per forward+backward in torch's Function.apply, a
    third of a whole call at B=256, K=16 on CPU). No gradient (evaluation, no_grad): the kernel alone, as a
    Function's apply is 1/6 of a forward at B=8, K=2."""
    if torch._C._are_functorch_transforms_active():
        return _PlackettLuceNllTransformable.apply(scores, ranking, groups, mask, top_k, ties)
    if torch.is_grad_enabled() and scores.requires_grad:
        return _PlackettLuceNll.apply(scores, ranking, groups, mask, top_k, ties)
    return _nll_forward(scores, ranking, groups, mask, top_k, ties)


class _PlackettLuceNll(torch.autograd.Function):
    """What :func:`plackett_luce_nll` runs, eager and compiled: the same kernels as the custom ops above,
    called without the custom-op layer. Its per-call Python hops (``register_autograd``'s Function, a Python
    kernel per op, forward and backward) cost ~150 µs, half of a whole forward+backward at B=256, K=16 on
    CPU; an autograd.Function over the C++ ops (fake kernels above, so dynamo traces it) costs ~10 µs.
    Gradient: the backward kernel; with ``create_graph`` :class:`_PlackettLuceNllBackward` (second order
    through the reference, as the custom op's)."""

    @staticmethod
    def forward(ctx, scores, ranking, groups, mask, top_k, ties):
        _save_nll_context(ctx, scores, ranking, groups, mask, top_k, ties)
        return _nll_forward(scores, ranking, groups, mask, top_k, ties)

    backward = staticmethod(_nll_backward)


class _PlackettLuceNllTransformable(torch.autograd.Function):
    """:class:`_PlackettLuceNll` for torch.func (grad, vmap, per-sample gradients, jacrev): the forward
    receives plain tensors, so the value check of a NaN result lives there; vmap folds the mapped slices into
    the lists (one kernel call)."""

    forward = staticmethod(_nll_forward)
    backward = staticmethod(_nll_backward)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_nll_context(ctx, *inputs)

    @staticmethod
    def vmap(info, in_dims, scores, ranking, groups, mask, top_k, ties):
        nll = _apply_nll(*_fold_mapped(info, in_dims[:4], (scores, ranking, groups, mask)), top_k, ties)
        return nll.reshape(info.batch_size, -1), 0


class _PlackettLuceNllBackward(torch.autograd.Function):
    """The backward kernel as a differentiable function (double backward, torch.func): the custom op
    ``prefrank::plackett_luce_nll_backward``'s kernel and autograd (:func:`_nll_grad_grad`), usable under
    torch.func."""

    @staticmethod
    def forward(grad_nll, scores, ranking, groups, mask, top_k, ties):
        return torch.ops.prefrank_C.plackett_luce_nll_bwd(grad_nll, scores, ranking, groups, mask, top_k, ties)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_backward(ctx, inputs + (False,), output)

    @staticmethod
    def backward(ctx, grad_grad):
        return _nll_grad_grad(ctx, grad_grad)[:7]

    @staticmethod
    def vmap(info, in_dims, grad_nll, scores, ranking, groups, mask, top_k, ties):
        grad = _PlackettLuceNllBackward.apply(
            *_fold_mapped(info, in_dims[:5], (grad_nll, scores, ranking, groups, mask)), top_k, ties)
        return grad.reshape(info.batch_size, -1, grad.shape[-1]), 0


# ------------------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------------------

def plackett_luce_nll(scores: torch.Tensor, *, ranking: torch.Tensor | None = None,
                      groups: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                      top_k: int | None = None, ties: str = "breslow", dim: int = -1, reduction: str = "none",
                      impl: backend.Impl = "auto") -> torch.Tensor:
    """Negative log-likelihood of an observed order under Plackett-Luce with log-strengths ``scores``.

    Args:
        scores: ``(..., K, ...)`` float tensor (fp32/fp16/bf16/fp64), items along ``dim``.
        ranking: int tensor shaped like ``scores``: ``ranking[..., j]`` = index of the item at place ``j``
            (best first); -1 pads the tail (absent items). A top-k observation lists the k observed items
            first, then the others in any order, with ``top_k=k``.
        groups: int tensor shaped like ``scores`` (int64, or any integer dtype incl. uint8): preference level
            of every item, 0 = most preferred, equal levels are ties, -1 = padding.
        mask: bool tensor shaped like ``scores``; False removes the item from every term.
        top_k: score only the first ``k`` places (with ``groups``: the first ``k`` groups); the rest stay in
            the denominators (the exact partial-ranking marginal).
        ties: ``"breslow"`` or ``"efron"``: the Cox partial-likelihood tie rule for ``groups``.
        dim: the item axis.
        reduction: ``"none"`` (per list, shape ``scores.shape`` without ``dim``), ``"mean"`` or ``"sum"``.
        impl: ``"auto"`` | ``"reference"`` | ``"triton"`` (see the module docstring).

    Without ``ranking`` and ``groups`` the items are already best-first along ``dim``. With ``groups`` the
    result is exactly the negative Cox partial log-likelihood with linear predictor ``scores`` and event time
    = level (every group scored, the last included). Equivalent PyTorch for a full ranking::

        u = scores.gather(-1, ranking)
        nll = (torch.logcumsumexp(u.flip(-1), -1).flip(-1) - u).sum(-1)

    Stable for scores of ±1e4. A valid item with score -inf has strength 0: scoring it while a finite item
    competes gives +inf; a group whose whole risk set has strength 0 is scored as the limit of equal scores
    (a constant). A list with no valid items (all padding, or K = 0) scores 0; zero lists give an empty
    result (``"sum"``: 0; ``"mean"``: ValueError). NaN/+inf in a scored item: ValueError on CPU tensors (and
    in ``prefrank.debug()``), NaN for that list on CUDA. Returns float32 (float64 for float64 scores).

    Example::

        >>> scores = torch.tensor([[2.0, 1.0, 0.0]])
        >>> plackett_luce_nll(scores, groups=torch.tensor([[0, 1, 1]]), ties="efron")
        tensor([1.3410])
    """
    scores_l, ranking_l, groups_l, mask_l, ties_code = checked_arguments(
        scores, ranking, groups, mask, top_k, ties, dim, reduction)
    impl = backend.resolve(impl)
    if impl == "reference":
        from prefrank import reference

        if _checks.data_checks_enabled(scores_l, ranking_l, groups_l, mask_l):
            check_values(scores_l, ranking_l, groups_l, mask_l)
        nll = reference.plackett_luce_nll_unchecked(scores_l, ranking=ranking_l, groups=groups_l, mask=mask_l,
                                                    top_k=top_k, ties=ties)
        return _checks.reduce(nll, reduction)

    batch_shape = scores_l.shape[:-1]
    K = scores_l.shape[-1]
    if scores_l.dim() != 2:  # (lists, items): a view when the batch dimensions allow it
        lists = math.prod(batch_shape)
        scores_l, ranking_l, groups_l, mask_l = (
            None if t is None else t.reshape(lists, K) for t in (scores_l, ranking_l, groups_l, mask_l))
    # fake tensors outside torch.compile (FakeTensorMode) need no kernels; under torch.compile the check runs
    # at trace time, so a CUDA call on a CPU-only build raises our ImportError, not a dispatcher error
    # (is_fake itself cannot be traced; a plain torch.Tensor is never fake and skips its 2 µs)
    if _checks.compiling() or type(scores_l) is torch.Tensor or not is_fake(scores_l):
        _require_kernels(scores_l.device)
    nll = _apply_nll(scores_l, ranking_l, groups_l, mask_l, -1 if top_k is None else top_k, ties_code)
    if len(batch_shape) != 1:
        nll = nll.reshape(batch_shape)
    return _checks.reduce(nll, reduction)
