"""`make demo` / `python -m prefrank.demo`: prefrank end to end, offline, on CPU.

1. SFT warm-up of the tiny LLaVA on the synthetic visual-QA task, stopped early so the base model is right
   sometimes but not always (the base row).
2. ONE generation round of that base on every training prompt, shared by every preference row (so every row
   has the same budget of generated answers; `prefrank/train/selfpref_demo.py`): greedy + sampled answers on
   the clean image ≻ greedy + sampled answers on SeVa diffusion noise t = 500 ≻ 800 ≻ 950. No row trains on labels.
3. Each preference method in `DEMO_METHODS` (DPO on SeVa's pair, listwise PL, SMPRO, MISP-DPO) starts from the
   base with the same steps × prompts, lr and β.
4. Held-out exact-match accuracy (greedy generation), reward margins, generated answers per prompt, prompts
   trained on and wall time per method are printed and written to `runs/demo/report.md` with plots.

A new row = a `DemoMethod` whose `build_records(base trainer, train records, settings)` turns the shared round
(`selfpref_demo.shared_round`) into that method's preference records.
"""

import argparse
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from prefrank.train import selfpref_demo
from prefrank.train.config import TrainConfig
from prefrank.train.data import TASKS, export_jsonl, synthetic_dataset
from prefrank.train.loop import Trainer
from prefrank.train.methods import METHODS, EncodedRecords, gather_logps
from prefrank.train.model import SequenceScorer


@dataclass
class DemoSettings:
    out: str = "runs/demo"
    num_train: int = 1024
    num_eval: int = 256
    batch_size: int = 32
    sft_steps: int = 1200
    sft_lr: float = 3e-3
    pref_steps: int = 300
    pref_lr: float = 1e-4
    beta: float = 0.1
    threads: int = 1  # intra-op threads: on a small shared CPU one thread is by far the fastest
    tiny_model: dict = field(default_factory=dict)
    round_options: dict = field(default_factory=lambda: dict(selfpref_demo.ROUND_OPTIONS))  # the shared round


@dataclass
class DemoMethod:
    label: str
    method: str  # a prefrank.train method name
    build_records: object  # (base Trainer, train records, settings) -> preference records
    overrides: dict = field(default_factory=dict)  # TrainConfig overrides for this row


@torch.no_grad()
def response_logps(trainer, records):
    """(records × K) summed log-probs of every response under `trainer`'s current policy (K = max responses,
    missing entries -inf)."""
    method = METHODS["listwise"]()
    data = EncodedRecords.build(trainer.vlm, records)
    scorer = SequenceScorer(trainer.vlm.model).eval()
    rows = []
    for start in range(0, len(records), 64):
        batch = method.build_batch(data, range(start, min(start + 64, len(records))))
        logps = gather_logps(scorer(batch.inputs, batch.labels), batch.positions)
        rows.append(logps.masked_fill(batch.positions < 0, float("-inf")))
    width = max(r.shape[1] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=float("-inf")) for r in rows])


DEMO_METHODS = selfpref_demo.demo_rows(DemoMethod)


def _first(metrics, *keys):
    """The first present key: pairwise losses report rewards/margins, listwise ones rewards/margin."""
    return next((metrics[key] for key in keys if key in metrics), None)


def task_of(record):
    for task, (_, answers) in TASKS.items():
        if record.answer in answers:
            return task
    return "other"


def per_task_accuracy(trainer):
    hits, totals = defaultdict(int), defaultdict(int)
    for index, answer in trainer.eval_answers.items():
        record = trainer.eval_data.records[index]
        totals[task_of(record)] += 1
        hits[task_of(record)] += answer.strip().strip(".").lower() == record.target.lower()
    return {task: hits[task] / totals[task] for task in totals}


def malformed_answers(trainer):
    """(fraction of held-out greedy answers that are none of the task's answers, fraction that START with the
    gold answer): a right word followed by more tokens means the end-of-answer token lost probability."""
    vocabulary = {answer.lower() for _, answers in TASKS.values() for answer in answers}
    answers = {i: a.strip().strip(".").lower() for i, a in trainer.eval_answers.items()}
    records = trainer.eval_data.records
    return (sum(a not in vocabulary for a in answers.values()) / len(answers),
            sum(a.startswith(records[i].target.lower()) for i, a in answers.items()) / len(answers))


def _train(settings, method, out, train_records, eval_records, **overrides):
    config = TrainConfig(method=method, out=str(out), batch_size=settings.batch_size, progress=True,
                         tiny_model=settings.tiny_model, log_every=5, **overrides)
    started = time.perf_counter()
    trainer = Trainer(config, train_records=train_records, eval_records=eval_records)
    summary = trainer.train()
    summary["wall_seconds"] = time.perf_counter() - started
    summary["per_task"] = per_task_accuracy(trainer)
    summary["malformed"], summary["gold_prefix"] = malformed_answers(trainer)
    return trainer, summary


