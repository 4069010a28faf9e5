"""TRL drop-in: listwise, S-DPO and SMPRO preference training for people who already train with TRL.

``ListwiseTrainer`` is TRL's ``DPOTrainer`` (trl 1.16) with ranked multi-completion rows instead of
chosen/rejected pairs. Everything but the loss is TRL's: model loading, PEFT wrapping, the reference model
(``ref_model``; ``None`` + PEFT → the base model with the adapter disabled; ``None`` otherwise → a frozen copy
of the initial policy), ``precompute_ref_log_probs``, dropout, accelerate/DeepSpeed/FSDP preparation,
logging. What is ours: the collator/tokenisation of ranked rows, the completion log-probs (the fused
``prefrank.ops.linear_sequence_logprobs`` on the final hidden states: the ``(tokens, vocab)`` logits are never
materialised) and the loss (``prefrank.losses``) in ``compute_loss``, HF's stable hook.

The change from a DPO script::

    -from trl import DPOConfig, DPOTrainer
    +from prefrank.integrations.trl import ListwiseConfig as DPOConfig, ListwiseTrainer as DPOTrainer
    -args = DPOConfig(output_dir="out", beta=0.1)
    +args = DPOConfig(output_dir="out", beta=0.1, loss="plackett_luce")
     # rows: {"prompt", "chosen", "rejected"} → {"prompt", "completions": [K strings], "ranks": [K ints]}

Dataset rows, plain text or conversational exactly as in TRL:

- ``prompt``: a string, or a list of messages;
- ``completions``: K ≥ 2 completions (strings, or lists of assistant messages); K may differ between rows;
- ``ranks``: K ints, 0 = best, equal ranks = a tie (only their order matters: [2, 5, 5] ≡ [0, 1, 1]);
- ``images`` (optional, vision-language models): the prompt's images, as in TRL.

Losses (``ListwiseConfig.loss``), with r = β·(log π(y|x) − log π_ref(y|x)) summed over completion tokens:

- ``"plackett_luce"``: ``listwise_dpo_loss`` (Plackett-Luce NLL of the ranking; ties by ``ties``;
  ``top_k``). K = 2, ranks [0, 1] is TRL's sigmoid DPO exactly.
- ``"sdpo"``: S-DPO, the best completion(s) against all others unordered (top-1 Plackett-Luce).
- ``"smpro"``: ``smpro_loss`` (relaxed sorting network on the rank groups + positive anchor; options
  ``network``, ``relaxation``, ``steepness``, ``anchor_weight``).
- ``"dpo"``: pairwise DPO (``dpo_loss`` with TRL's ``loss_type`` ∈ sigmoid, hinge, ipo, robust and
  ``label_smoothing``) over every pair of completions with different ranks, averaged over all pairs of the
  batch (what binarising every row into all its pairs would give). K = 2 is TRL's DPO.

Logged metrics: TRL's names (``rewards/chosen`` = mean reward of the best-ranked completions,
``rewards/rejected`` = of the others, ``rewards/margins`` = mean over rows of best − rest,
``rewards/accuracies`` = fraction of differently-ranked pairs in the right order, ``logps/chosen``,
``logps/rejected``) — identical to TRL's at K = 2 — plus ``rewards/group_{g}`` per rank level and the loss
terms ``loss/*``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import types
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from accelerate.utils import is_peft_model
    from datasets import Dataset, IterableDataset
    from torch.utils.data import DataLoader
    from transformers import AutoProcessor, PreTrainedTokenizerBase, ProcessorMixin
    from transformers.data.data_collator import DataCollatorMixin
    from trl import DPOConfig, DPOTrainer
    from trl.data_utils import (
        _tokenize,
        apply_chat_template,
        common_prefix_length,
        is_conversational,
        prepare_multimodal_messages,
    )
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import flush_left, get_config_model_id, pad, use_adapter
except ImportError as error:  # pragma: no cover - exercised by a subprocess test without trl
    raise ImportError(
        f"prefrank.integrations.trl needs TRL and its dependencies ({error}): pip install trl==1.16.0 "
        "(the version this integration is tested with)") from error

from prefrank import _options, losses, packing
from prefrank.ops import linear_sequence_logprobs

__all__ = ["LOSSES", "DataCollatorForRankedCompletions", "DataCollatorForVisionRankedCompletions",
           "ListwiseConfig", "ListwiseTrainer", "check_ranked_rows"]

LOSSES = ("dpo", "plackett_luce", "sdpo", "smpro")
PACK_PROMPTS = ("auto", "on", "off")
REQUIRED_COLUMNS = ("prompt", "completions", "ranks")
IGNORE_INDEX = -100
# batch entries that are not model inputs
_BATCH_KEYS = ("completion_mask", "completion_tokens", "levels", "ref_logps", "packed")


# ------------------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------------------

@dataclass
class ListwiseConfig(DPOConfig):
    r"""``DPOConfig`` plus the listwise loss and its options (every ``DPOConfig`` / ``TrainingArguments``
    field keeps its meaning; ``beta`` is the reward scale of every loss).

    Parameters:
        loss: one of ``LOSSES`` (see the module docstring).
        ties: ``"breslow"`` or ``"efron"``: how tied completions are scored ("plackett_luce", "sdpo").
        top_k: score only the first ``top_k`` rank levels ("plackett_luce"; the others stay in the
            denominators). ``None`` = all.
        network, relaxation, steepness: the relaxed sorting network of ``"smpro"``.
        anchor_weight: weight of SMPRO's anchor term (pushes the best completions above the reference).
        pack_prompts: ``"auto"`` (default): text rows are packed with ``prefrank.packing`` — each prompt once,
            followed by its K completions, one row per prompt — when ``prefrank.packing.check_model`` accepts
            the model (sdpa/eager/flex attention, 1-D positions), unpacked otherwise; ``"on"``: packed or
            ValueError; ``"off"``: K rows ``[prompt, completion_k]`` per prompt. Same log-probs either way.
            Vision rows run unpacked.

    ``loss_type`` / ``label_smoothing`` apply to ``loss="dpo"`` only (one of sigmoid, hinge, ipo, robust).
    Not supported (ValueError): ``ld_alpha``, ``use_weighting``, ``loss_weights``, a non-default
    ``f_divergence_type``, ``truncation_mode="keep_end"``.
    """

    loss: str = field(default="plackett_luce", metadata={"help": "Listwise loss.", "choices": list(LOSSES)})
    ties: str = field(default="breslow", metadata={"help": "Tie rule of the Plackett-Luce losses.",
                                                   "choices": list(_options.names(_options.Ties))})
    top_k: int | None = field(default=None, metadata={"help": "Plackett-Luce: score only the first k levels."})
    network: str = field(default="odd_even", metadata={"help": "SMPRO sorting network.",
                                                       "choices": list(_options.names(_options.Network))})
    relaxation: str = field(default="cauchy", metadata={"help": "SMPRO comparator relaxation.",
                                                        "choices": list(_options.names(_options.Relaxation))})
    steepness: float = field(default=10.0, metadata={"help": "SMPRO sorting-network steepness."})
    anchor_weight: float = field(default=1.0, metadata={"help": "SMPRO anchor term weight."})
    pack_prompts: str = field(default="auto", metadata={"help": "Shared-prompt packing of text rows.",
                                                        "choices": list(PACK_PROMPTS)})

    def __post_init__(self):
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.pack_prompts not in PACK_PROMPTS:
            raise ValueError(f"pack_prompts must be one of {PACK_PROMPTS}, got {self.pack_prompts!r}")
        _options.code(_options.Ties, "ties", self.ties)
        _options.code(_options.Network, "network", self.network)
        _options.code(_options.Relaxation, "relaxation", self.relaxation)
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
                raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
            if self.loss != "plackett_luce":
                raise ValueError(f"top_k applies to loss='plackett_luce' only, got loss={self.loss!r}")
        for name in ("beta", "steepness"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.anchor_weight, (int, float)) and math.isfinite(self.anchor_weight)
                and self.anchor_weight >= 0):
            raise ValueError(f"anchor_weight must be a finite number >= 0, got {self.anchor_weight!r}")
        if self.loss == "dpo":
            if len(self.loss_type) != 1 or self.loss_type[0] not in losses.LOSS_TYPES:
                raise ValueError(f"loss='dpo' takes one loss_type among {losses.LOSS_TYPES}, got {self.loss_type}")
        elif self.loss_type != ["sigmoid"]:
            raise ValueError(f"loss_type applies to loss='dpo' only; loss={self.loss!r} got {self.loss_type}")
        unsupported = {"ld_alpha": self.ld_alpha is not None, "use_weighting": self.use_weighting,
                       "loss_weights": self.loss_weights is not None,
                       "f_divergence_type": self.f_divergence_type != "reverse_kl",
                       "truncation_mode": self.truncation_mode != "keep_start"}
        bad = [name for name, is_set in unsupported.items() if is_set]
        if bad:
            raise ValueError(f"ListwiseConfig does not support {bad} (DPOTrainer-only options); leave them at "
                             "their defaults")


# ------------------------------------------------------------------------------------------------------------
# Row validation and the ranks → levels map
# ------------------------------------------------------------------------------------------------------------

def _is_message_list(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "role" in m for m in value)


def _check_row(index: int | str, row: dict, where: str = "row") -> None:
    """ValueError naming ``where index`` and the column when one ranked row is malformed."""
    for column in REQUIRED_COLUMNS:
        if row.get(column) is None:
            raise ValueError(f"{where} {index}: column {column!r} is missing (a ranked row needs "
                             f"{list(REQUIRED_COLUMNS)}, optionally 'images')")
    prompt, completions, ranks = row["prompt"], row["completions"], row["ranks"]
    if not (isinstance(prompt, str) or _is_message_list(prompt)):
        raise ValueError(f"{where} {index}: column 'prompt' must be a string or a list of messages, got "
                         f"{type(prompt).__name__}")
    if not isinstance(completions, (list, tuple)) or len(completions) < 2:
        raise ValueError(f"{where} {index}: column 'completions' must be a list of at least 2 completions, got "
                         f"{completions!r:.80}")
    for k, completion in enumerate(completions):
        if not (isinstance(completion, str) or _is_message_list(completion)):
            raise ValueError(f"{where} {index}: column 'completions'[{k}] must be a string or a list of messages, "
                             f"got {type(completion).__name__}")
    if not isinstance(ranks, (list, tuple)):
        raise ValueError(f"{where} {index}: column 'ranks' must be a list of ints, got {type(ranks).__name__}")
    if len(ranks) != len(completions):
        raise ValueError(f"{where} {index}: column 'ranks' has {len(ranks)} entries for {len(completions)} "
                         "completions (one rank per completion)")
    for k, rank in enumerate(ranks):
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ValueError(f"{where} {index}: column 'ranks'[{k}] must be an int (0 = best, equal = tie), got "
                             f"{rank!r} ({type(rank).__name__})")
        if rank < 0:
            raise ValueError(f"{where} {index}: column 'ranks'[{k}] must be >= 0 (0 = best), got {rank}")
    if len(set(ranks)) < 2:
        raise ValueError(f"{where} {index}: column 'ranks' has fewer than two rank levels ({list(ranks)}): there "
                         "is no preference to learn; drop the row")
    images = row.get("images")
    if images is not None and not isinstance(images, (list, tuple)):
        raise ValueError(f"{where} {index}: column 'images' must be a list of images, got {type(images).__name__}")


def check_ranked_rows(dataset: Dataset | IterableDataset | list[dict], name: str = "train_dataset") -> None:
    """Validate every row of a ranked dataset (``prompt``, ``completions``, ``ranks``, optional ``images``).

    Raises ValueError naming ``name``, the row index and the column of the first bad row: a missing column,
    ranks of the wrong length, non-int or negative ranks, fewer than two rank levels, fewer than two
    completions. An ``IterableDataset`` is not read here (its rows are checked by the collator as they come).
    """
    if isinstance(dataset, IterableDataset):
        return
    if isinstance(dataset, Dataset):
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(f"{name} row 0: column {missing[0]!r} is missing (columns: {dataset.column_names}; a "
                             f"ranked row needs {list(REQUIRED_COLUMNS)}, optionally 'images')")
        columns = [c for c in (*REQUIRED_COLUMNS, "images") if c in dataset.column_names]
        # Arrow stores a column with one non-integer rank as float for every row: blame the first such row
        rank_feature = getattr(dataset.features["ranks"], "feature", None)
        if getattr(rank_feature, "dtype", "").startswith("float"):
            for index, ranks in enumerate(dataset["ranks"]):
                if ranks is not None and any(float(r) != int(r) for r in ranks if r is not None):
                    raise ValueError(f"{name} row {index}: column 'ranks' must hold ints, got {ranks}")
        index = 0
        for batch in dataset.select_columns(columns).iter(batch_size=1024):
            for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
                _check_row(index, row, f"{name} row")
                index += 1
        return
    for index, row in enumerate(dataset):
        _check_row(index, row, f"{name} row")


def _levels(ranks_per_row: list[list[int]]) -> torch.Tensor:
    """(B, K_max) int64 dense rank levels (0 = best, equal ranks = equal level), -1 padding."""
    width = max(len(r) for r in ranks_per_row)
    levels = torch.full((len(ranks_per_row), width), -1, dtype=torch.int64)
    for b, ranks in enumerate(ranks_per_row):
        dense = {rank: level for level, rank in enumerate(sorted(set(ranks)))}
        levels[b, :len(ranks)] = torch.tensor([dense[r] for r in ranks])
    return levels


# ------------------------------------------------------------------------------------------------------------
# Collators
# ------------------------------------------------------------------------------------------------------------

@dataclass
class DataCollatorForRankedCompletions(DataCollatorMixin):
    """Batches tokenised ranked rows: each example holds ``prompt_ids``, ``completion_ids`` (K lists) and
    ``ranks`` (K ints), optionally ``ref_logps`` (K floats). Every ``prompt + completion`` is truncated to
    ``max_length`` (keep the start), as TRL's ``DataCollatorForPreference`` does.

    Unpacked (``pack=False``): ``N = Σ_b K_b`` right-padded sequences ``prompt_b + completion_{b,k}`` —
    ``input_ids``, ``attention_mask``, ``completion_mask`` (N, T), row n = the n-th valid slot of ``levels`` in
    row-major order. Packed (``pack=True``): ``packed``, a ``prefrank.packing.PackedPrompts`` (one row per
    prompt, then its completions). Both: ``levels`` (B, K_max) dense rank levels (-1 = padding slot),
    ``completion_tokens`` (B, K_max) and ``ref_logps`` (B, K_max) when given.
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"
    pack: bool = False

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        for i, example in enumerate(examples):
            if len(example["ranks"]) != len(example["completion_ids"]):
                raise ValueError(f"batch example {i}: column 'ranks' has {len(example['ranks'])} entries for "
                                 f"{len(example['completion_ids'])} completions")
        output = self._packed(examples) if self.pack else self._unpacked(examples)
        output["levels"] = _levels([example["ranks"] for example in examples])
        if "ref_logps" in examples[0]:
            output["ref_logps"] = _ref_grid([example["ref_logps"] for example in examples], output["levels"])
        return output

    def _packed(self, examples):
        budget = None if self.max_length is None else lambda e: self.max_length - len(e["prompt_ids"])
        completions = [[c if budget is None else c[:budget(e)] for c in e["completion_ids"]] for e in examples]
        packed = packing.pack_shared_prompt([e["prompt_ids"] for e in examples], completions,
                                            pad_token_id=self.pad_token_id, ignore_index=IGNORE_INDEX)
        return {"packed": packed, "completion_tokens": packed.response_lengths}

    def _unpacked(self, examples):
        sequences, completion_masks = [], []
        for example in examples:
            for completion in example["completion_ids"]:
                ids = example["prompt_ids"] + completion
                mask = [0] * len(example["prompt_ids"]) + [1] * len(completion)
                sequences.append(ids[:self.max_length])
                completion_masks.append(mask[:self.max_length])
        levels = _levels([example["ranks"] for example in examples])
        return {
            "input_ids": pad([torch.tensor(s) for s in sequences], padding_value=self.pad_token_id,
                             padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of),
            "attention_mask": pad([torch.ones(len(s), dtype=torch.long) for s in sequences], padding_value=0,
                                  padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of),
            "completion_mask": pad([torch.tensor(m, dtype=torch.long) for m in completion_masks], padding_value=0,
                                   padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of),
            "completion_tokens": torch.zeros(levels.shape, dtype=torch.long).masked_scatter(
                levels >= 0, torch.tensor([sum(m) for m in completion_masks], dtype=torch.long)),
        }


