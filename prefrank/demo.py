"""`make demo` / `python -m prefrank.demo`: prefrank end to end, offline, on CPU.

Every seed in `DemoSettings.seeds` is a whole pipeline (model initialisation, SFT batch order, sampling of
the generation round, preference batch order), so the base row has a spread too:

1. SFT warm-up of the tiny LLaVA on the synthetic visual-QA task (the base row), one per seed, and each
   base's image ablation: its held-out accuracy with every image replaced by uniform noise (chance if it
   reads the image).
2. ONE generation round of each seed's base on every training prompt, shared by every label-free row of
   that seed (`prefrank/train/selfpref_demo.py`): greedy + sampled answers on the clean image ≻ answers on
   SeVa diffusion noise t = 500 ≻ 800 ≻ 950. No label-free row trains on labels.
3. What the library buys (first section of the report): the same SMPRO run three ways from the first seed's
   base, same seed and data — prefrank kernels + shared-prompt packing, prefrank kernels unpacked, and the pure-PyTorch
   path (backend "reference": materialised logits + log_softmax, dense sorting network) — loss curves, their
   largest difference, CPU time per step and a step's peak memory (each path in a fresh process, alone on
   the machine after every other run).
4. Method effects over seeds: every row in `DEMO_METHODS` (DPO, listwise PL, S-DPO, SMPRO, MISP-DPO and the
   labelled upper bound) starts from its seed's base with the same steps × prompts, lr and β; mean ± sd of
   held-out exact match (overall and per question kind) and the paired differences (same seed) to the base
   and to DPO.

Runs (the SFTs included) go to `DemoSettings.workers` worker processes (one intra-op thread each) forked
from a fork server (which imported this module once and never ran autograd: a child forked from a process whose
autograd device threads have started fails in its backward); every run is a fresh process, so its peak
memory is its own. When a seed's SFT finishes, the main process
builds that seed's generation round and preference data and queues its runs, while the workers go on;
the library-value runs go last, one at a time.
On a terminal the runs show a progress bar; in a log (stdout not a terminal) each finished run prints one
line.

A new row = a `DemoMethod` whose `build_records(base trainer, train records, settings)` turns the shared round
(`selfpref_demo.shared_round`) into that method's preference records.
"""

import argparse
import ctypes
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import statistics
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from prefrank import backend
from prefrank.train import selfpref_demo
from prefrank.train.config import TrainConfig
from prefrank.train.data import TASKS, export_jsonl, synthetic_dataset
from prefrank.train.loop import Trainer, exact_match_accuracy
from prefrank.train.methods import EncodedRecords

VALUE_PATHS = (  # (label, pack_prompts, backend) of the library-value section
    ("prefrank kernels + packing", "on", "auto"),
    ("prefrank kernels, unpacked", "off", "auto"),
    ("pure PyTorch (reference backend)", "off", "reference"),
)


@dataclass
class DemoSettings:
    out: str = "runs/demo"
    num_train: int = 1024
    num_eval: int = 256
    batch_size: int = 32
    sft_steps: int = 1200
    # lr of the SFT: the base's answer-prior plateau (loss ≈ 0.65) ends at a seed-dependent step; at 3e-3 three
    # seeds gave 0.578 / 0.477 / 0.293 held-out (0.293: still on the plateau at step 1200), at 6e-3 0.297 /
    # 0.230, at 1.5e-3 seeds 0–3 gave 0.762 / 0.816 / 0.680 / 0.785 (noise images 0.26–0.30, chance 0.274)
    sft_lr: float = 1.5e-3
    pref_steps: int = 150
    pref_lr: float = 1e-4
    beta: float = 0.1
    seeds: tuple = (0, 1, 2)  # one whole pipeline per seed: model init, SFT, generation round, preference runs
    value_steps: int = 20  # steps of each library-value run
    workers: int = 2  # worker processes for the independent runs (one per core)
    threads: int = 1  # intra-op threads per process: on a small shared CPU one thread is by far the fastest
    # the cheapest tiny LLaVA we measured whose SFT base reads the image (1200 × 32 SFT at lr 3e-3, seed 0, 256
    # held-out prompts): 16×16 input, 4-pixel patches (16 image tokens, as many as the 32/8 default), vision
    # width 64 → 0.578 held-out, 0.234 with noise images (chance 0.274). The build_tiny_vlm default (32/8, width 32)
    # reaches 0.418 but 0.266 with noise images: it reads colour only; 32/4 with width 64 reaches 0.758 at
    # 4.5× the cost (64 image tokens).
    tiny_model: dict = field(default_factory=lambda: {"image_size": 16, "patch_size": 4, "vision_hidden": 64})
    base: str | None = None  # a previous demo's SFT folder (runs/demo/sft, a seed<k>/ per seed): no warm-up
    round_options: dict = field(default_factory=lambda: dict(selfpref_demo.ROUND_OPTIONS))  # the shared round


