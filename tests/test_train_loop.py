"""One training step per method against independent oracles, gradient accumulation, CLI/config parsing."""

import json
import math

import pytest
import torch

from prefrank.train.config import TrainConfig, parse_args
from prefrank.train.data import synthetic_dataset
from prefrank.train.loop import Trainer, batch_indices
from prefrank.train.methods import METHODS


def tiny_config(tmp_path, method, **overrides):
    values = dict(method=method, out=str(tmp_path / method), steps=1, batch_size=4, num_train=8, num_eval=4,
                  num_negatives=2, lr=1e-2, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def _params(trainer):
    return {k: v.detach().clone() for k, v in trainer.vlm.model.state_dict().items()}


def test_sft_step_matches_the_models_own_loss(tmp_path):
    """The completion-only logprob path must give exactly HF's token-mean cross-entropy on the same batch."""
    trainer = Trainer(tiny_config(tmp_path, "sft"))
    indices = batch_indices(0, len(trainer.train_data), 4, trainer.config.seed)
    batch = trainer.method.build_batch(trainer.train_data, indices)
    hf_labels = torch.full_like(batch.labels, -100)  # HF shifts internally: label at t is scored by t-1
    hf_labels[:, 1:] = batch.labels[:, :-1]
    with torch.no_grad():
        expected = trainer.vlm.model(**batch.inputs, labels=hf_labels).loss
    before = _params(trainer)
    metrics = trainer.train_step()
    assert metrics["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in trainer.vlm.model.state_dict().items())


@pytest.mark.parametrize("method", ["dpo", "listwise", "smpro", "misp_dpo"])
def test_one_preference_step_per_method(tmp_path, method):
    trainer = Trainer(tiny_config(tmp_path, method))
    records = [trainer.train_data.records[i] for i in batch_indices(0, 8, 4, 0)]
    before = _params(trainer)
    metrics = trainer.train_step()
    # step 1 starts at policy == reference: every implicit reward is exactly 0
    if method == "dpo":
        assert metrics["loss"] == pytest.approx(math.log(2), rel=1e-6)
    elif method == "misp_dpo":  # softplus(logsumexp of K zeros) + text DPO at zero margin
        assert metrics["loss"] == pytest.approx(math.log(1 + 2) + math.log(2), rel=1e-6)
    elif method == "listwise":  # Plackett-Luce, one gold then a Breslow-tied group of the K-1 others
        expected = [math.log(len(r.responses)) + (len(r.responses) - 1) * math.log(len(r.responses) - 1)
                    for r in records]
        assert metrics["loss"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    margin = metrics.get("rewards/margins", metrics.get("rewards/margin"))  # pairwise / listwise names
    assert margin == pytest.approx(0.0, abs=1e-6)
    after = trainer.vlm.model.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in after.items())
    # the reference stays frozen
    reference = trainer.reference.model.state_dict()
    assert all(torch.equal(before[k], reference[k]) for k in before)


def test_precomputed_reference_matches_reference_model(tmp_path):
    by_model = Trainer(tiny_config(tmp_path / "a", "listwise", steps=2)).train()
    precomputed = Trainer(tiny_config(tmp_path / "b", "listwise", steps=2, reference="precomputed")).train()
    for key, value in by_model["final_metrics"].items():
        assert precomputed["final_metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_grad_accumulation_equals_one_big_batch(tmp_path, method):
    """Same gradient (read back from Adam's first moment after one step: exp_avg = 0.1 · clipped grad) and
    the same loss for 1 × 4 prompts and 2 × 2 micro-batches. SFT checks the global token normaliser."""
    records = synthetic_dataset(8, seed=0)
    for index, record in enumerate(records):  # responses of different token counts: per-micro means differ
        record.responses[0] = " ".join([record.responses[0]] * (1 + index * index % 5))
    one = Trainer(tiny_config(tmp_path / "one", method), train_records=records)
    first, second = batch_indices(0, 8, 4, one.config.seed)[:2], batch_indices(0, 8, 4, one.config.seed)[2:]
    assert one._count_tokens(first) != one._count_tokens(second)  # else the SFT case would prove nothing
    accumulated = Trainer(tiny_config(tmp_path / "acc", method, grad_accum=2), train_records=records)
    metrics_one, metrics_acc = one.train_step(), accumulated.train_step()
    assert metrics_acc["loss"] == pytest.approx(metrics_one["loss"], rel=1e-5)
    assert metrics_acc["grad_norm"] == pytest.approx(metrics_one["grad_norm"], rel=1e-5)
    params_one = dict(one.vlm.model.named_parameters())
    params_acc = dict(accumulated.vlm.model.named_parameters())
    compared = 0
    for name, param in params_one.items():
        if param in one.optimizer.state:
            torch.testing.assert_close(accumulated.optimizer.state[params_acc[name]]["exp_avg"],
                                       one.optimizer.state[param]["exp_avg"], rtol=1e-4, atol=1e-8)
            compared += 1
    assert compared > 10


def test_train_writes_metrics_plots_and_final_model(tmp_path):
    summary = Trainer(tiny_config(tmp_path, "dpo", steps=2, eval_every=1)).train()
    out = tmp_path / "dpo"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [1, 2]
    assert 0.0 <= summary["eval_accuracy"] <= 1.0
    assert (out / "training.png").stat().st_size > 0
    assert (out / "final" / "model.safetensors").exists() and (out / "final.json").exists()


def test_batches_cover_each_epoch_once():
    seen = [i for step in range(4) for i in batch_indices(step, 10, 5, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert batch_indices(1, 10, 5, seed=3) == batch_indices(1, 10, 5, seed=3)


def test_cli_and_config_file(tmp_path):
    (tmp_path / "c.yaml").write_text("method: dpo\nsteps: 7\nbeta: 0.2\n"
                                     "loss_kwargs: {label_smoothing: 0.1}\n")
    config = parse_args(["--config", str(tmp_path / "c.yaml"), "--steps", "3", "--lr", "0.5"])
    assert (config.method, config.steps, config.beta, config.lr) == ("dpo", 3, 0.2, 0.5)
    assert config.loss_kwargs == {"label_smoothing": 0.1}
    (tmp_path / "c.json").write_text(json.dumps({"method": "listwise", "batch_sise": 3}))
    with pytest.raises(ValueError, match="unknown option"):
        parse_args(["--config", str(tmp_path / "c.json")])
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(tiny_config(tmp_path, "sft", batch_size=3, grad_accum=2))
    assert set(METHODS) == {"sft", "dpo", "listwise", "smpro", "misp_dpo"}


def test_init_from_a_run_folder_and_model_flag(tmp_path):
    """`init` = a previous run folder restores its final weights; `model` = its final/ HF folder loads the
    same model through AutoModelForImageTextToText + AutoProcessor."""
    first = Trainer(tiny_config(tmp_path, "sft", steps=1))
    first.train()
    trained = first.vlm.model.state_dict()
    from_run = Trainer(tiny_config(tmp_path / "b", "dpo", init=str(tmp_path / "sft")))
    from_folder = Trainer(tiny_config(tmp_path / "c", "dpo", model=str(tmp_path / "sft" / "final")))
    for trainer in (from_run, from_folder):
        state = trainer.vlm.model.state_dict()
        assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in trained)
    assert from_folder.train_data.prompts[0]["input_ids"].tolist() == first.train_data.prompts[0][
        "input_ids"].tolist()


def test_set_train_records_and_sampled_generation(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "listwise", steps=2))
    fresh = synthetic_dataset(8, seed=9)
    trainer.on_step_end = lambda step: trainer.set_train_records(fresh) if step == 1 else None
    trainer.train()
    assert trainer.train_data.records is fresh
    answers = trainer.vlm.generate(trainer.train_data.prompts[:2], max_new_tokens=3, do_sample=True,
                                   num_return_sequences=3)
    assert len(answers) == 6 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="reference='model'"):
        Trainer(tiny_config(tmp_path / "p", "dpo", reference="precomputed")).set_train_records(fresh)


def test_cli_main_on_user_jsonl(tmp_path):
    from prefrank.train.data import export_jsonl
    from prefrank.train.loop import main

    export_jsonl(synthetic_dataset(4, seed=7), tmp_path / "data" / "train.jsonl")
    export_jsonl(synthetic_dataset(2, seed=8), tmp_path / "data" / "heldout.jsonl")
    summary = main(["--method", "dpo", "--data", str(tmp_path / "data" / "train.jsonl"),
                    "--eval-data", str(tmp_path / "data" / "heldout.jsonl"), "--steps", "1",
                    "--batch-size", "2", "--out", str(tmp_path / "run"), "--no-progress"])
    assert summary["step"] == 1 and summary["final_metrics"]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["method"] == "dpo"


def test_bf16_autocast_step(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "dpo", precision="bf16"))
    metrics = trainer.train_step()
    # policy and reference run the same bf16 forward at step 1: rewards are exactly 0, log-probs stay fp32
    assert metrics["loss"] == pytest.approx(math.log(2), rel=1e-6)
    batch = trainer.method.build_batch(trainer.train_data, [0, 1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert trainer.scorer(batch.inputs, batch.labels).dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in trainer.vlm.model.parameters())


# -- options are checked before anything is written; the run's end never loses the weights (issue 13) ------


@pytest.mark.parametrize("flags, message", [
    (["--log-every", "0"], r"log_every \(--log-every\) must be > 0"),
    (["--warmup-steps", "-5"], r"warmup_steps \(--warmup-steps\) must be >= 0"),
    (["--lr", "-1"], r"lr \(--lr\) must be > 0"),
    (["--beta", "-1"], r"beta \(--beta\) must be > 0"),
    (["--beta", "nan"], r"beta \(--beta\) must be > 0 and finite"),
    (["--resume", "--overwrite"], "pass one of them"),
])
def test_bad_flags_fail_before_the_run_folder_is_touched(tmp_path, flags, message):
    from prefrank.train.loop import main

    with pytest.raises(ValueError, match=message):
        main(["--method", "dpo", "--steps", "1", "--out", str(tmp_path / "run"), "--no-progress", *flags])
    assert not (tmp_path / "run").exists()


def test_config_file_values_are_type_checked(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"method": "dpo", "steps": "2"}))
    with pytest.raises(ValueError, match=r"steps \(--steps\) must be an integer, got '2'"):
        parse_args(["--config", str(tmp_path / "c.json")])
    (tmp_path / "c.json").write_text(json.dumps({"method": "dpo", "loss_kwargs": {"labl_smoothing": 0.1}}))
    with pytest.raises(ValueError, match="the dpo loss rejects its options .*labl_smoothing"):
        parse_args(["--config", str(tmp_path / "c.json")])
    config = TrainConfig(method="listwise", lr=1, beta=1).validate()  # ints are fine where a float is expected
    assert (config.lr, config.beta) == (1.0, 1.0) and isinstance(config.lr, float)