def _ref_grid(ref_logps: list[list[float]], levels: torch.Tensor) -> torch.Tensor:
    grid = torch.zeros(levels.shape, dtype=torch.float32)
    for b, values in enumerate(ref_logps):
        grid[b, :len(values)] = torch.tensor(values, dtype=torch.float32)
    return grid


@dataclass
class DataCollatorForVisionRankedCompletions(DataCollatorMixin):
    """The vision version (TRL's ``DataCollatorForVisionPreference`` with K completions): tokenises and
    processes the images on the fly. Examples hold ``prompt``, ``completions``, ``ranks`` and ``images`` (or
    ``image``); each of the N = Σ_b K_b sequences carries its prompt's images. Same outputs as
    :class:`DataCollatorForRankedCompletions` plus the processor's image tensors."""

    processor: ProcessorMixin
    max_length: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        prompts, completions, images = [], [], []
        for i, example in enumerate(examples):
            example = dict(example)
            if "image" in example:
                example["images"] = [example.pop("image")]
            _check_row(i, example, "batch example")
            row_images = example.get("images") or []
            prompt, row_completions = example["prompt"], list(example["completions"])
            if is_conversational(example):
                prompt = prepare_multimodal_messages(prompt, images=row_images)
                texts = [apply_chat_template({"prompt": prompt, "completion": prepare_multimodal_messages(c)},
                                             self.processor) for c in row_completions]
                prompt, row_completions = texts[0]["prompt"], [t["completion"] for t in texts]
            prompts += [prompt] * len(row_completions)
            completions += row_completions
            images += [row_images] * len(row_completions)
        if all(image_list == [] for image_list in images):  # transformers wants images=None then
            images = None
        common = {"return_tensors": self.return_tensors, "add_special_tokens": False}
        processed_prompts = self.processor(images=images, text=prompts, padding=True, padding_side="left", **common)
        processed_completions = self.processor(text=completions, padding=True, padding_side="right", **common)
        completion_ids = processed_completions["input_ids"]
        completion_attention = processed_completions["attention_mask"]
        prompt_mask = processed_prompts["attention_mask"]
        per_token = {
            "input_ids": torch.cat((processed_prompts["input_ids"], completion_ids), dim=1),
            "attention_mask": torch.cat((prompt_mask, completion_attention), dim=1),
            "completion_mask": torch.cat((torch.zeros_like(prompt_mask), completion_attention), dim=1),
        }
        if "token_type_ids" in processed_prompts:  # Gemma
            per_token["token_type_ids"] = torch.cat(
                (processed_prompts["token_type_ids"], processed_completions["token_type_ids"]), dim=1)
        if "mm_token_type_ids" in processed_prompts:  # Qwen2/2.5-VL
            per_token["mm_token_type_ids"] = torch.cat(
                (processed_prompts["mm_token_type_ids"], torch.zeros_like(completion_ids)), dim=1)
        names = ["attention_mask", *[k for k in per_token if k != "attention_mask"]]
        flushed = flush_left(*[per_token[k] for k in names])
        output = dict(processed_prompts)  # the image tensors (pixel_values, image_grid_thw, …)
        for key, value in zip(names, flushed):
            output[key] = value if self.max_length is None else value[:, :self.max_length]
        output["levels"] = levels = _levels([example["ranks"] for example in examples])
        output["completion_tokens"] = torch.zeros(levels.shape, dtype=torch.long).masked_scatter(
            levels >= 0, output["completion_mask"].sum(-1))
        if "ref_logps" in examples[0]:
            output["ref_logps"] = _ref_grid([example["ref_logps"] for example in examples], levels)
        return output