QUICK = dict(num_train=32, num_eval=16, batch_size=8, sft_steps=3, pref_steps=2, value_steps=3, seeds=(0, 1),
             round_options=dict(selfpref_demo.QUICK_ROUND_OPTIONS))


@dataclass
class DemoMethod:
    label: str
    name: str  # run folder and row key
    method: str  # a prefrank.train method name
    build_records: object  # (base Trainer, train records, settings) -> preference records
    overrides: dict = field(default_factory=dict)  # TrainConfig overrides for this row
    upper_bound: bool = False  # trains on labels: a reference point, not a label-free method


DEMO_METHODS = selfpref_demo.demo_rows(DemoMethod)
PAIRED_TO = "dpo"  # every row's paired difference is taken to this row, seed by seed


def task_of(record):
    for task, (_, answers) in TASKS.items():
        if record.answer in answers:
            return task
    return "other"


def per_task_accuracy(answers, records):
    hits, totals = defaultdict(int), defaultdict(int)
    for index, answer in answers.items():
        record = records[index]
        totals[task_of(record)] += 1
        hits[task_of(record)] += answer.strip().strip(".").lower() == record.target.lower()
    return {task: hits[task] / totals[task] for task in totals}


def malformed_fraction(answers):
    """Fraction of held-out greedy answers that are none of the task's answers."""
    vocabulary = {answer.lower() for _, answers in TASKS.values() for answer in answers}
    return sum(a.strip().strip(".").lower() not in vocabulary for a in answers.values()) / max(1, len(answers))


def noise_image_ablation(trainer, eval_records, seed=0):
    """Held-out accuracy (overall, per task) of ``trainer``'s policy with every image replaced by uniform noise,
    and chance (the mean of 1 / number of answers of each question's kind)."""
    from PIL import Image

    rng = random.Random(seed)
    noisy = [replace(r, image=Image.frombytes("RGB", r.image.size, rng.randbytes(3 * r.image.width * r.image.height)))
             for r in eval_records]
    data = EncodedRecords.build(trainer.vlm, noisy)
    accuracy, answers = exact_match_accuracy(trainer.vlm, data, trainer.state, trainer.config.eval_batch_size,
                                             trainer.config.max_new_tokens)
    chance = sum(1 / len(r.responses) for r in eval_records) / len(eval_records)
    return accuracy, per_task_accuracy(answers, noisy), chance


# -------------------------------------------------------------------------------------------- worker runs


@dataclass
class RunTask:
    key: tuple  # ("value", path label) or (row name, seed)
    label: str
    config: TrainConfig
    train_records: list
    eval_records: list
    backend: str = "auto"
    measure: bool = False  # per-step CPU time and peak memory (library-value runs)
    threads: int = 1
    ablate_images: bool = False  # also the held-out accuracy with noise images (the bases)
    evaluate_only: bool = False  # evaluate config.init, train nothing (--base)


