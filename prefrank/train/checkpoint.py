"""The run folder: atomic checkpoints and files, and the rules for reusing a folder.

`<out>/checkpoints/step_XXXXXXXX/` holds model.safetensors, trainer_state.pt (optimizer, scheduler, step) and
rng_rank<r>.pt; it is written under a temporary name and renamed, and `<out>/checkpoints/latest` (itself
replaced atomically) names the newest complete one. Everything loads with `torch.load(weights_only=True)` /
safetensors, never arbitrary unpickling. config.json and final.json are replaced atomically; metrics.jsonl
grows by whole-line appends and is rewritten (on resume) atomically.

A non-empty `--out` is refused unless the run resumes it (`--resume`, same method, model and data) or
replaces it (`--overwrite` deletes the trainer's outputs listed in RUN_OUTPUTS first, nothing else)."""

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prefrank.train.distributed import barrier


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


RUN_OUTPUTS = ("config.json", "metrics.jsonl", "final.json", "training.png", "final", "checkpoints", "selfpref")
# config fields a checkpoint's weights, optimizer state and data order depend on: --resume needs them equal
RUN_IDENTITY = ("method", "model", "init", "model_seed", "tiny_model", "data", "data_root", "num_train",
                "data_seed", "num_negatives", "seed", "batch_size", "grad_accum", "reference", "self_generate")


def write_text_atomically(path, text):
    """Write to a temporary file in the same folder, flush it to disk, then rename it over `path`: a crash
    leaves the old file or the new one, never a truncated one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def append_line(path, line):
    """Append one line with a single write on an O_APPEND file (a crash can at worst cut that last line,
    which read_jsonl_rows drops)."""
    with open(path, "a") as handle:
        handle.write(line + "\n")


def read_jsonl_rows(path):
    """The rows of a metrics.jsonl; a last line cut by a crash mid-append is dropped (it is logged again)."""
    lines = Path(path).read_text().splitlines(keepends=True)
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{number}: not a JSON line") from None
    return rows


def check_run_folder(config):
    """Refuse a non-empty `out` unless the config resumes or overwrites it; on --resume, refuse a folder that
    holds another run (method, model, data …). Reads only: called before anything is written."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a run folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not (config.resume or config.overwrite):
        raise ValueError(f"--out {str(out)!r} is not empty ({', '.join(entries[:6])}"
                         f"{', …' if len(entries) > 6 else ''}): pass --resume to continue the run in it, "
                         f"--overwrite to replace its outputs, or choose another --out")
    saved_path = out / "config.json"
    if config.resume and saved_path.exists():
        saved = json.loads(saved_path.read_text())
        current = json.loads(json.dumps(vars(config)))  # the JSON form config.json holds
        changed = [f"{key}: {saved.get(key)!r} in the folder, {current[key]!r} now" for key in RUN_IDENTITY
                   if key in saved and saved[key] != current[key]]
        if changed:
            raise ValueError(f"--resume: {str(out)!r} holds another run ({'; '.join(changed)}); resume it with "
                             f"its own options, or use --overwrite or another --out")


def clear_run_folder(out):
    """--overwrite: delete the trainer's outputs in `out` (RUN_OUTPUTS), leaving anything else alone."""
    for name in RUN_OUTPUTS:
        path = Path(out) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def save_checkpoint(out, step, model_state, trainer_state, dist_state):
    """Collective: every rank calls it (each writes its RNG state); rank 0 writes the rest and renames."""
    root = Path(out) / "checkpoints"
    final = root / f"step_{step:08d}"
    temporary = root / f".tmp_step_{step:08d}"
    if dist_state.is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier(dist_state)
    torch.save(rng_state(), temporary / f"rng_rank{dist_state.rank}.pt")
    barrier(dist_state)
    if dist_state.is_main:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in model_state.items()},
                  temporary / "model.safetensors")
        torch.save({**trainer_state, "step": step}, temporary / "trainer_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.rename(temporary, final)
        write_text_atomically(root / "latest", final.name)
    barrier(dist_state)
    return final


def latest_checkpoint(out):
    pointer = Path(out) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "trainer_state.pt").exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def load_checkpoint(path, rank):
    """(model state dict, trainer state dict, this rank's RNG state or None)."""
    path = Path(path)
    model_state = load_file(path / "model.safetensors")
    trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
    rng_path = path / f"rng_rank{rank}.pt"
    rng = torch.load(rng_path, weights_only=True) if rng_path.exists() else None
    return model_state, trainer_state, rng
