"""Trainer configuration: a dataclass, filled from a YAML/JSON file and then from command-line flags."""

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainConfig:
    method: str = "sft"  # sft | dpo | listwise | smpro | misp_dpo
    out: str = "runs/train"
    # model: None = the tiny offline LLaVA; else a local transformers image-text-to-text folder
    model: str | None = None
    init: str | None = None  # policy (and reference) weights: a model folder or a trainer run folder
    model_seed: int = 0
    tiny_model: dict = field(default_factory=dict)  # build_tiny_vlm keyword arguments (sizes)
    # data: None = the embedded synthetic task; else a JSONL file (images resolved under data_root)
    data: str | None = None
    data_root: str | None = None
    eval_data: str | None = None
    num_train: int = 512
    num_eval: int = 128
    data_seed: int = 1
    eval_seed: int = 2
    num_negatives: int = 3  # synthetic MISP-DPO negatives per record
    # optimisation
    steps: int = 100
    batch_size: int = 16  # prompts per optimizer step, over all ranks and accumulation micro-steps
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    beta: float | None = None  # None = the loss's own default
    loss_kwargs: dict = field(default_factory=dict)
    precision: str = "fp32"  # fp32 | bf16 (autocast; master weights and log-probs stay fp32)
    reference: str = "model"  # model (frozen copy) | precomputed (reference log-probs computed once)
    pack_prompts: str = "auto"  # auto | on | off: each prompt once + its K responses (prefrank.packing)
    seed: int = 0
    # bookkeeping
    log_every: int = 1
    eval_every: int = 0  # 0 = only at the end
    eval_batch_size: int = 64
    max_new_tokens: int = 8
    save_every: int = 0  # 0 = only at the end (and on SIGTERM)
    resume: bool = False
    distributed: str = "ddp"  # ddp | fsdp (only used under torchrun with WORLD_SIZE > 1)
    progress: bool = True
    # -- selfpref (issue 7): self-generated SMPRO groups / MISP-DPO negatives, see prefrank.train.selfpref --
    self_generate: str = "off"  # off | offline | online (online: SMPRO groups regenerated every N steps)
    regenerate_every: int = 0
    selfpref: dict = field(default_factory=dict)  # SelfPrefOptions fields (samples, corruption, pool, SAE …)

    def validate(self):
        from prefrank.train.methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        for name in ("steps", "batch_size", "grad_accum", "num_train", "num_eval", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.reference not in ("model", "precomputed"):
            raise ValueError(f"reference must be 'model' or 'precomputed', got {self.reference!r}")
        if self.pack_prompts not in ("auto", "on", "off"):
            raise ValueError(f"pack_prompts must be 'auto', 'on' or 'off', got {self.pack_prompts!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise ValueError(f"distributed must be 'ddp' or 'fsdp', got {self.distributed!r}")
        return self


def load_config_file(path):
    """A YAML (.yaml/.yml) or JSON file holding a mapping of TrainConfig fields."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"config {path}: expected a mapping of options, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config {path}: unknown option(s) {unknown}")
    return values


def parse_args(argv=None):
    """Config = dataclass defaults ← --config file ← explicit flags."""
    parser = argparse.ArgumentParser(
        prog="python -m prefrank.train",
        description="Train a vision-language policy with SFT or a preference loss.")
    parser.add_argument("--config", help="YAML or JSON file of options (flags below override it)")
    flags = {
        "method": dict(choices=["sft", "dpo", "listwise", "smpro", "misp_dpo"]),
        "out": dict(help="run folder: metrics.jsonl, plots, checkpoints, final model"),
        "model": dict(help="local HF image-text-to-text model folder (default: tiny offline LLaVA)"),
        "init": dict(help="initial policy/reference weights: a model folder or a run folder"),
        "data": dict(help="JSONL preference data (default: the synthetic task)"),
        "data_root": dict(help="folder image paths are relative to (default: the JSONL's folder)"),
        "eval_data": dict(help="held-out JSONL for exact-match accuracy"),
        "steps": dict(type=int), "batch_size": dict(type=int), "grad_accum": dict(type=int),
        "lr": dict(type=float), "beta": dict(type=float), "warmup_steps": dict(type=int),
        "precision": dict(choices=["fp32", "bf16"]), "reference": dict(choices=["model", "precomputed"]),
        "seed": dict(type=int), "num_train": dict(type=int), "num_eval": dict(type=int),
        "eval_every": dict(type=int), "save_every": dict(type=int), "log_every": dict(type=int),
        "distributed": dict(choices=["ddp", "fsdp"]),
        "pack_prompts": dict(choices=["auto", "on", "off"],
                             help="one row per prompt holding all its responses (default auto: where the method "
                                  "and model allow it; on: fail if the model cannot)"),
        # -- selfpref (issue 7) --
        "self_generate": dict(choices=["off", "offline", "online"],
                              help="smpro/misp_dpo: build the preference data with the policy itself"),
        "regenerate_every": dict(type=int, help="online SMPRO: new groups every N steps"),
    }
    for name, options in flags.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **options)
    parser.add_argument("--resume", action="store_true", default=None,
                        help="continue from the latest checkpoint in --out")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    args = parser.parse_args(argv)
    values = load_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    return TrainConfig(**values).validate()