def _status_kib(field_name):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _run(task):
    """One training run in this fresh worker process; returns a small picklable summary."""
    torch.set_num_threads(task.threads)
    steps = []
    memory = {}
    if task.measure:
        # glibc returns every large freed block at once, so the resident set tracks what is live (as in
        # benchmarks/run.py)
        ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    with backend.use_backend(task.backend):
        trainer = Trainer(task.config, train_records=task.train_records, eval_records=task.eval_records)

        def on_step_end(step):
            steps.append(time.process_time())
            if not task.measure:
                return
            if len(steps) == 1:
                # the high-water mark is reset after the first step: the optimizer state and the code pages
                # a step maps on first use (file-backed, counted in the resident set) are in by then and the
                # same for every path; the heap pages step 1 freed go back to the system first (malloc_trim),
                # so the peak of the later steps minus this resident set is a step's own memory
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                Path("/proc/self/clear_refs").write_text("5")
                memory["base_kib"] = _status_kib("VmRSS")
            else:
                memory["peak_kib"] = _status_kib("VmHWM")

        trainer.on_step_end = on_step_end
        started_cpu = time.process_time()
        if task.evaluate_only:
            summary, metrics = {"eval_accuracy": trainer.evaluate(), "final_metrics": {}}, []
        else:
            summary = trainer.train()
            metrics = [json.loads(line) for line in (Path(task.config.out) / "metrics.jsonl").read_text().splitlines()]
    step_cpu = [b - a for a, b in zip([started_cpu, *steps], steps)]
    result = {"accuracy": summary["eval_accuracy"], "losses": [m["loss"] for m in metrics if "loss" in m],
              "final_metrics": summary["final_metrics"], "step_cpu": step_cpu, "train_prompts": len(trainer.train_data),
              "extra_generated": 0 if trainer.self_generator is None else trainer.self_generator.generated_answers}
    if task.eval_records:
        result["per_task"] = per_task_accuracy(trainer.eval_answers, task.eval_records)
        result["malformed"] = malformed_fraction(trainer.eval_answers)
    if task.ablate_images:
        result["noise_accuracy"], result["noise_per_task"], result["chance"] = noise_image_ablation(
            trainer, task.eval_records)
    if task.measure:
        result["peak_mib"] = (memory["peak_kib"] - memory["base_kib"]) / 1024
    return result


def _worker(connection, task):
    log = open(Path(task.config.out).parent / f"{Path(task.config.out).name}.log", "w")
    sys.stdout = sys.stderr = log
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    try:
        result = _run(task)
        result.update(wall_seconds=time.perf_counter() - started_wall, cpu_seconds=time.process_time() - started_cpu)
        connection.send(("ok", result))
    except BaseException:  # reported to the parent, which stops the demo with the traceback
        connection.send(("error", traceback.format_exc()))
    finally:
        log.flush()
        connection.close()


# what a run imports lazily (about 3 s per process: the tiny LLaVA's processor and model code, the plots), so
# the fork server imports it once; a module missing here only costs time (the fork server skips ImportErrors)
WORKER_PRELOAD = [__name__, "transformers", "transformers.image_processing_backends", "transformers.masking_utils",
                  "matplotlib.pyplot"]


