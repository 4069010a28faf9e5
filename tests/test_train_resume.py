"""Checkpoints: atomic layout, weights_only loading, SIGTERM → checkpoint → --resume reaches the same end."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from prefrank.train.checkpoint import latest_checkpoint
from prefrank.train.config import TrainConfig
from prefrank.train.loop import Trainer


def _config(out, **overrides):
    values = dict(method="dpo", out=str(out), steps=5, batch_size=4, num_train=8, num_eval=4, lr=1e-2,
                  warmup_steps=2, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def _loss_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_checkpoint_then_resume_matches_uninterrupted_run(tmp_path):
    straight = Trainer(_config(tmp_path / "straight")).train()

    out = tmp_path / "interrupted"
    trainer = Trainer(_config(out, save_every=2))

    def terminate_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.on_step_end = terminate_at_3
    summary = trainer.train()
    assert summary["interrupted"] and summary["step"] == 3
    assert latest_checkpoint(out).name == "step_00000003"
    assert not list((out / "checkpoints").glob(".tmp*"))  # temp folders were renamed away
    rng_at_stop = torch.get_rng_state()

    torch.manual_seed(12345)  # a different RNG state: resume must restore the saved one
    resumed = Trainer(_config(out, save_every=2, resume=True))
    assert resumed.resume() and resumed.step == 3
    assert torch.equal(torch.get_rng_state(), rng_at_stop)
    final = Trainer(_config(out, save_every=2, resume=True)).train()

    assert final["step"] == 5 and final["eval_accuracy"] == straight["eval_accuracy"]
    assert final["final_metrics"] == straight["final_metrics"]
    assert _loss_rows(out) == _loss_rows(tmp_path / "straight")
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_files_load_with_weights_only(tmp_path):
    Trainer(_config(tmp_path, steps=2, save_every=1)).train()
    path = latest_checkpoint(tmp_path)
    assert path.name == "step_00000002"
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2 and "optimizer" in state and "scheduler" in state
    assert torch.load(path / "rng_rank0.pt", weights_only=True)["torch"].dtype == torch.uint8
    assert load_file(path / "model.safetensors")


# -- run folders: never silently reused (issue 13) ----------------------------------------------------------


def _snapshot(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_a_second_run_into_a_used_folder_is_refused(tmp_path):
    """It used to delete metrics.jsonl, overwrite config.json (even when it then failed on a bad --beta at
    step 1) and replace final/."""
    from prefrank.train.loop import main

    Trainer(_config(tmp_path, steps=1)).train()
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"--out .* is not empty .*--resume.*--overwrite"):
        Trainer(_config(tmp_path, steps=1))
    with pytest.raises(ValueError, match=r"--beta"):
        main(["--method", "dpo", "--out", str(tmp_path), "--beta", "-1", "--no-progress"])
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_the_previous_runs_outputs_only(tmp_path):
    """--overwrite leaves no checkpoint, metric or final model of the previous run (of another method)."""
    Trainer(_config(tmp_path, steps=2, save_every=1)).train()
    (tmp_path / "notes.txt").write_text("mine")
    Trainer(_config(tmp_path, method="sft", steps=1, overwrite=True)).train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    assert [row["step"] for row in _loss_rows(tmp_path) if "loss" in row] == [1]
    assert json.loads((tmp_path / "config.json").read_text())["method"] == "sft"
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_resume_refuses_a_folder_of_another_run(tmp_path):
    Trainer(_config(tmp_path, steps=1, save_every=1)).train()
    with pytest.raises(ValueError, match=r"--resume: .* holds another run \(method: 'dpo' in the folder, "
                                         r"'listwise' now"):
        Trainer(_config(tmp_path, method="listwise", steps=2, resume=True))


def test_run_files_are_replaced_atomically(tmp_path, monkeypatch):
    """A crash while rewriting metrics.jsonl / config.json (simulated at the flush to disk before the rename)
    leaves the previous files intact; a metrics line cut by a crash mid-append is dropped on resume."""
    Trainer(_config(tmp_path, steps=2, save_every=1, eval_every=0)).train()
    before = _snapshot(tmp_path)

    def crash(fd):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", crash)
        with pytest.raises(OSError, match="disk full"):
            Trainer(_config(tmp_path, steps=3, save_every=1, resume=True)).train()
    assert _snapshot(tmp_path) == before  # no truncated file, no temporary left behind

    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "lo')  # the run died while appending step 3
    Trainer(_config(tmp_path, steps=3, save_every=1, resume=True)).train()
    assert [row["step"] for row in _loss_rows(tmp_path) if "loss" in row] == [1, 2, 3]