# ------------------------------------------------------------------------------------------------------------
# The fused completion log-prob head
# ------------------------------------------------------------------------------------------------------------

@dataclass
class SequenceLogpsOutput:
    """What ``model(..., prefrank_labels=labels)`` returns: ``logps`` (N,) summed completion log-probs."""

    logps: torch.Tensor


def add_sequence_logps_head(model: torch.nn.Module) -> None:
    """Patch ``model.forward``: with ``prefrank_labels=labels`` (N, T) (``-100`` = not scored) it runs the
    backbone and returns ``SequenceLogpsOutput(logps)``, logps[n] = Σ_t log p(labels[n, t+1] | ≤ t) from
    ``linear_sequence_logprobs`` on the final hidden states and the lm-head weight (no full logits). With
    ``prefrank_packed=packed`` (a ``PackedPrompts`` whose inputs are the call's) it returns the (B, K)
    log-probs of the packed completions instead.
    Without the keyword the forward is the previous one (generation, TRL's own paths). Going through
    ``model(...)`` keeps DDP/FSDP/DeepSpeed hooks and PEFT adapters in the loop."""
    if getattr(model, "_prefrank_logps_head", False):
        return
    text_config = model.config.get_text_config()
    if getattr(text_config, "final_logit_softcapping", None):
        raise ValueError(f"{type(model).__name__} soft-caps its logits (final_logit_softcapping): "
                         "linear_sequence_logprobs computes plain softmax log-probs; this model is not supported")
    logit_scale = getattr(text_config, "logit_scale", None) or 1.0  # logits·s = logits / (1/s): a temperature
    previous_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, prefrank_labels=None, prefrank_packed=None, labels=None, num_items_in_batch=None,
                **kwargs):
        if prefrank_labels is None and prefrank_packed is None:
            optional = {"labels": labels, "num_items_in_batch": num_items_in_batch}
            return previous_forward(*args, **kwargs, **{k: v for k, v in optional.items() if v is not None})
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        head = self.get_output_embeddings()
        if prefrank_packed is not None:  # labels already aligned with the hidden states, one slot per completion
            hidden = hidden if hidden.dtype == head.weight.dtype else hidden.to(head.weight.dtype)
            return SequenceLogpsOutput(logps=prefrank_packed.linear_sequence_logprobs(
                hidden, head.weight, bias=head.bias, temperature=1.0 / logit_scale))
        labels = prefrank_labels.to(hidden.device)
        if hidden.shape[1] > labels.shape[1]:  # prompt-learning PEFT prepends virtual tokens
            labels = torch.nn.functional.pad(labels, (hidden.shape[1] - labels.shape[1], 0), value=IGNORE_INDEX)
        hidden = hidden[:, :-1]
        if hidden.dtype != head.weight.dtype:  # autocast: the head runs in the weight's precision
            hidden = hidden.to(head.weight.dtype)
        logps = linear_sequence_logprobs(hidden, head.weight, labels[:, 1:], bias=head.bias,
                                         ignore_index=IGNORE_INDEX, temperature=1.0 / logit_scale)
        return SequenceLogpsOutput(logps=logps)

    model.forward = types.MethodType(forward, model)
    model._prefrank_logps_head = True