def run_parallel(tasks, workers, on_done):
    """Run every task in its own worker process, at most ``workers`` at a time, in order; ``on_done(task,
    result)`` as each finishes may return more tasks, queued behind the pending ones. Returns {task.key:
    result}. A failed run stops the others and raises with its traceback."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    # not a plain fork: once the caller has started autograd's device threads (a compiled backward does, e.g.
    # in another test of the same session) a forked child's backward fails; the fork server starts clean and
    # imports the demo (and torch) once
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    pending, running, results = list(tasks), {}, {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                task = pending.pop(0)
                Path(task.config.out).parent.mkdir(parents=True, exist_ok=True)
                receiver, sender = context.Pipe(duplex=False)
                process = context.Process(target=_worker, args=(sender, task), daemon=True)
                process.start()
                sender.close()
                running[receiver] = (process, task)
            for receiver in multiprocessing.connection.wait(list(running)):
                process, task = running.pop(receiver)
                try:
                    status, payload = receiver.recv()
                except EOFError:
                    status, payload = "error", f"the worker process exited with code {process.exitcode}"
                process.join()
                if status != "ok":
                    raise RuntimeError(f"demo run {task.label!r} failed (log: {task.config.out}.log):\n{payload}")
                results[task.key] = payload
                pending.extend(on_done(task, payload) or ())
    finally:
        for process, _ in running.values():
            process.terminate()
            process.join()
    return results


# ----------------------------------------------------------------------------------------------- the demo


def _config(settings, method, out, **overrides):
    defaults = dict(batch_size=settings.batch_size, progress=False, tiny_model=settings.tiny_model, log_every=1,
                    overwrite=True)
    return TrainConfig(method=method, out=str(out), **{**defaults, **overrides})


def run_demo(settings, methods=None):
    methods = DEMO_METHODS if methods is None else methods
    seeds = tuple(settings.seeds)
    if settings.base is not None:  # checked before anything is built or written
        missing = [seed for seed in seeds if not (Path(settings.base) / f"seed{seed}").is_dir()]
        if missing:
            raise ValueError(f"base={settings.base!r} must be a previous demo's SFT folder with one run per seed "
                             f"(seed<k>/ for k in {list(seeds)}); missing: {[f'seed{k}' for k in missing]}")
    interactive = sys.stdout.isatty()
    if not interactive:  # a log file gets one line per step of the demo, not carriage-return progress bars
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    torch.set_num_threads(settings.threads)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    train_records = synthetic_dataset(settings.num_train, seed=1)
    eval_records = synthetic_dataset(settings.num_eval, seed=2)
    export_jsonl(eval_records, out / "data" / "heldout.jsonl")

    def base_folder(seed):
        return Path(settings.base) / f"seed{seed}" if settings.base is not None else out / "sft" / f"seed{seed}"

    sft_tasks = []
    for seed in seeds:
        config = _config(settings, "sft", out / "sft" / f"seed{seed}", steps=settings.sft_steps, lr=settings.sft_lr,
                         warmup_steps=10, log_every=10, seed=seed, model_seed=seed)
        if settings.base is not None:  # a previous warm-up: the model it saved, evaluated again (nothing trained)
            config = replace(config, init=str(base_folder(seed)), out=str(out / "base" / f"seed{seed}"))
        sft_tasks.append(RunTask(("sft", seed), f"SFT base, seed {seed}", config, train_records, eval_records,
                                 threads=settings.threads, ablate_images=True,
                                 evaluate_only=settings.base is not None))
    what = "evaluating the bases of" if settings.base is not None else "SFT warm-up"
    print(f"[demo] {what}: {settings.sft_steps} steps × {settings.batch_size} prompts, seeds {list(seeds)}; then "
          f"per seed a shared generation round and {len(methods)} rows ({settings.pref_steps} steps each), plus "
          f"{len(VALUE_PATHS)} library-value runs ({settings.value_steps} steps) from seed {seeds[0]}'s base, on "
          f"{settings.workers} worker process(es)", flush=True)

    rounds, main_cpu, value_tasks = {}, {"round": 0.0}, []
    shared = dict(lr=settings.pref_lr, beta=settings.beta, warmup_steps=5)

    def seed_tasks(seed, sft_result):
        """A finished base → its shared round and row data (here, in the main process) → its runs."""
        started = time.process_time()
        seed_settings = replace(settings, round_options={**settings.round_options, "seed": seed})
        init = str(base_folder(seed))
        base = Trainer(_config(settings, "sft", out / "base" / f"seed{seed}", init=init),
                       train_records=train_records, eval_records=[])
        round_ = rounds[seed] = selfpref_demo.shared_round(base, train_records, seed_settings)
        print(f"[demo] seed {seed}: base held-out exact match {sft_result['accuracy']:.3f} (noise images "
              f"{sft_result['noise_accuracy']:.3f}); shared round: {len(round_.records)}/{len(train_records)} "
              f"prompts have a negative group, {round_.generated_answers / len(train_records):.2f} answers "
              f"generated per prompt ({round_.seconds:.0f} s)", flush=True)
        if seed == seeds[0]:
            smpro_records = selfpref_demo.ranked_lists(base, train_records, seed_settings)
            value_tasks.extend(
                RunTask(("value", label), f"value: SMPRO, {label}",
                        _config(settings, "smpro", out / "value" / f"path{i}", steps=settings.value_steps,
                                pack_prompts=pack, seed=seed, init=init, **shared),
                        smpro_records, [], backend=impl, measure=True, threads=settings.threads)
                for i, (label, pack, impl) in enumerate(VALUE_PATHS))
        row_tasks = []
        for demo_method in methods:
            records = demo_method.build_records(base, train_records, seed_settings)
            export_jsonl(records, out / "data" / f"{demo_method.name}_seed{seed}.jsonl")
            config = _config(settings, demo_method.method, out / "runs" / demo_method.name / f"seed{seed}",
                             steps=settings.pref_steps, seed=seed, init=init, **{**shared, **demo_method.overrides})
            row_tasks.append(RunTask((demo_method.name, seed), f"{demo_method.label}, seed {seed}", config,
                                     records, eval_records, threads=settings.threads))
        # the slowest runs (MISP-DPO: unpacked, plus its gallery selection) first, so the workers finish together
        main_cpu["round"] += time.process_time() - started
        return sorted(row_tasks, key=lambda task: task.config.method != "misp_dpo")

    bar = None
    if interactive:
        from tqdm import tqdm

        bar = tqdm(total=len(seeds) * (1 + len(methods)) + len(VALUE_PATHS), desc="runs", dynamic_ncols=True)

    def on_done(task, result):
        accuracy = "" if result["accuracy"] is None else f"held-out exact match {result['accuracy']:.3f}, "
        line = f"[demo] done: {task.label}: {accuracy}{result['wall_seconds']:.0f} s"
        if bar is None:
            print(line, flush=True)
        else:
            bar.write(line)
            bar.update(1)
        return seed_tasks(task.key[1], result) if task.key[0] == "sft" else []

    results = run_parallel(sft_tasks, settings.workers, on_done)
    # the library-value runs last, one at a time on an otherwise idle machine: their CPU time per step is
    # the measurement, and a run beside it (the other worker) slows it through the shared cores and caches
    results.update(run_parallel(value_tasks, 1, on_done))
    if bar is not None:
        bar.close()
    value = [{"label": label, "pack_prompts": pack, "backend": impl, **results[("value", label)]}
             for label, pack, impl in VALUE_PATHS]
    base_row = aggregate_bases(seeds, results)
    rows = aggregate_rows(methods, seeds, results, base_row)
    timing = {"wall": time.perf_counter() - started_wall, "main_cpu": time.process_time() - started_cpu,
              "worker_cpu": sum(r["cpu_seconds"] for r in results.values()), "workers": settings.workers,
              "sft_cpu": sum(results[("sft", seed)]["cpu_seconds"] for seed in seeds), "round_cpu": main_cpu["round"],
              "run_cpu": {f"{key[0]}/{key[1]}": result["cpu_seconds"] for key, result in results.items()}}
    misp_path = out / "runs" / "misp_dpo" / f"seed{seeds[0]}" / "selfpref" / "misp_negatives.json"
    report = write_report(settings, out, base_row, value, rows, rounds, timing, misp_path)
    print("\n" + report.split("\n## The shared generation round")[0], flush=True)
    return {"base": base_row, "value": value, "rows": rows, "timing": timing}


def _mean_sd(values):
    """(mean, sample standard deviation); NaN in, NaN out (a question kind a run never saw)."""
    values = list(values)
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))


def aggregate_bases(seeds, results):
    """The base row from the per-seed SFT runs (keys ("sft", seed)): accuracies per seed, mean ± sd overall, per
    question kind, with noise images, malformed answers and wall time; chance (the same for every seed)."""
    runs = [results[("sft", seed)] for seed in seeds]
    accuracies = [run["accuracy"] for run in runs]
    return {"accuracies": accuracies, "accuracy": _mean_sd(accuracies),
            "per_task": {task: _mean_sd(run["per_task"].get(task, float("nan")) for run in runs) for task in TASKS},
            "noise_accuracies": [run["noise_accuracy"] for run in runs],
            "noise_accuracy": _mean_sd(run["noise_accuracy"] for run in runs),
            "noise_per_task": {task: _mean_sd(run["noise_per_task"].get(task, float("nan")) for run in runs)
                               for task in TASKS},
            "chance": runs[0]["chance"], "malformed": _mean_sd(run["malformed"] for run in runs),
            "seconds": _mean_sd(run["wall_seconds"] for run in runs)}


def aggregate_rows(methods, seeds, results, base_row=None):
    """Per row: accuracies per seed, mean ± sd overall and per question kind, and the paired differences (same
    seed) to the base (``base_row["accuracies"]``, in ``seeds`` order) and to the `PAIRED_TO` row."""
    rows = []
    reference = {seed: results[(PAIRED_TO, seed)]["accuracy"] for seed in seeds} if any(
        m.name == PAIRED_TO for m in methods) else None
    for demo_method in methods:
        runs = [results[(demo_method.name, seed)] for seed in seeds]
        accuracies = [run["accuracy"] for run in runs]
        row = {"label": demo_method.label, "name": demo_method.name, "method": demo_method.method,
               "upper_bound": demo_method.upper_bound, "accuracies": accuracies, "accuracy": _mean_sd(accuracies),
               "per_task": {task: _mean_sd(run["per_task"].get(task, float("nan")) for run in runs)
                            for task in TASKS},
               "malformed": _mean_sd(run["malformed"] for run in runs),
               "train_prompts": runs[0]["train_prompts"],
               "extra_generated": runs[0]["extra_generated"],
               "seconds": _mean_sd(run["wall_seconds"] for run in runs)}
        if reference is not None:
            row["vs_paired"] = _mean_sd(a - reference[seed] for a, seed in zip(accuracies, seeds))
        if base_row is not None:
            row["vs_base"] = _mean_sd(a - b for a, b in zip(accuracies, base_row["accuracies"], strict=True))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------- the report


def _pm(mean_sd, digits=3):
    return f"{mean_sd[0]:.{digits}f} ± {mean_sd[1]:.{digits}f}"


def _list(values):
    return ", ".join(f"{value:.3f}" for value in values)


def value_table(value, steps):
    """The library-value rows: max |Δloss| to the packed path, CPU ms per step, peak MiB and their ratios."""
    first = value[0]
    reference = value[-1]
    lines = [f"| path | max \\|Δ loss\\| vs packed, steps 1–{steps} | CPU ms / step (median) | × vs pure PyTorch | "
             "peak MiB (training) | × vs pure PyTorch |", "|---|---|---|---|---|---|"]
    for path in value:
        delta = max(abs(a - b) for a, b in zip(path["losses"][:steps], first["losses"][:steps]))
        step_ms = 1000 * statistics.median(path["step_cpu"][1:] or path["step_cpu"])
        reference_ms = 1000 * statistics.median(reference["step_cpu"][1:] or reference["step_cpu"])
        lines.append(f"| {path['label']} | {delta:.2e} | {step_ms:.1f} | {reference_ms / step_ms:.2f}× faster | "
                     f"{path['peak_mib']:.1f} | {reference['peak_mib'] / max(path['peak_mib'], 1e-9):.2f}× less |")
        path["max_delta"], path["step_ms"] = delta, step_ms
    return "\n".join(lines)


def method_table(base_row, rows):
    tasks = list(TASKS)
    header = ["row", "held-out exact match (mean ± sd)", *tasks, "− base (paired, mean ± sd)",
              f"− {PAIRED_TO.upper()} (paired, mean ± sd)", "malformed answers", "prompts trained on", "wall s / run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| " + " | ".join(["base (SFT warm-up)", _pm(base_row["accuracy"]),
                                    *(_pm(base_row["per_task"][t], 2) for t in tasks), "–", "–",
                                    _pm(base_row["malformed"], 2), "–", f"{base_row['seconds'][0]:.0f}"]) + " |")
    for row in rows:
        paired = "–" if row["name"] == PAIRED_TO or "vs_paired" not in row else _pm(row["vs_paired"])
        lines.append("| " + " | ".join([row["label"], _pm(row["accuracy"]),
                                        *(_pm(row["per_task"][t], 2) for t in tasks), _pm(row["vs_base"]), paired,
                                        _pm(row["malformed"], 2), str(row["train_prompts"]),
                                        f"{row['seconds'][0]:.0f}"]) + " |")
    return "\n".join(lines)


def _verdict(difference, spread, sampling_error):
    """Words for a difference (mean, sd over seeds) in accuracy; ``sampling_error``: the held-out set's binomial
    standard error of one accuracy."""
    if difference == 0 or abs(difference) <= 2 * spread:
        return "does NOT exceed the seed spread (no evidence of a difference)"
    if abs(difference) < sampling_error:
        return (f"exceeds the seed spread but not the held-out sampling error (±{100 * sampling_error:.1f} "
                "points): consistent on these prompts, not evidence beyond them")
    return f"exceeds both the seed spread and the held-out sampling error (±{100 * sampling_error:.1f} points)"


def observations(base_row, rows, num_seeds, num_eval):
    """Plain statements read off the numbers: a paired difference (same seed) "exceeds the seed spread" when its
    mean is more than twice its standard deviation over the seeds; it is also set against the held-out set's
    binomial standard error (the same prompts for every run, so the seeds do not sample it)."""
    accuracy = base_row["accuracy"][0]
    sampling_error = (max(accuracy * (1 - accuracy), 0.0) / num_eval) ** 0.5
    lines = []
    for row in rows:
        mean, sd = row["accuracy"]
        change, change_sd = row["vs_base"]
        line = (f"- {row['label']}: {100 * mean:.1f} ± {100 * sd:.1f} held-out exact match; vs its base seed by "
                f"seed {100 * change:+.1f} ± {100 * change_sd:.1f} points, which "
                f"{_verdict(change, change_sd, sampling_error)}")
        if row["name"] != PAIRED_TO and "vs_paired" in row:
            diff, diff_sd = row["vs_paired"]
            line += (f"; vs {PAIRED_TO.upper()} seed by seed {100 * diff:+.1f} ± {100 * diff_sd:.1f} points, which "
                     f"{_verdict(diff, diff_sd, sampling_error)}")
        lines.append(line + ".")
    lines.append(f"- Rule: a difference exceeds the seed spread when |mean| > 2 sd over the {num_seeds} seeds. A "
                 "seed is a whole pipeline (model initialisation, SFT, generation round, preference batch order); "
                 "every seed shares the training prompts and the held-out set.")
    return "\n".join(lines)


def plot_demo(out, base_row, value, rows, steps):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for path, style in zip(value, ("-", "--", ":")):
        axes[0].plot(range(1, len(path["losses"]) + 1), path["losses"], style, label=path["label"])
    axes[0].set_title(f"SMPRO loss, same run three ways ({steps} steps)")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    names = [p["label"].replace(" (reference backend)", "\n(reference)").replace(", ", ",\n") for p in value]
    reference = value[-1]
    axes[1].bar(names, [reference["step_ms"] / p["step_ms"] for p in value], color="tab:green")
    axes[1].set_title("speed vs pure PyTorch (×, CPU time / step)")
    axes[1].tick_params(axis="x", labelsize=7)
    axes[2].bar(names, [reference["peak_mib"] / max(p["peak_mib"], 1e-9) for p in value], color="tab:purple")
    axes[2].set_title("peak memory vs pure PyTorch (× less)")
    axes[2].tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.savefig(out / "value.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(9, 3.6))
    labels = ["base"] + [r["label"].split(" (")[0].replace("upper bound: ", "upper bound:\n") for r in rows]
    means = [base_row["accuracy"][0]] + [r["accuracy"][0] for r in rows]
    errors = [base_row["accuracy"][1]] + [r["accuracy"][1] for r in rows]
    axis.bar(labels, means, yerr=errors, capsize=4, color=["tab:gray"] + ["tab:blue"] * len(rows))
    axis.axhline(base_row["chance"], color="black", linestyle=":", linewidth=1, label="chance")
    axis.set_title("held-out exact match, mean ± sd over seeds")
    axis.tick_params(axis="x", labelsize=7)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "demo.png", dpi=110)
    plt.close(figure)


def _cells(per_task, tasks):
    return " | ".join(_pm(per_task[task], 2) for task in tasks)


def write_report(settings, out, base_row, value, rows, rounds, timing, misp_path):
    table = value_table(value, settings.value_steps)
    plot_demo(out, base_row, value, rows, settings.value_steps)
    packed, unpacked = value[0], value[1]
    tasks = list(TASKS)
    estimate = timing["main_cpu"] + timing["worker_cpu"] / timing["workers"]
    reused = "" if settings.base is None else f" (reused from `{settings.base}`)"
    accuracy = base_row["accuracy"][0]
    standard_error = (max(accuracy * (1 - accuracy), 0.0) / settings.num_eval) ** 0.5
    seeds = list(settings.seeds)
    round_ = rounds[seeds[0]]
    negatives = ", ".join(f"seed {seed}: {len(rounds[seed].records)}" for seed in seeds)
    text = f"""# prefrank demo: tiny LLaVA on synthetic visual QA