def run_demo(settings, methods=None):
    methods = DEMO_METHODS if methods is None else methods
    torch.set_num_threads(settings.threads)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train_records = synthetic_dataset(settings.num_train, seed=1)
    eval_records = synthetic_dataset(settings.num_eval, seed=2)
    export_jsonl(eval_records, out / "data" / "heldout.jsonl")

    print(f"[demo] SFT warm-up: {settings.sft_steps} steps × {settings.batch_size} prompts", flush=True)
    base, base_summary = _train(settings, "sft", out / "sft", train_records, eval_records,
                                steps=settings.sft_steps, lr=settings.sft_lr, warmup_steps=10)
    rows = [{"label": "base (SFT warm-up)", "method": "sft", "accuracy": base_summary["eval_accuracy"],
             "per_task": base_summary["per_task"], "malformed": base_summary["malformed"],
             "gold_prefix": base_summary["gold_prefix"], "margin": None, "reward_accuracy": None,
             "heldout_margin": None, "heldout_reward_accuracy": None, "generated_per_prompt": None,
             "train_prompts": len(train_records), "seconds": base_summary["wall_seconds"], "run": "sft"}]
    # one held-out yardstick for every row: β·log-ratio vs the base of the labelled answers (evaluation only)
    base_logps = response_logps(base, eval_records)
    print(f"[demo] shared generation round of the base on {len(train_records)} prompts", flush=True)
    round_ = selfpref_demo.shared_round(base, train_records, settings)
    print(f"[demo] {len(round_.records)}/{len(train_records)} prompts have a negative group; "
          f"{round_.generated_answers / len(train_records):.2f} answers generated per prompt "
          f"({round_.seconds:.0f} s)", flush=True)
    for demo_method in methods:
        print(f"[demo] {demo_method.label}: {settings.pref_steps} steps from the SFT base", flush=True)
        method_started = time.perf_counter()
        records = demo_method.build_records(base, train_records, settings)
        export_jsonl(records, out / "data" / f"{demo_method.method}.jsonl")
        overrides = dict(steps=settings.pref_steps, lr=settings.pref_lr, beta=settings.beta, warmup_steps=5,
                         init=str(out / "sft"), **demo_method.overrides)
        trainer, summary = _train(settings, demo_method.method, out / demo_method.method, records,
                                  eval_records, **overrides)
        final = summary["final_metrics"]
        seconds = time.perf_counter() - method_started
        heldout_margin, heldout_accuracy = selfpref_demo.heldout_reward_margin(
            response_logps, trainer, base_logps, eval_records, settings.beta)
        generated = selfpref_demo.generated_answers(round_, trainer)
        rows.append({"label": demo_method.label, "method": demo_method.method,
                     "accuracy": summary["eval_accuracy"], "per_task": summary["per_task"],
                     "malformed": summary["malformed"], "gold_prefix": summary["gold_prefix"],
                     "margin": _first(final, "rewards/margins", "rewards/margin"),
                     "reward_accuracy": _first(final, "rewards/accuracies", "rewards/ranking_accuracy"),
                     "chosen_reward": final.get("rewards/chosen"),
                     "rejected_reward": final.get("rewards/rejected"),
                     "heldout_margin": heldout_margin, "heldout_reward_accuracy": heldout_accuracy,
                     "generated_per_prompt": generated / len(train_records),
                     "train_prompts": len(trainer.train_data), "seconds": seconds, "run": demo_method.method})
    total = time.perf_counter() - started
    table = format_table(rows)
    print("\n" + table + f"\n\ntotal wall time {total:.0f} s ({settings.threads} thread(s))", flush=True)
    plot_demo(rows, out)
    write_report(rows, table, observations(rows), total, settings, out)
    with open(out / "report.md", "a") as report:
        report.write("\n" + selfpref_demo.report_section(out, round_) + "\n")
    return rows


def observations(rows):
    """Plain statements read off the numbers (no claim the numbers do not support)."""
    base = rows[0]["accuracy"]
    lines = []
    for row in rows[1:]:
        change = 100 * (row["accuracy"] - base)
        line = f"- {row['label']}: held-out accuracy {change:+.1f} points vs the base"
        if row["malformed"] > rows[0]["malformed"]:
            line += (f"; {100 * row['malformed']:.1f}% of its held-out answers are none of the task's answers "
                     f"(base {100 * rows[0]['malformed']:.1f}%), and {100 * row['gold_prefix']:.1f}% start with "
                     f"the gold answer (base {100 * rows[0]['gold_prefix']:.1f}%)")
        if row.get("chosen_reward") is not None and row["chosen_reward"] < 0:
            line += (f"; the chosen answers' implicit reward ended NEGATIVE ({row['chosen_reward']:.3f}, "
                     f"rejected {row['rejected_reward']:.3f}): the margin grew by pushing both likelihoods "
                     "down (likelihood displacement), which frees probability mass for answers that are in "
                     "neither pair")
        lines.append(line + ".")
    return "\n".join(lines)


