"""The training loop: policy + frozen reference (or precomputed reference log-probs), AdamW with warmup,
gradient accumulation, DDP/FSDP, bf16 autocast, metrics.jsonl + plots, exact-match evaluation, atomic
checkpoints every N steps and on SIGTERM, exact resume.

Batches are a pure function of (seed, step): the global batch of step s is positions [s·B, (s+1)·B) of the
concatenated per-epoch permutations, split into grad_accum micro-batches and then across ranks, so a resumed
run (or a run on a different number of processes with the same global batch) sees the same data.
"""

import contextlib
import copy
import json
import math
import random
import signal
import threading
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from prefrank.packing import check_model
from prefrank.train import distributed as distributed_utils
from prefrank.train import selfpref
from prefrank.train.checkpoint import (
    append_line,
    check_run_folder,
    clear_run_folder,
    latest_checkpoint,
    load_checkpoint,
    read_jsonl_rows,
    save_checkpoint,
    set_rng_state,
    write_text_atomically,
)
from prefrank.train.data import load_jsonl, synthetic_dataset, validate_records
from prefrank.train.methods import METHODS, EncodedRecords
from prefrank.train.model import SequenceScorer, build_tiny_vlm, load_vlm


def build_policy(config):
    """The initial policy, deterministically: the same config always gives the same weights."""
    if config.model is None:
        vlm = build_tiny_vlm(seed=config.model_seed, **config.tiny_model)
    else:
        vlm = load_vlm(config.model)
    if config.init is not None:
        vlm.model.load_state_dict(init_state_dict(config.init, type(vlm.model)))
    return vlm


def init_state_dict(path, model_class):
    """Weights from a trainer run folder (its final/ model), an HF model folder, a trainer checkpoint folder
    or a raw state-dict .safetensors file. HF folders go through from_pretrained: transformers may store
    keys under a different (legacy) naming than the in-memory state dict."""
    path = Path(path)
    if (path / "final" / "config.json").exists():
        path = path / "final"
    if (path / "config.json").exists():
        return model_class.from_pretrained(path, local_files_only=True, dtype=torch.float32).state_dict()
    for candidate in (path, path / "model.safetensors"):
        if candidate.is_file():
            return load_file(candidate)
    raise FileNotFoundError(f"init={str(path)!r}: neither a model folder, a run folder nor a checkpoint")


def load_records(config, split):
    method = METHODS[config.method]
    if split == "train":
        if config.data is None:
            return synthetic_dataset(config.num_train, config.data_seed,
                                     num_negatives=config.num_negatives if method.needs_negatives else 0)
        return load_jsonl(config.data, config.data_root)
    if config.eval_data is None:
        return synthetic_dataset(config.num_eval, config.eval_seed) if config.data is None else []
    return load_jsonl(config.eval_data, config.data_root)


def batch_indices(step, num_examples, batch_size, seed):
    """Record indices of the global batch of `step` (0-based): stateless, so resume needs no sampler state."""
    indices = []
    position = step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position, num_examples)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        permutation = torch.randperm(num_examples, generator=generator)
        take = min(batch_size - len(indices), num_examples - offset)
        indices.extend(permutation[offset:offset + take].tolist())
        position += take
    return indices