Everything offline on CPU: a randomly initialised LLaVA (CLIP vision tower + Llama text model, built from
configs, `tiny_model={settings.tiny_model}`; byte-level BPE tokenizer trained in code on the task's text, one
token per answer) and procedurally generated 32×32 images (shapes, colours, counts, positions; the processor
resizes them to the model's input size) with templated questions. {settings.num_train} training prompts,
{settings.num_eval} held-out prompts (different seed).

## What prefrank buys: the same SMPRO training, three ways

The same SMPRO run ({settings.value_steps} steps × {settings.batch_size} prompts from seed {seeds[0]}'s SFT
base, same seed, data and lr) with prefrank's kernels and shared-prompt packing (each prompt and its image
once for all of its answers), with prefrank's kernels unpacked (one row per answer), and on the pure-PyTorch
path (backend "reference": materialised logits + log_softmax, dense sorting network, unpacked). The three
paths run after every other run of the demo, one at a time, each in a fresh process with one thread; step
time = median CPU time per step (steps 2–{settings.value_steps}); peak = resident-set high-water mark over
steps 2–{settings.value_steps} minus the resident set after step 1 (model, data, optimizer state and the code
a step maps on first use already in): the memory of a training step itself.

{table}

Packed vs unpacked (both prefrank kernels, issue 14): {unpacked['step_ms'] / packed['step_ms']:.2f}× faster per
step, {unpacked['peak_mib'] / max(packed['peak_mib'], 1e-9):.2f}× less peak memory. The loss curves agree to
{max(p['max_delta'] for p in value):.1e} over the {settings.value_steps} steps (float32 summation order only).

