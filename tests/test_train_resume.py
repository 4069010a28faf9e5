"""Checkpoints: atomic layout, weights_only loading, SIGTERM → checkpoint → --resume reaches the same end."""

import json
import os
import signal

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
