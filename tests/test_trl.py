"""TRL drop-in (prefrank.integrations.trl): parity with TRL's own DPOTrainer, listwise training, PEFT, a VLM,
row validation, the optional import and the example script. Tiny random models from configs, offline, CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from prefrank import losses  # noqa: E402
from prefrank.integrations.trl import ListwiseConfig, ListwiseTrainer  # noqa: E402
from prefrank.train.model import build_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = ["The sky is", "Two plus two is", "Water boils at", "The capital of France is", "Cats like to",
           "The opposite of hot is"]
GOOD = [" blue.", " four.", " 100 degrees.", " Paris.", " sleep.", " cold."]
BAD = [" green cheese.", " seven.", " 3 degrees.", " Berlin.", " bark loudly.", " purple."]
WORSE = [" a banana", " eleventy", " never", " the moon", " fly", " loud"]
WORST = [" xq", " zz", " qq", " vv", " kk", " jj"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory, tokenizer):
    """A tiny random Llama saved to disk (TRL builds its reference model from the policy's path)."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def train_args(cls, tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=3, optim="sgd",
                   learning_rate=0.5, lr_scheduler_type="constant", max_grad_norm=0.0, bf16=False,
                   gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
                   use_cpu=True, seed=0, disable_tqdm=True, beta=0.1)
    options.update(overrides)
    return cls(**options)


def pair_rows():
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PROMPTS, GOOD, BAD)]


def ranked_pair_rows():
    return [{"prompt": p, "completions": [c, r], "ranks": [0, 1]} for p, c, r in zip(PROMPTS, GOOD, BAD)]


def ranked_rows():
    """K = 4 with ties, K = 3 and K = 2 rows (ragged)."""
    rows = []
    for i, p in enumerate(PROMPTS):
        if i % 3 == 0:
            rows.append({"prompt": p, "completions": [WORSE[i], GOOD[i], BAD[i], WORST[i]], "ranks": [1, 0, 1, 2]})
        elif i % 3 == 1:
            rows.append({"prompt": p, "completions": [GOOD[i], BAD[i], WORST[i]], "ranks": [0, 1, 2]})
        else:
            rows.append({"prompt": p, "completions": [BAD[i], GOOD[i]], "ranks": [3, 0]})
    return rows


def first_step(trainer):
    """Loss and gradients of the first two rows, through the trainer's own collator and compute_loss."""
    model = trainer.model
    model.train()
    model.zero_grad()
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def assert_close_relative(actual, expected, tol, what):
    scale = expected.abs().max().clamp(min=1e-30)
    error = (actual - expected).abs().max() / scale
    assert torch.isfinite(actual).all(), what
    assert error <= tol, f"{what}: relative error {error:.3g} > {tol}"
    return float(error)


# ------------------------------------------------------------------------------------------------------------
# Parity with TRL's DPOTrainer
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["plackett_luce", "dpo"])
def test_parity_with_trl_dpo(loss, llama_path, tokenizer, tmp_path):
    trl_trainer = DPOTrainer(model=load(llama_path), args=train_args(DPOConfig, tmp_path, loss_type="sigmoid"),
                             train_dataset=Dataset.from_list(pair_rows()), processing_class=tokenizer)
    ours = ListwiseTrainer(model=load(llama_path), ref_model=None, args=train_args(ListwiseConfig, tmp_path, loss=loss),
                           train_dataset=Dataset.from_list(ranked_pair_rows()), processing_class=tokenizer)
    trl_loss, trl_grads = first_step(trl_trainer)
    our_loss, our_grads = first_step(ours)
    assert_close_relative(our_loss, trl_loss, 1e-5, "first-step loss")
    assert trl_grads.keys() == our_grads.keys() and len(trl_grads) > 0
    for name in trl_grads:
        assert trl_grads[name].abs().max() > 0, name
        assert_close_relative(our_grads[name], trl_grads[name], 1e-5, f"gradient of {name}")

    initial = {n: p.detach().clone() for n, p in ours.model.named_parameters()}
    trl_trainer.train()
    ours.train()
    trl_params = dict(trl_trainer.model.named_parameters())
    for name, param in ours.model.named_parameters():
        expected = trl_params[name].detach()
        assert_close_relative(param.detach(), expected, 1e-5, f"{name} after 3 SGD steps")
        # the updates themselves agree (the parameters could agree because nothing moved)
        update, expected_update = param.detach() - initial[name], expected - initial[name]
        assert expected_update.abs().max() > 1e-4, name
        assert_close_relative(update, expected_update, 1e-4, f"{name} update over 3 SGD steps")
    trl_logs = [entry for entry in trl_trainer.state.log_history if "rewards/chosen" in entry]
    our_logs = [entry for entry in ours.state.log_history if "rewards/chosen" in entry]
    assert len(our_logs) == len(trl_logs) == 3
    for theirs, mine in zip(trl_logs, our_logs):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