# ------------------------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------------------------

class ListwiseTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` on ranked multi-completion rows with prefrank's losses (see the module docstring).

    Same constructor as ``DPOTrainer`` (``model``, ``ref_model``, ``args`` (a :class:`ListwiseConfig`),
    ``data_collator``, ``train_dataset``, ``eval_dataset``, ``processing_class``, ``peft_config``, …). Every
    row is validated before anything else happens (ValueError naming the dataset, row index and column).
    """

    _tag_names = ["trl", "dpo", "prefrank", "listwise"]
    _name = "Listwise"

    def __init__(self, model, ref_model=None, args: ListwiseConfig | None = None, data_collator=None,
                 train_dataset: Dataset | IterableDataset | None = None, eval_dataset=None,
                 processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None, compute_metrics=None,
                 callbacks=None, optimizers=(None, None), quantization_config=None, peft_config=None):
        if args is None:
            args = ListwiseConfig(output_dir="listwise-out")
        if not isinstance(args, ListwiseConfig):
            raise TypeError(f"args must be a ListwiseConfig, got {type(args).__name__}")
        if train_dataset is None:
            raise ValueError("`train_dataset` is required")
        check_ranked_rows(train_dataset, "train_dataset")
        eval_sets = eval_dataset if isinstance(eval_dataset, dict) else {"eval_dataset": eval_dataset}
        for name, dataset in eval_sets.items():
            if dataset is not None:
                check_ranked_rows(dataset, name)
        # TRL would reload the initial policy from its path; a copy of the instance is the same model and also
        # works for models built from a config
        if (ref_model is None and not isinstance(model, str) and peft_config is None
                and not is_peft_model(model) and not args.precompute_ref_log_probs):
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if processing_class is None:  # as DPOTrainer does, but the collator needs it before DPOTrainer runs
            model_id = model if isinstance(model, str) else get_config_model_id(model.config)
            processing_class = AutoProcessor.from_pretrained(
                model_id, revision=(args.model_init_kwargs or {}).get("revision"),
                trust_remote_code=args.trust_remote_code)
        if data_collator is None:
            data_collator = self._default_collator(train_dataset, processing_class, args)
        super().__init__(model=model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config)
        if self.aux_loss_enabled:
            raise ValueError("the MoE router auxiliary loss is not supported by ListwiseTrainer; set "
                             "router_aux_loss_coef=0.0")
        self._add_logps_heads()
        self._setup_packing()

    def _setup_packing(self):
        """Pack text rows when ``pack_prompts`` asks for it and ``prefrank.packing.check_model`` accepts the
        policy and the reference model (idempotent)."""
        collator = self.data_collator
        if getattr(self, "_packing_decided", False) or not isinstance(collator, DataCollatorForRankedCompletions):
            if self.args.pack_prompts == "on" and not isinstance(collator, DataCollatorForRankedCompletions):
                raise ValueError("pack_prompts='on' packs text rows with ListwiseTrainer's own collator; vision "
                                 "rows and custom collators run unpacked (pack_prompts='auto' or 'off')")
            return
        self._packing_decided = True
        if self.args.pack_prompts == "off":
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        models = [unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped]
        if self.ref_model is not None:
            models.append(self.accelerator.unwrap_model(self.ref_model))
        try:
            for model in models:
                packing.check_model(model)
        except ValueError:
            if self.args.pack_prompts == "on":
                raise
            return
        collator.pack = True

    def _add_logps_heads(self):
        """Patch the policy (the PEFT base model under its adapters) and the reference model (idempotent)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        add_sequence_logps_head(unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped)
        if self.ref_model is not None:
            add_sequence_logps_head(self.accelerator.unwrap_model(self.ref_model))

    @staticmethod
    def _default_collator(train_dataset, processing_class, args):
        """The collator DPOTrainer would pick, for ranked rows (called before DPOTrainer sets the pad token,
        so it does the same: the tokenizer's pad token, else its EOS)."""
        tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        sample = next(iter(train_dataset))
        if "image" in sample or "images" in sample:
            return DataCollatorForVisionRankedCompletions(processor=processing_class, max_length=args.max_length)
        return DataCollatorForRankedCompletions(pad_token_id=tokenizer.pad_token_id, max_length=args.max_length,
                                                pad_to_multiple_of=args.pad_to_multiple_of)

    # -- data --------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        first = next(iter(dataset))
        if "prompt_ids" in first and "completion_ids" in first:  # already tokenised
            return dataset
        check_ranked_rows(dataset, dataset_name)
        eos = self._tokenizer.eos_token
        map_kwargs = {"num_proc": args.dataset_num_proc} if isinstance(dataset, Dataset) else {}

        def tokenize(example):
            tools = example.get("tools")
            tools = json.loads(tools) if isinstance(tools, str) else tools
            template_kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
            if is_conversational(example):
                prompt_ids = _tokenize(processing_class, example["prompt"], add_generation_prompt=True,
                                       **template_kwargs)["input_ids"]
                full = [_tokenize(processing_class, example["prompt"] + c, **template_kwargs)["input_ids"]
                        for c in example["completions"]]
            else:  # plain text: TRL appends EOS to completions that lack it
                prompt_ids = _tokenize(processing_class, example["prompt"])["input_ids"]
                full = [_tokenize(processing_class, example["prompt"] + (c if c.endswith(eos) else c + eos))[
                    "input_ids"] for c in example["completions"]]
            # the completion starts where prompt and prompt+completion diverge (TRL's rule)
            prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full)
            return {"prompt_ids": prompt_ids[:prompt_len], "completion_ids": [ids[prompt_len:] for ids in full]}

        dataset = dataset.map(tokenize, **map_kwargs)
        if args.max_length is not None:  # as TRL: a prompt that fills max_length leaves no completion token
            dataset = dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length, **map_kwargs)
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            if self._is_vision_dataset:
                self._signature_columns = ["prompt", "completions", "ranks", "image", "images", "tools",
                                           "chat_template_kwargs", "ref_logps"]
            else:
                self._signature_columns = ["prompt_ids", "completion_ids", "ranks", "ref_logps"]

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if isinstance(dataset, IterableDataset):
            raise ValueError("precompute_ref_log_probs=True needs a map-style Dataset, not an IterableDataset")
        self._add_logps_heads()  # DPOTrainer.__init__ precomputes before ours returns
        self._setup_packing()
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        values = []
        for batch in loader:
            batch = self._prepare_inputs({k: v for k, v in batch.items() if k != "ref_logps"})
            levels = batch["levels"]
            ref = self._reference_logps(batch).cpu()
            values += [row[valid].tolist() for row, valid in zip(ref, (levels >= 0).cpu())]
        if "ref_logps" in dataset.column_names:
            dataset = dataset.remove_columns("ref_logps")
        return dataset.add_column("ref_logps", values)

    # -- log-probs and loss ------------------------------------------------------------------------------

    def _completion_logps(self, model, inputs) -> torch.Tensor:
        """(B, K_max) summed completion log-probs (0 in padding slots)."""
        if "packed" in inputs:
            packed = inputs["packed"].to(self.accelerator.device)
            dtype = torch.float64 if self.accelerator.unwrap_model(model).dtype == torch.float64 else torch.float32
            model_kwargs = packed.model_inputs(mask_dtype=dtype, use_cache=False)
            return model(**model_kwargs, prefrank_packed=packed).logps
        model_kwargs = {k: v for k, v in inputs.items() if k not in _BATCH_KEYS}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        logps = model(**model_kwargs, prefrank_labels=labels).logps
        valid = inputs["levels"] >= 0
        return logps.new_zeros(valid.shape).masked_scatter(valid, logps)

    def _reference_logps(self, inputs) -> torch.Tensor:
        """Reference log-probs: ``ref_model``; else the PEFT model with its adapter disabled (or its "ref"
        adapter); else the policy itself (only before training: ``precompute_ref_log_probs``)."""
        context = contextlib.nullcontext()
        model = self.ref_model
        if model is None:
            model = self.model
            unwrapped = self.accelerator.unwrap_model(self.model)
            if is_peft_model(unwrapped):
                context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                context:
            return self._completion_logps(model, inputs)

    def _listwise_loss(self, policy, ref, levels, completion_tokens) -> losses.PreferenceLossOutput:
        args = self.args
        if args.loss == "plackett_luce":
            return losses.listwise_dpo_loss(policy, ref, groups=levels, beta=args.beta, ties=args.ties,
                                            top_k=args.top_k)
        if args.loss == "sdpo":  # the best level against every other completion, unordered
            return losses.listwise_dpo_loss(policy, ref, groups=levels.clamp(max=1), beta=args.beta, ties=args.ties,
                                            top_k=1)
        if args.loss == "smpro":
            return losses.smpro_loss(policy, ref, levels, beta=args.beta, network=args.network,
                                     relaxation=args.relaxation, steepness=args.steepness,
                                     anchor_weight=args.anchor_weight)
        loss_type = args.loss_type[0]
        if loss_type == "ipo":  # TRL's IPO uses length-averaged log-probs
            tokens = completion_tokens.clamp(min=1).to(policy.dtype)
            policy, ref = policy / tokens, ref / tokens
        valid = levels >= 0
        better = valid[:, :, None] & valid[:, None, :] & (levels[:, :, None] < levels[:, None, :])
        b, i, j = better.nonzero(as_tuple=True)  # every (row, better, worse) pair
        return losses.dpo_loss(policy[b, i], policy[b, j], ref[b, i], ref[b, j], beta=args.beta,
                               loss_type=loss_type, label_smoothing=args.label_smoothing)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        levels = inputs["levels"]
        policy = self._completion_logps(model, inputs)
        ref = inputs["ref_logps"].to(policy) if "ref_logps" in inputs else self._reference_logps(inputs)
        loss, metrics = self._listwise_loss(policy, ref, levels, inputs["completion_tokens"])
        self._log_metrics(mode, metrics, policy.detach(), ref, levels, inputs)
        return (loss, {"logps": policy}) if return_outputs else loss

    def _log_metrics(self, mode, loss_metrics, policy, ref, levels, inputs):
        """TRL's metric names, from the rank levels (whatever the loss): chosen = the best level, rejected =
        the others; accuracies over every pair of different levels. Plus rewards/group_g and loss terms."""
        rewards = self.args.beta * (policy - ref.to(policy))
        valid, best, rest = levels >= 0, levels == 0, levels > 0
        row_margin = ((rewards * best).sum(-1) / best.sum(-1) - (rewards * rest).sum(-1) / rest.sum(-1))
        better = valid[:, :, None] & valid[:, None, :] & (levels[:, :, None] < levels[:, None, :])
        correct = better & (rewards[:, :, None] > rewards[:, None, :])
        zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
        # per-row sums and counts, gathered row by row: gather_for_metrics drops the rows accelerate duplicates
        # to fill the last eval batch, and every process's rows weigh the same
        stats = [torch.where(best, rewards, zero).sum(-1), best.sum(-1), torch.where(rest, rewards, zero).sum(-1),
                 rest.sum(-1), row_margin, correct.sum((1, 2)), better.sum((1, 2)),
                 torch.where(best, policy, zero).sum(-1), torch.where(rest, policy, zero).sum(-1)]
        rows = self.accelerator.gather_for_metrics(torch.stack([t.float() for t in stats], -1))
        chosen, n_best, rejected, n_rest, margins, n_correct, n_better, logps_chosen, logps_rest = rows.unbind(-1)
        metrics = {
            "rewards/chosen": chosen.sum() / n_best.sum(), "rewards/rejected": rejected.sum() / n_rest.sum(),
            "rewards/margins": margins.mean(), "rewards/accuracies": n_correct.sum() / n_better.sum(),
            "logps/chosen": logps_chosen.sum() / n_best.sum(), "logps/rejected": logps_rest.sum() / n_rest.sum(),
        }
        for key, value in zip(metrics, torch.stack(list(metrics.values())).tolist()):
            self._metrics[mode][key].append(value)
        # the loss terms are batch means: the mean over processes (duplicated rows of a last batch included)
        terms = {key: value for key, value in loss_metrics.items() if key.startswith("loss/")}
        if terms:
            gathered = self.accelerator.gather(torch.stack([v.float() for v in terms.values()])[None]).mean(0)
            for key, value in zip(terms, gathered.tolist()):
                self._metrics[mode][key].append(value)
        # mean reward per level over every process's rows: per-row sums and counts per level, padded to the
        # largest level any process saw (the number of levels varies between batches and processes); a level
        # no row has is not logged
        onehot = levels[..., None] == torch.arange(int(levels.max()) + 1, device=levels.device)
        per_level = torch.stack([torch.where(onehot, rewards[..., None], zero).sum(1).float(),
                                 onehot.sum(1).float()], 1)
        per_level = self.accelerator.gather_for_metrics(self.accelerator.pad_across_processes(per_level, dim=2))
        for level, (total, count) in enumerate(zip(*per_level.sum(0).tolist())):
            if count > 0:
                self._metrics[mode][f"rewards/group_{level}"].append(total / count)
        if mode == "train":
            attended = inputs["packed"].owner >= 0 if "packed" in inputs else inputs["attention_mask"]
            tokens = self.accelerator.gather_for_metrics(attended.sum().to(levels.device)).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
