"""Atomic checkpoints: `<out>/checkpoints/step_XXXXXXXX/` holds model.safetensors, trainer_state.pt
(optimizer, scheduler, step) and rng_rank<r>.pt; it is written under a temporary name and renamed, and
`<out>/checkpoints/latest` (itself replaced atomically) names the newest complete one. Everything loads with
`torch.load(weights_only=True)` / safetensors, never arbitrary unpickling."""

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


def _write_text_atomically(path, text):
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


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
        _write_text_atomically(root / "latest", final.name)
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