def test_logged_lr_is_the_rate_each_step_used(tmp_path):
    """warmup 2 then cosine over 4 steps: the updates use 0.5, 1, 1, 0.5 × lr (the old log showed the next
    step's rate: 1, 1, 0.5, 0)."""
    Trainer(tiny_config(tmp_path, "sft", steps=4, warmup_steps=2, batch_size=2, num_eval=2)).train()
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "loss" in r] == pytest.approx([0.5e-2, 1e-2, 1e-2, 0.5e-2])


def test_final_model_is_saved_before_the_final_evaluation(tmp_path, monkeypatch):
    def failing_evaluation(self):
        raise RuntimeError("evaluation failed")

    trainer = Trainer(tiny_config(tmp_path, "sft", batch_size=2, num_eval=2))
    monkeypatch.setattr(Trainer, "evaluate", failing_evaluation)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer.train()
    from prefrank.train.loop import init_state_dict

    saved = init_state_dict(tmp_path / "sft", type(trainer.vlm.model))  # the run folder's final/ model
    state = trainer.vlm.model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)


def test_missing_matplotlib_skips_the_plot_only(tmp_path, monkeypatch):
    """Without matplotlib a finished run used to die at its end (ModuleNotFoundError, no final.json)."""
    import sys

    for name in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib` now raises ImportError
    monkeypatch.delitem(sys.modules, "prefrank.train.plots", raising=False)
    with pytest.warns(UserWarning, match="training.png not written.*matplotlib"):
        summary = Trainer(tiny_config(tmp_path, "sft", batch_size=2, num_eval=2)).train()
    final = json.loads((tmp_path / "sft" / "final.json").read_text())
    assert final["final_metrics"] == summary["final_metrics"]
    assert not (tmp_path / "sft" / "training.png").exists()
