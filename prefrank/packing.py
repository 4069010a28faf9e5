"""Shared-prompt packing: one forward of each prompt (and its image) serves all of its K responses.

Every listwise / group preference loss scores K responses of the same prompt. The usual batch holds K rows
``[prompt, response_k]``, so the prompt (hundreds of image tokens for a VLM) runs K times forward, backward
and through the reference model. :func:`pack_shared_prompt` lays out one row per prompt instead::

    row b:  prompt[:-1] | prompt[-1] response_0 | prompt[-1] response_1 | … | padding

- Each response segment starts with a copy of the prompt's last token: the hidden state that scores a
  response's first token is the last prompt token's, and every response needs its own (one row position
  carries one label). That costs one extra token per response.
- Position ids: ``0 … P-2`` for the shared prompt, then ``P-1, P, …`` again in every segment, exactly the
  positions the token has in the unpacked row ``[prompt, response_k]``.
- A 4-D additive attention mask ``(B, 1, L, L)`` (0 = visible, the most negative float32 = hidden): a
  token sees the shared prompt and the earlier tokens of its own segment, nothing of the other responses
  (causal within the segment). Padding tokens see only themselves, so no softmax row is empty (no NaN).
- labels / segment ids: the logits at a segment position score the next token of that segment, summed
  into slot ``b·K + k`` by one :func:`prefrank.ops.sequence_logprobs` (or
  :func:`prefrank.ops.linear_sequence_logprobs`) call.

So each response's log-probs equal those of the unpacked row scored alone: the same tokens, positions and
visible context (up to float summation order in the attention).

Which models honour the mask: HF transformers decoders that take a 4-D ``attention_mask`` as-is and
honour ``position_ids`` with rotary/learned 1-D positions: Llama, Qwen2 (and LLaVA built on them) under
``attn_implementation`` "eager", "sdpa" or "flex_attention" (the float mask becomes flex's score mask).
flash_attention_2/3 cannot take an arbitrary mask (they read a 4-D mask as 2-D padding) and multimodal
RoPE models (Qwen2-VL's 3-D position ids) compute their own positions: :func:`check_model` rejects them
with the setting to use, and probes any other model once: packed must equal unpacked and changing one
response must leave the others unchanged. Call it once per model before trusting packed log-probs (the
trainer does).

Extra model inputs (``pixel_values``, …) pass through :meth:`PackedPrompts.model_inputs` unchanged: one
image per prompt (row), encoded once. For LLaVA the prompt's token ids already hold the expanded image
tokens (the processor's output), so positions count them like any token; a prompt must not end with an
image token (its copy would start every segment).

Example::

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from prefrank.packing import check_model, pack_shared_prompt
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa"))
    >>> check_model(model)
    >>> packed = pack_shared_prompt([[1, 5, 7], [2, 9]], [[[3, 4], [8], [6, 6, 2]], [[11, 12, 13]]],
    ...                             pad_token_id=0)
    >>> logps = packed.sequence_logprobs(model(**packed.model_inputs(use_cache=False)).logits)
    >>> logps.shape, packed.mask.tolist()
    (torch.Size([2, 3]), [[True, True, True], [True, False, False]])
    >>> one = model(torch.tensor([[1, 5, 7, 8]])).logits.log_softmax(-1)[0, 2, 8]   # [prompt, response]
    >>> torch.allclose(logps[0, 1], one, atol=1e-5)
    True
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from prefrank import ops

#: attn_implementation values that honour an arbitrary 4-D attention mask in transformers
MASK_HONOURING_ATTENTION = ("eager", "sdpa", "flex_attention")
PROMPT = 0  # owner id of the shared prompt tokens; response k owns k + 1; padding owns -1
PAD = -1


def _token_ids(name: str, value: Any) -> list[int]:
    """A 1-D sequence of token ids as a list of ints (a list/tuple of ints or a 1-D integer tensor)."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got a {value.dtype} tensor")
        if value.dim() != 1:
            raise ValueError(f"{name} must be 1-D token ids, got a tensor of shape {tuple(value.shape)}")
        return [int(v) for v in value.tolist()]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of token ids, got {type(value).__name__}")
    ids = []
    for i, v in enumerate(value):
        if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.dtype.is_floating_point:
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}[{i}] must be an int token id, got {type(v).__name__}")
        ids.append(v)
    return ids