![value](value.png)

## The base and its image ablation

SFT warm-up on the labelled answers, one per seed {seeds} (model initialisation and batch order),
{settings.sft_steps} steps × {settings.batch_size} prompts, lr {settings.sft_lr}{reused}: held-out exact match
**{_pm(base_row['accuracy'])}** (mean ± sd over the seeds; per seed {_list(base_row['accuracies'])}; one
accuracy's binomial standard error on {settings.num_eval} prompts is about {100 * standard_error:.1f} points).
With every held-out image replaced by uniform noise: **{_pm(base_row['noise_accuracy'])}** (per seed
{_list(base_row['noise_accuracies'])}; chance {base_row['chance']:.3f}).

| base, mean ± sd over seeds | overall | {' | '.join(tasks)} |
|---|---|{'---|' * len(tasks)}
| clean images | {_pm(base_row['accuracy'])} | {_cells(base_row['per_task'], tasks)} |
| noise images | {_pm(base_row['noise_accuracy'])} | {_cells(base_row['noise_per_task'], tasks)} |

## Method effects over {len(settings.seeds)} seeds

Every row runs once per seed {seeds}, from that seed's base, with {settings.pref_steps} steps ×
{settings.batch_size} prompts, lr {settings.pref_lr}, β = {settings.beta} (the seed also sets the batch order).
No per-method tuning. The label-free rows of a seed train on the shared generation round of that seed's base
(next section; prompts with a negative group: {negatives} of {settings.num_train}); the upper-bound row trains
on the labels and is a reference point, not a competitor. Paired differences: the row's accuracy minus its
base's, and minus DPO's, with the same seed, mean ± sd over seeds.

{method_table(base_row, rows)}

What the differences show (generated from the numbers above):
{observations(base_row, rows, len(settings.seeds), settings.num_eval)}

![demo](demo.png)

## Time

Total wall time {timing['wall']:.0f} s ({timing['workers']} worker process(es), {settings.threads} thread(s)
each). CPU time: {timing['main_cpu']:.0f} s in the main process (generation rounds, preference data) +
{timing['worker_cpu']:.0f} s in the workers (of which the SFTs and their ablations {timing['sft_cpu']:.0f} s), i.e.
about {estimate:.0f} s of wall time on {timing['workers']} otherwise idle core(s).

Runs: `{out}/sft/seed<k>/` (the bases), `{out}/value/` (library-value runs), `{out}/runs/<row>/seed<k>/`
(metrics.jsonl, training.png, final/), `<run>.log` next to each run; `data/`: the held-out set and each row's
preference data per seed as JSONL + PNG (`python -m prefrank.train --data …`),
`data/shared_round_seed<k>.jsonl`: each seed's shared round. The next section describes seed {seeds[0]}'s.

{selfpref_demo.report_section(round_, misp_path)}
"""
    (out / "report.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"base": base_row, "value": value, "rows": rows, "timing": timing},
                                                 indent=2, default=str))
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m prefrank.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DemoSettings.out)
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (smoke test)")
    parser.add_argument("--base", help="start from this SFT run folder (a previous demo's runs/demo/sft, same "
                        "tiny_model) instead of the warm-up")
    parser.add_argument("--workers", type=int, default=DemoSettings.workers,
                        help="worker processes for the independent runs (default: 2)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    settings = DemoSettings(out=args.out, workers=args.workers, base=args.base)
    if args.quick:
        settings = replace(settings, **QUICK)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_demo(settings)


if __name__ == "__main__":
    main()