def format_table(rows):
    tasks = list(TASKS)
    header = ["method", "held-out exact match", *tasks, "malformed answers", "reward margin", "reward acc.",
              "held-out margin", "held-out reward acc.", "generated answers / prompt", "prompts trained on",
              "wall time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"], f"{row['accuracy']:.3f}",
                 *(f"{row['per_task'].get(t, float('nan')):.2f}" for t in tasks), f"{row['malformed']:.2f}",
                 "–" if row["margin"] is None else f"{row['margin']:.3f}",
                 "–" if row["reward_accuracy"] is None else f"{row['reward_accuracy']:.2f}",
                 "–" if row["heldout_margin"] is None else f"{row['heldout_margin']:.3f}",
                 "–" if row["heldout_reward_accuracy"] is None else f"{row['heldout_reward_accuracy']:.2f}",
                 "–" if row["generated_per_prompt"] is None else f"{row['generated_per_prompt']:.2f}",
                 str(row["train_prompts"]), f"{row['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_demo(rows, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    axes[0].bar([r["label"] for r in rows], [r["accuracy"] for r in rows], color="tab:blue")
    axes[0].set_title("held-out exact-match accuracy")
    axes[0].tick_params(axis="x", labelrotation=15, labelsize=7)
    for row in rows[1:]:
        metrics = [json.loads(line) for line in (out / row["run"] / "metrics.jsonl").read_text().splitlines()]
        steps = [m["step"] for m in metrics if "loss" in m]
        axes[1].plot(steps, [m["loss"] for m in metrics if "loss" in m], label=row["label"])
        margins = [_first(m, "rewards/margins", "rewards/margin") for m in metrics if "loss" in m]
        axes[2].plot(steps, [float("nan") if v is None else v for v in margins],
                     label=row["label"])
    for axis, title in ((axes[1], "preference loss"), (axes[2], "reward margin (chosen − rejected)")):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "demo.png", dpi=110)
    plt.close(figure)


def write_report(rows, table, notes, total, settings, out):
    base = rows[0]["accuracy"]
    standard_error = (max(base * (1 - base), 0.0) / settings.num_eval) ** 0.5
    runs = "\n".join(f"- `{row['run']}/`: metrics.jsonl, training.png, final/ (HF model folder)"
                     for row in rows)
    text = f"""# prefrank demo: tiny LLaVA on synthetic visual QA

Everything offline on CPU: a randomly initialised LLaVA (CLIP vision tower + Llama text model, built from
configs; byte-level BPE tokenizer trained in code on the task's text, one token per answer) and
procedurally generated 32×32 images (shapes, colours, counts, positions) with templated questions.
{settings.num_train} training prompts, {settings.num_eval} held-out prompts (different seed). Accuracy =
exact match of the greedy answer on the held-out prompts; its binomial standard error at this size is
about {100 * standard_error:.1f} points. Each row is ONE training run: runs are bit-reproducible on one
machine, but a different float summation order (another log-prob kernel, thread count or CPU) changes the
trajectory, and in our runs that alone moved the DPO row by several points (see README.md, "Reference trainer").

- **base**: SFT warm-up on the labelled answers, {settings.sft_steps} steps × {settings.batch_size} prompts,
  lr {settings.sft_lr}.
- **every preference row**: from the base, {settings.pref_steps} steps × {settings.batch_size} prompts,
  lr {settings.pref_lr}, β = {settings.beta}, on label-free data from ONE generation round of the base shared
  by all rows (see the section below): "generated answers / prompt" counts the answers the base generated for
  that row's data (the shared round, plus MISP-DPO's gallery checks), over the {settings.num_train} training
  prompts; "prompts trained on" = the prompts whose round has a contrast (a negative group). Reward margin /
  accuracy: each loss's own metric, mean over the last 10% of the training steps. Held-out margin / reward
  acc.: implicit reward β·(log π − log π_base) of every labelled answer of the held-out prompts on the clean
  image; margin = r(gold) − mean r(wrong), reward acc. = fraction of prompts with r(gold) above every r(wrong):
  one yardstick for every row. "malformed answers": fraction of the held-out greedy answers that are none of
  the task's answers (typically the right word followed by more tokens). A row's wall time includes building
  its data but not the shared round.

{table}

Total wall time {total:.0f} s with {settings.threads} intra-op thread(s).

Observations (generated from the numbers above):
{notes}

![demo](demo.png)

Runs: {out}/
{runs}
- `data/`: the held-out set and each method's preference data as JSONL + PNG (re-runnable with
  `python -m prefrank.train --data …`); `data/shared_round.jsonl`: the shared round with every raw
  generation in `meta` (usable as `selfpref.cache`).
"""
    (out / "report.md").write_text(text)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m prefrank.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DemoSettings.out)
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    args = parser.parse_args(argv)
    settings = DemoSettings(out=args.out)
    if args.quick:
        settings = replace(settings, num_train=32, num_eval=16, batch_size=8, sft_steps=3, pref_steps=2,
                           round_options=dict(selfpref_demo.QUICK_ROUND_OPTIONS))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_demo(settings)


if __name__ == "__main__":
    main()