@dataclass(frozen=True)
class PackedPrompts:
    """B packed rows (see the module docstring). Build it with :func:`pack_shared_prompt`.

    Attributes:
        input_ids: ``(B, L)`` int64 token ids (``pad_token_id`` at padding).
        position_ids: ``(B, L)`` int64, each token's position in its unpacked row (0 at padding).
        owner: ``(B, L)`` int64: 0 = shared prompt, k + 1 = response k's segment, -1 = padding.
        labels: ``(B, L)`` int64: the token the logits at t score (``ignore_index`` where none).
        segment_ids: ``(B, L)`` int64: output slot ``b·K + k`` of a labelled token, else -1.
        mask: ``(B, K)`` bool, True for real response slots (ragged K).
        response_lengths: ``(B, K)`` int64 token counts (0 at padded slots).
        max_token_id: the largest token id of any prompt, response or the pad token (vocabulary check).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    owner: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor
    mask: torch.Tensor
    response_lengths: torch.Tensor
    ignore_index: int
    max_token_id: int
    _given: dict = field(default_factory=dict, repr=False, compare=False)  # what model_inputs handed out

    @property
    def num_segments(self) -> int:
        return self.mask.numel()

    def to(self, device: torch.device | str) -> PackedPrompts:
        """The same packing with every tensor on ``device``."""
        tensors = ("input_ids", "position_ids", "owner", "labels", "segment_ids", "mask", "response_lengths")
        return replace(self, **{name: getattr(self, name).to(device) for name in tensors}, _given={})

    def attention_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(B, 1, L, L)`` additive mask in ``dtype``: 0 where query t may attend to key s, else finfo.min.

        Visible: s ≤ t and (s is a shared-prompt token or s is in t's own segment); a padding query sees only
        itself. The float form is what eager attention adds to the scores and what sdpa / flex take as-is.
        """
        owner = self.owner
        L = owner.shape[1]
        position = torch.arange(L, device=owner.device)
        causal = position[None, :] <= position[:, None]  # (q, kv)
        owner_q, owner_kv = owner[:, :, None], owner[:, None, :]
        visible = causal & (owner_kv != PAD) & (owner_q != PAD) & ((owner_kv == PROMPT) | (owner_kv == owner_q))
        visible |= torch.eye(L, dtype=torch.bool, device=owner.device) & (owner_q == PAD)
        hidden_value = torch.finfo(dtype).min
        return torch.zeros((), dtype=dtype, device=owner.device).masked_fill(~visible, hidden_value)[:, None]

    def block_mask(self) -> Any:
        """The same visibility as a FlexAttention ``BlockMask`` (for ``attn_implementation="flex_attention"``
        models, through ``model_inputs(block_mask=True)``): fully hidden blocks are skipped instead of
        computed and masked, which matters on CUDA for long prompts and many responses."""
        from torch.nn.attention.flex_attention import create_block_mask

        owner = self.owner

        def visible(b, h, q, kv):
            owner_q, owner_kv = owner[b, q], owner[b, kv]
            shared_or_own = (owner_kv == PROMPT) | (owner_kv == owner_q)
            return ((kv <= q) & (owner_kv != PAD) & (owner_q != PAD) & shared_or_own) | ((q == kv) & (owner_q == PAD))

        B, L = owner.shape
        return create_block_mask(visible, B, None, L, L, device=owner.device)

    def model_inputs(self, *, mask_dtype: torch.dtype = torch.float32, block_mask: bool = False,
                     **extra: Any) -> dict[str, Any]:
        """``input_ids``, the 4-D additive ``attention_mask`` and ``position_ids``, plus ``extra`` unchanged
        (``pixel_values``, ``image_grid_thw``, ``use_cache=False`` …). An extra named like one of the three
        raises (it would silently replace the packing's own).

        ``block_mask=True`` gives :meth:`block_mask` instead of the dense mask (flex_attention models only).
        ``mask_dtype``: float32 serves fp32/bf16/fp16 models. A float64 model needs
        ``mask_dtype=torch.float64``: torch's CPU sdpa misreads a float32 mask under float64 queries
        (wrong attention for L > 16), so :meth:`sequence_logprobs` refuses float64 logits after a float32
        mask was handed out.
        """
        clash = sorted({"input_ids", "attention_mask", "position_ids"} & set(extra))
        if clash:
            raise ValueError(f"model_inputs(): {clash} are built by the packing; pass other inputs only")
        if not isinstance(mask_dtype, torch.dtype) or not mask_dtype.is_floating_point:
            raise TypeError(f"mask_dtype must be a floating torch.dtype, got {mask_dtype!r}")
        self._given["mask_dtype"] = None if block_mask else mask_dtype
        attention_mask = self.block_mask() if block_mask else self.attention_mask(mask_dtype)
        return {"input_ids": self.input_ids, "attention_mask": attention_mask, "position_ids": self.position_ids,
                **extra}

    def _check_vocabulary(self, name: str, V: int) -> None:
        if self.max_token_id >= V:
            raise ValueError(f"prompts/responses/pad_token_id hold token id {self.max_token_id}, outside the "
                             f"vocabulary of {name} (V = {V})")

    def _check_mask_dtype(self, name: str, dtype: torch.dtype) -> None:
        if dtype == torch.float64 and self._given.get("mask_dtype") == torch.float32:
            raise ValueError(f"{name} are float64 but model_inputs() gave a float32 attention mask, which "
                             f"torch's sdpa misreads under float64 queries; call "
                             f"model_inputs(mask_dtype=torch.float64) for a float64 model")

    def _check_rows(self, name: str, tensor: torch.Tensor) -> None:
        if tensor.dim() != 3 or tuple(tensor.shape[:2]) != tuple(self.input_ids.shape):
            raise ValueError(f"{name} must be (B, L, ·) = ({self.input_ids.shape[0]}, {self.input_ids.shape[1]}, "
                             f"·) like the packed input_ids, got {tuple(tensor.shape)}")

    def sequence_logprobs(self, logits: torch.Tensor, *, temperature: float = 1.0,
                          reduction: str = "sum") -> torch.Tensor:
        """``(B, K)`` log-probs of every response from the model's ``(B, L, V)`` logits (one
        :func:`prefrank.ops.sequence_logprobs` call); 0 where ``mask`` is False. ``reduction="mean"``
        divides by the response length."""
        self._check_rows("logits", logits)
        self._check_vocabulary("logits", logits.shape[-1])
        self._check_mask_dtype("logits", logits.dtype)
        device = logits.device
        flat = ops.sequence_logprobs(logits, self.labels.to(device), segment_ids=self.segment_ids.to(device),
                                     num_segments=self.num_segments, ignore_index=self.ignore_index,
                                     temperature=temperature, reduction=reduction)
        return flat.view(self.mask.shape)

    def linear_sequence_logprobs(self, hidden: torch.Tensor, weight: torch.Tensor, *,
                                 bias: torch.Tensor | None = None, temperature: float = 1.0,
                                 reduction: str = "sum", chunk_size: int | None = None) -> torch.Tensor:
        """Same as :meth:`sequence_logprobs` from the final hidden states ``(B, L, H)`` and the lm-head
        ``weight`` ``(V, H)`` / ``bias``, through the fused :func:`prefrank.ops.linear_sequence_logprobs`
        (only response tokens meet the lm-head; prompt and image tokens cost nothing)."""
        self._check_rows("hidden", hidden)
        self._check_mask_dtype("hidden", hidden.dtype)
        if weight.dim() == 2:
            self._check_vocabulary("weight", weight.shape[0])
        device = hidden.device
        flat = ops.linear_sequence_logprobs(hidden, weight, self.labels.to(device), bias=bias,
                                            segment_ids=self.segment_ids.to(device),
                                            num_segments=self.num_segments, ignore_index=self.ignore_index,
                                            temperature=temperature, reduction=reduction, chunk_size=chunk_size)
        return flat.view(self.mask.shape)