def warmup_then_cosine(warmup_steps, total_steps):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def exact_match_accuracy(vlm, data, state, batch_size, max_new_tokens):
    """Fraction of records whose greedy answer equals the record's target (case/space/period-insensitive).
    Records are split across ranks; returns (accuracy, answers of this rank's share)."""
    def normalise(text):
        return text.strip().strip(".").strip().lower()

    mine = list(range(state.rank, len(data), state.world_size))
    correct, answers = 0, {}
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        outputs = vlm.generate([data.prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                               device=state.device)
        for index, output in zip(chunk, outputs, strict=True):
            answers[index] = output
            correct += normalise(output) == normalise(data.records[index].target)
    total = distributed_utils.sum_across_ranks(correct, state)
    return total / len(data), answers


@torch.no_grad()
def sequence_logps(scorer, method, data, indices, device, autocast_dtype=None, packed=False):
    """Flat log-probs of `method`'s requests for records `indices` (in order), with their positions."""
    batch = method.build_batch(data, indices, packed=packed).to(device)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return scorer(batch.inputs, batch.labels, **batch.segments), batch


def choose_packing(config, method, model, state):
    """Whether batches pack each prompt once with all of its responses (prefrank.packing); prints one line
    saying which path runs and why. pack_prompts: "auto" packs where the method and model allow it, "on"
    raises when the model cannot (check_model's error), "off" never packs."""
    if config.pack_prompts == "off":
        packed, reason = False, "pack_prompts='off'"
    elif not method.packable:
        packed, reason = False, f"{method.name} scores one response under several images: no shared prompt"
    else:
        try:
            check_model(model)
            packed, reason = True, "each prompt and its image once, then its responses"
        except ValueError as error:
            if config.pack_prompts == "on":
                raise
            packed, reason = False, str(error)
    if state.is_main:
        print(f"prefrank.train: {config.method} runs {'packed' if packed else 'unpacked'} ({reason})", flush=True)
    return packed


class Trainer:
    def __init__(self, config, state=None, train_records=None, eval_records=None):
        """`train_records` / `eval_records` (lists of PreferenceRecord) replace the configured data sources:
        that is how programs (the demo, preference-generation rounds) feed records they built in memory.

        Nothing is written to `config.out` until the config, the run folder (non-empty: only with resume or
        overwrite) and every training and evaluation record have been checked."""
        self.config = config.validate()
        self.state = state or distributed_utils.init_distributed()
        check_run_folder(config)
        distributed_utils.barrier(self.state)  # every rank has looked at the folder before rank 0 changes it
        self.method = METHODS[config.method]()
        self.out = Path(config.out)
        self.autocast_dtype = torch.bfloat16 if config.precision == "bf16" else None
        self.stop_requested = False
        self.eval_answers = {}  # record index → answer generated by the last evaluation (this rank's share)
        self.on_step_end = None  # optional callback(step) (tests use it to deliver a SIGTERM mid-run)

        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.vlm = build_policy(config)
        self.vlm.model.to(self.state.device).train()
        records = train_records if train_records is not None else load_records(config, "train")
        if eval_records is None:
            eval_records = load_records(config, "eval")
        validate_records(eval_records, split="eval")
        # -- selfpref hook (issue 7): policy-generated SMPRO groups / MISP-DPO negatives --
        self.self_generator = selfpref.SelfGenerator.from_config(config, self.vlm, self.state)
        if self.self_generator is None:  # self-generated records are checked once they exist
            validate_records(records, self.method)
        if self.state.is_main:
            if config.overwrite:
                clear_run_folder(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
        distributed_utils.barrier(self.state)
        if self.self_generator is not None:
            records = validate_records(self.self_generator.prepare(records), self.method)
        self.train_data = EncodedRecords.build(self.vlm, records, with_negatives=self.method.needs_negatives)
        self.eval_data = EncodedRecords.build(self.vlm, eval_records) if eval_records else None
        per_micro, remainder = divmod(config.batch_size, self.state.world_size * config.grad_accum)
        if remainder or per_micro == 0:
            raise ValueError(f"batch_size={config.batch_size} must be a positive multiple of world_size × "
                             f"grad_accum = {self.state.world_size} × {config.grad_accum}")
        self.micro_batch = per_micro
        self.packed = choose_packing(config, self.method, self.vlm.model, self.state)

        self.reference = None
        self.reference_table = None
        if self.method.needs_reference:
            reference_model = copy.deepcopy(self.vlm.model).eval().requires_grad_(False)
            if config.reference == "model":
                self.reference = SequenceScorer(reference_model)
            else:
                self.reference_table = self._precompute_reference(SequenceScorer(reference_model))

        self.scorer = distributed_utils.wrap(SequenceScorer(self.vlm.model), self.state, config.distributed)
        self.optimizer = torch.optim.AdamW([p for p in self.vlm.model.parameters() if p.requires_grad],
                                           lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_then_cosine(config.warmup_steps, config.steps))
        self.step = 0

    def set_train_records(self, records):
        """Swap the training records mid-run (e.g. a new round of self-generated preference groups, from an
        `on_step_end` callback). Needs reference='model': a precomputed table only covers the old records."""
        if self.reference_table is not None:
            raise ValueError("set_train_records needs reference='model': the precomputed reference model "
                             "was dropped after scoring the first records")
        validate_records(records, self.method)
        self.train_data = EncodedRecords.build(self.vlm, records, with_negatives=self.method.needs_negatives)

    # -- reference -----------------------------------------------------------------------------------------
    def _precompute_reference(self, scorer):
        """Reference log-probs of every training record's requests, computed once (then the reference model
        is dropped): table[i] = the flat log-probs of record i's requests."""
        table = []
        for start in range(0, len(self.train_data), self.config.eval_batch_size):
            indices = list(range(start, min(start + self.config.eval_batch_size, len(self.train_data))))
            logps, batch = sequence_logps(scorer, self.method, self.train_data, indices, self.state.device,
                                          self.autocast_dtype, packed=self.packed)
            for row in batch.positions:
                table.append(logps[row[row >= 0]].cpu())
        return table

    def _reference_logps(self, batch):
        if self.reference is not None:
            with torch.no_grad(), torch.autocast(self.state.device.type, dtype=self.autocast_dtype,
                                                 enabled=self.autocast_dtype is not None):
                return self.reference(batch.inputs, batch.labels, **batch.segments)
        flat = torch.zeros(batch.num_sequences, dtype=torch.float32)
        for row, index in zip(batch.positions.cpu(), batch.indices, strict=True):
            flat[row[row >= 0]] = self.reference_table[index]
        return flat.to(self.state.device)

    # -- state ---------------------------------------------------------------------------------------------
    def model_state_dict(self, on_every_rank=False):
        """The full (unsharded) state dict; under FSDP only rank 0 gets it unless `on_every_rank`."""
        if self.config.distributed == "fsdp" and self.state.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=not on_every_rank)
            return get_model_state_dict(self.vlm.model, options=options)
        return self.vlm.model.state_dict()

    def optimizer_state_dict(self):
        if self.config.distributed == "fsdp" and self.state.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.vlm.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def save(self):
        trainer_state = {"optimizer": self.optimizer_state_dict(), "scheduler": self.scheduler.state_dict()}
        return save_checkpoint(self.out, self.step, self.model_state_dict(), trainer_state, self.state)

    def resume(self):
        path = latest_checkpoint(self.out)
        if path is None:
            return False
        model_state, trainer_state, rng = load_checkpoint(path, self.state.rank)
        if self.config.distributed == "fsdp" and self.state.enabled:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.vlm.model, model_state, options=options)
            set_optimizer_state_dict(self.vlm.model, self.optimizer, trainer_state["optimizer"],
                                     options=options)
        else:
            self.vlm.model.load_state_dict(model_state)
            self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.step = trainer_state["step"]
        if rng is not None:
            set_rng_state(rng)
        return True

    def _drop_metrics_after_step(self):
        """On resume: rows logged after the checkpoint (all of them without one) are logged again."""
        metrics = self.out / "metrics.jsonl"
        if self.state.is_main and metrics.exists():
            kept = [row for row in read_jsonl_rows(metrics) if row["step"] <= self.step]
            write_text_atomically(metrics, "".join(json.dumps(row) + "\n" for row in kept))

    # -- loop ----------------------------------------------------------------------------------------------
    def _log(self, row):
        if self.state.is_main:
            append_line(self.out / "metrics.jsonl", json.dumps(row))

    def _micro_step(self, indices, token_normaliser, sync):
        batch = self.method.build_batch(self.train_data, indices, packed=self.packed).to(self.state.device)
        batch.extras["token_normaliser"] = torch.tensor(token_normaliser, device=self.state.device)
        reference = self._reference_logps(batch) if self.method.needs_reference else None
        skip_sync = not sync and hasattr(self.scorer, "no_sync")
        context = self.scorer.no_sync() if skip_sync else contextlib.nullcontext()
        with context:
            with torch.autocast(self.state.device.type, dtype=self.autocast_dtype,
                                enabled=self.autocast_dtype is not None):
                policy = self.scorer(batch.inputs, batch.labels, **batch.segments)
            output = self.method.loss(policy, reference, batch, self.config)
            (output.loss / self.config.grad_accum).backward()
        return {"loss": output.loss.detach(), **output.metrics}

    def _count_tokens(self, indices):
        return sum(len(self.train_data.responses[i][j]) for i in indices
                   for _, j in self.method.requests(self.train_data.records[i], f"record {i}"))

    def train_step(self):
        config, state = self.config, self.state
        if self.self_generator is not None:  # selfpref hook (issue 7): online regeneration rounds
            self.self_generator.on_step(self)
        global_batch = batch_indices(self.step, len(self.train_data), config.batch_size, config.seed)
        # SFT averages over all completion tokens of the global batch: each micro-batch divides its summed
        # log-probs by tokens / (world × accum), so accumulation + the DDP average give the global mean.
        token_normaliser = self._count_tokens(global_batch) / (state.world_size * config.grad_accum)
        micro_global = config.batch_size // config.grad_accum
        sums = {}
        for micro in range(config.grad_accum):
            chunk = global_batch[micro * micro_global:(micro + 1) * micro_global]
            mine = chunk[state.rank * self.micro_batch:(state.rank + 1) * self.micro_batch]
            values = self._micro_step(mine, token_normaliser, sync=micro == config.grad_accum - 1)
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value.float().cpu() / config.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.vlm.model.parameters(), config.max_grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this update uses (the scheduler then moves on)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = distributed_utils.mean_across_ranks(sums, state)
        metrics = {key: float(value) for key, value in metrics.items()}
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        metrics["grad_norm"] = float(grad_norm)
        metrics["lr"] = lr
        return metrics

    def evaluate(self):
        if self.eval_data is None:
            return None
        fsdp = distributed_utils.fsdp_modules(self.scorer) if self.config.distributed == "fsdp" else []
        for module in fsdp:  # generation runs outside the wrapper's forward: gather the full parameters
            module.unshard()
        accuracy, self.eval_answers = exact_match_accuracy(
            self.vlm, self.eval_data, self.state, self.config.eval_batch_size, self.config.max_new_tokens)
        for module in fsdp:
            module.reshard()
        return accuracy

    def _request_stop(self, signum, frame):
        self.stop_requested = True

    def train(self):
        """Run to `config.steps` (or until SIGTERM: then checkpoint and return). Returns the summary dict."""
        config, state = self.config, self.state
        if config.resume:
            self.resume()
            self._drop_metrics_after_step()
        if state.is_main:
            write_text_atomically(self.out / "config.json", json.dumps(vars(config), indent=2))
        # signal handlers can only be installed from the main thread (a trainer run elsewhere skips it)
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous_handler = signal.signal(signal.SIGTERM, self._request_stop) if in_main_thread else None
        progress = None
        if state.is_main and config.progress:
            from tqdm import tqdm

            progress = tqdm(total=config.steps, initial=self.step, desc=config.method, dynamic_ncols=True)
        started, interrupted = time.perf_counter(), False
        try:
            while self.step < config.steps:
                metrics = self.train_step()
                if self.step % config.log_every == 0 or self.step == config.steps:
                    self._log({"step": self.step, **metrics})
                if config.eval_every and self.step % config.eval_every == 0 and self.step < config.steps:
                    self._log({"step": self.step, "eval/accuracy": self.evaluate()})
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}")
                if self.on_step_end is not None:
                    self.on_step_end(self.step)
                if distributed_utils.any_rank(self.stop_requested, state):
                    self.save()
                    interrupted = True
                    break
                if config.save_every and self.step % config.save_every == 0:
                    self.save()
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous_handler)
            if progress is not None:
                progress.close()
        summary = {"step": self.step, "interrupted": interrupted,
                   "train_seconds": time.perf_counter() - started}
        if interrupted:
            return summary
        digests = self._save_final()  # before the evaluation: a failing evaluation never loses the weights
        accuracy = self.evaluate()
        if accuracy is not None:
            self._log({"step": self.step, "eval/accuracy": accuracy})
        summary.update(self._finish(accuracy, digests))
        return summary

    def _save_final(self):
        """Final checkpoint and HF model folder; returns the parameter digest of every rank."""
        self.save()
        model_state = self.model_state_dict(on_every_rank=True)
        digests = distributed_utils.all_gather_strings(parameter_digest(model_state), self.state)
        if self.state.is_main:
            self.vlm.model.save_pretrained(self.out / "final", state_dict=model_state)
            self.vlm.processor.save_pretrained(self.out / "final")
        return digests

    def _finish(self, accuracy, digests):
        """Summary metrics, plots (skipped with a warning without matplotlib), final.json."""
        summary = {"eval_accuracy": accuracy, "param_digests": digests}
        if self.state.is_main:
            rows = read_jsonl_rows(self.out / "metrics.jsonl")
            last = [r for r in rows if "loss" in r][-max(1, self.config.steps // 10):]
            # per-level metrics (rewards/group_3 …) exist only on steps whose batch has that level (issue 7)
            summary["final_metrics"] = {k: sum(r[k] for r in last if k in r) / sum(k in r for r in last)
                                        for k in last[-1] if k not in ("step", "lr")}
            from prefrank.train.plots import plot_metrics

            try:
                plot_metrics(rows, self.out / "training.png", title=f"{self.config.method} ({self.out.name})")
            except ImportError as error:  # matplotlib is in the `train` extra, but the run must not die here
                warnings.warn(f"training.png not written: {error} (pip install matplotlib, or the "
                              f"'prefrank[train]' extra)", stacklevel=2)
            write_text_atomically(self.out / "final.json", json.dumps(summary, indent=2))
        return summary


def parameter_digest(model_state):
    """A hash of every parameter's bytes (DDP ranks must agree bit for bit)."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(model_state):
        digest.update(key.encode())
        digest.update(model_state[key].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main(argv=None):
    from prefrank.train.config import parse_args

    config = parse_args(argv)
    state = distributed_utils.init_distributed()
    try:
        summary = Trainer(config, state).train()
    finally:
        distributed_utils.shutdown(state)
    if state.is_main:
        shown = {k: v for k, v in summary.items() if k != "param_digests"}
        print(json.dumps(shown, indent=2))
    return summary
