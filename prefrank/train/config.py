"""Trainer configuration: a dataclass, filled from a YAML/JSON file and then from command-line flags.

`TrainConfig.validate` checks every option (type, range, choices, and the loss options by a dry run of the
method's loss) before the trainer reads data or touches the run folder; each error names the option as the
config file spells it and as its command-line flag.
"""

import argparse
import dataclasses
import functools
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path

POSITIVE_INTS = ("steps", "batch_size", "grad_accum", "num_train", "num_eval", "eval_batch_size", "log_every",
                 "max_new_tokens")
NON_NEGATIVE_INTS = ("warmup_steps", "eval_every", "save_every", "regenerate_every", "num_negatives")
POSITIVE_FLOATS = ("lr", "max_grad_norm", "beta")
NON_NEGATIVE_FLOATS = ("weight_decay",)


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
    overwrite: bool = False  # a non-empty `out` is refused unless resume or overwrite (its outputs deleted)
    distributed: str = "ddp"  # ddp | fsdp (only used under torchrun with WORLD_SIZE > 1)
    progress: bool = True
    # -- selfpref (issue 7): self-generated SMPRO groups / MISP-DPO negatives, see prefrank.train.selfpref --
    self_generate: str = "off"  # off | offline | online (online: SMPRO groups regenerated every N steps)
    regenerate_every: int = 0
    selfpref: dict = field(default_factory=dict)  # SelfPrefOptions fields (samples, corruption, pool, SAE …)

    def validate(self):
        """Check every option; ValueError naming it (`steps (--steps)`). Returns self."""
        from prefrank.train.methods import METHODS

        for option in dataclasses.fields(self):
            setattr(self, option.name, _checked_type(option.name, getattr(self, option.name), option.type))
        if self.method not in METHODS:
            raise ValueError(f"{_label('method')} must be one of {sorted(METHODS)}, got {self.method!r}")
        for name in POSITIVE_INTS + NON_NEGATIVE_INTS + POSITIVE_FLOATS + NON_NEGATIVE_FLOATS:
            value, positive = getattr(self, name), name in POSITIVE_INTS + POSITIVE_FLOATS
            if value is not None and (not math.isfinite(value) or value < 0 or (positive and value == 0)):
                raise ValueError(f"{_label(name)} must be {'> 0' if positive else '>= 0'}"
                                 f"{' and finite' if isinstance(value, float) else ''}, got {value}")
        for name, choices in (("precision", ("fp32", "bf16")), ("reference", ("model", "precomputed")),
                              ("distributed", ("ddp", "fsdp")),
                              ("pack_prompts", ("auto", "on", "off"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{_label(name)} must be one of {choices}, got {getattr(self, name)!r}")
        if not self.out:
            raise ValueError(f"{_label('out')} must name a run folder")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
        self._check_loss_options(METHODS[self.method]())
        return self

    def _check_loss_options(self, method):
        """Run the method's loss once on a tiny zero batch with this config's beta and loss_kwargs (the reference
        backend: no compiled kernel needed), so an option the loss rejects fails now, not at step 1."""
        import torch

        from prefrank import backend
        from prefrank.train.data import PreferenceRecord
        from prefrank.train.methods import SequenceBatch

        record = PreferenceRecord(image=None, question="", responses=["a", "b", "c", "d"], groups=[0, 1, 2, 2],
                                  negative_images=[None, None])
        count = len(method.requests(record, "loss-option check"))
        batch = SequenceBatch(indices=[0], inputs={}, labels=torch.zeros(1, 1, dtype=torch.long),
                              positions=torch.arange(count).unsqueeze(0), extras=method.extras([record]))
        logps = torch.zeros(count)
        try:
            with backend.use_backend("reference"):
                method.loss(logps, logps if method.needs_reference else None, batch, self)
        except (TypeError, ValueError) as error:
            raise ValueError(f"the {self.method} loss rejects its options beta={self.beta!r} ({_label('beta')}) / "
                             f"loss_kwargs={self.loss_kwargs!r}: {error}") from error


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


def _type_name(kind):
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
            type(None): "null"}.get(kind, kind.__name__)


def _checked_type(name, value, annotation):
    """`value` if it has the field's annotated type (an int is accepted, and converted, for a float field);
    else a ValueError naming the option (config files are not type-checked by argparse)."""
    kinds = annotation.__args__ if isinstance(annotation, types.UnionType) else (annotation,)
    for kind in kinds:
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
    expected = " or ".join(_type_name(kind) for kind in kinds)
    raise ValueError(f"{_label(name)} must be {expected}, got {value!r} ({type(value).__name__})")


@functools.cache
def _flags():
    return {action.dest: action.option_strings[0] for action in build_parser()._actions if action.option_strings}


def _label(name):
    """How an error names an option: `log_every (--log-every)`, or the config-file name alone."""
    flag = _flags().get(name)
    return f"{name} ({flag})" if flag else name


def parse_args(argv=None):
    """Config = dataclass defaults ← --config file ← explicit flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values = load_config_file(args.config) if args.config else {}
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    return TrainConfig(**values).validate()


def build_parser():
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
                        help="continue from the latest checkpoint in --out (a non-empty --out is refused "
                             "without --resume or --overwrite)")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="replace the outputs of a previous run in --out (config.json, metrics.jsonl, "
                             "checkpoints/, final/ …; other files are kept)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    return parser