def pack_shared_prompt(prompts: Sequence[Sequence[int] | torch.Tensor],
                       responses: Sequence[Sequence[Sequence[int] | torch.Tensor]], *, pad_token_id: int,
                       ignore_index: int = -100, padding_side: str = "right",
                       vocab_size: int | None = None) -> PackedPrompts:
    """Pack each prompt once followed by all of its responses (see the module docstring for the layout).

    Args:
        prompts: B prompts, each a non-empty list (or 1-D integer tensor) of token ids (for a VLM: the
            processor's ids, image tokens expanded).
        responses: B lists of K_b ≥ 1 non-empty responses (token id lists); K may differ per prompt.
        pad_token_id: token id written at padding positions (never attended to, never scored).
        ignore_index: label value of unscored positions; must not be a response token.
        padding_side: "right" (default) or "left": where each row's padding goes.
        vocab_size: optional; token ids must then lie in ``[0, vocab_size)`` (checked here, before the
            model's embedding sees them). The logits' / weight's vocabulary is checked in any case.

    Returns:
        :class:`PackedPrompts`: ``model_inputs(**extra)`` for the model, ``sequence_logprobs(logits)`` /
        ``linear_sequence_logprobs(hidden, weight)`` → ``(B, K)`` summed response log-probs, 0 where
        ``mask`` (B, K) is False.

    Raises:
        ValueError: no prompts, a prompt/response list count mismatch, an empty prompt or response, a prompt
            without responses (K = 0), negative or out-of-vocabulary token ids, a bad option.
        TypeError: token ids that are not ints.
    """
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
        raise TypeError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 1):
        raise ValueError(f"vocab_size must be a positive int or None, got {vocab_size!r}")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if isinstance(responses, (str, bytes)) or not isinstance(responses, Sequence):
        raise TypeError(f"responses must be a list (one per prompt) of lists of token-id lists, got "
                        f"{type(responses).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: nothing to pack")
    if len(responses) != len(prompts):
        raise ValueError(f"responses must hold one list per prompt: got {len(responses)} lists for "
                         f"{len(prompts)} prompts")
    prompt_ids = [_token_ids(f"prompts[{b}]", p) for b, p in enumerate(prompts)]
    response_ids = []
    for b, row in enumerate(responses):
        if isinstance(row, (str, bytes, torch.Tensor)) or not isinstance(row, Sequence):
            raise TypeError(f"responses[{b}] must be a list of token-id lists, got {type(row).__name__}")
        if len(row) == 0:
            raise ValueError(f"responses[{b}] is empty: prompt {b} has no response (K = 0)")
        response_ids.append([_token_ids(f"responses[{b}][{k}]", r) for k, r in enumerate(row)])
    for b, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompts[{b}] is empty: a response's first token is scored from the prompt's "
                             f"last token")
    for b, row in enumerate(response_ids):
        for k, ids in enumerate(row):
            if not ids:
                raise ValueError(f"responses[{b}][{k}] is empty")
            if ignore_index in ids:
                raise ValueError(f"responses[{b}][{k}] contains ignore_index={ignore_index} as a token id")
    limit = vocab_size if vocab_size is not None else None
    for name, ids in [(f"prompts[{b}]", p) for b, p in enumerate(prompt_ids)] + [
            (f"responses[{b}][{k}]", r) for b, row in enumerate(response_ids) for k, r in enumerate(row)] + [
            ("pad_token_id", [pad_token_id])]:
        low, high = min(ids), max(ids)
        if low < 0:
            raise ValueError(f"{name} holds a negative token id ({low})")
        if limit is not None and high >= limit:
            raise ValueError(f"{name} holds token id {high}, outside the vocabulary [0, {limit})")
    max_token_id = max(max(max(p) for p in prompt_ids), pad_token_id,
                       max(max(r) for row in response_ids for r in row))

    B, K = len(prompt_ids), max(len(row) for row in response_ids)
    lengths = [len(p) + sum(len(r) + 1 for r in row) - 1 for p, row in zip(prompt_ids, response_ids)]
    L = max(lengths)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.int64)
    position_ids = torch.zeros((B, L), dtype=torch.int64)
    owner = torch.full((B, L), PAD, dtype=torch.int64)
    labels = torch.full((B, L), ignore_index, dtype=torch.int64)
    segment_ids = torch.full((B, L), -1, dtype=torch.int64)
    mask = torch.zeros((B, K), dtype=torch.bool)
    response_lengths = torch.zeros((B, K), dtype=torch.int64)
    for b, (prompt, row) in enumerate(zip(prompt_ids, response_ids)):
        start = L - lengths[b] if padding_side == "left" else 0
        shared = len(prompt) - 1  # every segment restarts from the prompt's last token
        end = start + shared
        input_ids[b, start:end] = torch.tensor(prompt[:-1], dtype=torch.int64)
        position_ids[b, start:end] = torch.arange(shared)
        owner[b, start:end] = PROMPT
        for k, response in enumerate(row):
            n = len(response) + 1
            tokens = torch.tensor([prompt[-1], *response], dtype=torch.int64)
            input_ids[b, end:end + n] = tokens
            position_ids[b, end:end + n] = torch.arange(shared, shared + n)
            owner[b, end:end + n] = k + 1
            labels[b, end:end + n - 1] = tokens[1:]
            segment_ids[b, end:end + n - 1] = b * K + k
            mask[b, k] = True
            response_lengths[b, k] = len(response)
            end += n
    return PackedPrompts(input_ids, position_ids, owner, labels, segment_ids, mask, response_lengths,
                         ignore_index, max_token_id)


# ---------------------------------------------------------------------------------------------------------
# Model support
# ---------------------------------------------------------------------------------------------------------

def _configs(model: torch.nn.Module) -> list[Any]:
    config = getattr(model, "config", None)
    if config is None:
        return []
    found = [config]
    for name in ("text_config", "language_config", "llm_config"):
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "model_type"):
            found.append(sub)
    return found


def _static_check(model: torch.nn.Module) -> None:
    name = type(model).__name__
    for config in _configs(model):
        implementation = getattr(config, "_attn_implementation", None)
        if implementation is not None and implementation not in MASK_HONOURING_ATTENTION:
            raise ValueError(
                f"{name} runs attn_implementation={implementation!r}, which cannot honour the packed 4-D "
                f"attention mask (it would attend across responses); load the model with "
                f"attn_implementation='sdpa' (or 'eager' / 'flex_attention'), or turn packing off "
                f"(pack_prompts='off')")
        rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
        if isinstance(rope, dict) and "mrope_section" in rope:
            raise ValueError(
                f"{name} uses multimodal RoPE (3-D position ids it derives from the tokens and image grid), "
                f"which a packed row's 1-D position_ids cannot express; turn packing off (pack_prompts='off')")
    for module in model.modules():
        if hasattr(type(module), "get_rope_index"):
            raise ValueError(
                f"{name} computes its own multimodal position ids ({type(module).__name__}.get_rope_index), "
                f"which a packed row's 1-D position_ids cannot express; turn packing off (pack_prompts='off')")


# model → the attention settings its probe passed under (weak: a verified model is not kept alive)
_VERIFIED: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def _probe_tokens(model: torch.nn.Module, count: int, generator: torch.Generator) -> list[int]:
    embeddings = model.get_input_embeddings()
    V = embeddings.num_embeddings
    reserved = set()
    for config in _configs(model):
        for key in ("image_token_id", "image_token_index", "video_token_id", "pad_token_id"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                reserved.add(value)
    allowed = torch.tensor([t for t in range(min(V, 4096)) if t not in reserved])
    return allowed[torch.randint(len(allowed), (count,), generator=generator)].tolist()


def _probe(model: torch.nn.Module, prompt: list[int], responses: list[list[int]]) -> torch.Tensor:
    weight = model.get_input_embeddings().weight
    packed = pack_shared_prompt([prompt], [responses], pad_token_id=prompt[0]).to(weight.device)
    mask_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    logits = model(**packed.model_inputs(use_cache=False, mask_dtype=mask_dtype)).logits
    return packed.sequence_logprobs(logits.float())[0]


@torch.no_grad()
def check_model(model: torch.nn.Module) -> None:
    """Raise ValueError (naming the model class and the setting to use) unless ``model`` honours packing.

    Static checks: every (sub-)config's ``attn_implementation`` must be one of ``MASK_HONOURING_ATTENTION``
    (flash attention reads a 4-D mask as padding), and no multimodal RoPE (3-D position ids). Then a
    text-only probe, once per model and attention setting: a random prompt with three responses, packed,
    must give the unpacked log-probs, and replacing one response must leave the others' unchanged (a model
    that rebuilds its own mask, ignores ``position_ids`` or drops the 4-D mask fails here). The model is
    put in eval mode for the probe (dropout off) and restored.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _static_check(model)
    settings = str([getattr(c, "_attn_implementation", None) for c in _configs(model)])
    if _VERIFIED.get(model) == settings:
        return
    name = type(model).__name__
    generator = torch.Generator().manual_seed(0)
    # longer than attention kernels' smallest blocks (16/32 keys), so block-size-dependent mask bugs show
    prompt = _probe_tokens(model, 40, generator)
    responses = [_probe_tokens(model, n, generator) for n in (5, 1, 7)]
    was_training = model.training
    model.eval()
    try:
        packed = _probe(model, prompt, responses)
        unpacked = torch.stack([_probe(model, prompt, [r]) for r in responses]).squeeze(1)
        changed = _probe(model, prompt, [responses[0], _probe_tokens(model, 6, generator), responses[2]])
    except Exception as error:  # the model refused the 4-D mask / position ids: say which setting to use
        raise ValueError(f"{name} cannot run a packed batch ({type(error).__name__}: {error}); use "
                         f"attn_implementation='sdpa' or 'eager', or turn packing off "
                         f"(pack_prompts='off')") from error
    finally:
        model.train(was_training)
    dtype = model.get_input_embeddings().weight.dtype
    tolerance = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    scale = 1 + unpacked.abs()
    if not bool(((packed - unpacked).abs() <= tolerance * scale).all()):
        raise ValueError(f"{name}: packed log-probs differ from unpacked ones ({packed.tolist()} vs "
                         f"{unpacked.tolist()}): the model does not honour the packed attention mask or "
                         f"position_ids; use attn_implementation='sdpa' or 'eager', or turn packing off "
                         f"(pack_prompts='off')")
    kept = torch.stack([changed[0], changed[2]])
    if not bool(((kept - packed[[0, 2]]).abs() <= tolerance * scale[[0, 2]]).all()):
        raise ValueError(f"{name}: changing one packed response changed the others' log-probs: the model "
                         f"attends across responses; use attn_implementation='sdpa' or 'eager', or turn "
                         f"packing off (pack_prompts='off')")
    _VERIFIED[model] = settings
