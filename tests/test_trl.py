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

@pytest.mark.parametrize("pack_prompts", ["on", "off"])
@pytest.mark.parametrize("loss", ["plackett_luce", "dpo"])
def test_parity_with_trl_dpo(loss, pack_prompts, llama_path, tokenizer, tmp_path):
    trl_trainer = DPOTrainer(model=load(llama_path), args=train_args(DPOConfig, tmp_path, loss_type="sigmoid"),
                             train_dataset=Dataset.from_list(pair_rows()), processing_class=tokenizer)
    args = train_args(ListwiseConfig, tmp_path, loss=loss, pack_prompts=pack_prompts)
    ours = ListwiseTrainer(model=load(llama_path), ref_model=None, args=args,
                           train_dataset=Dataset.from_list(ranked_pair_rows()), processing_class=tokenizer)
    assert ours.data_collator.pack == (pack_prompts == "on")
    trl_loss, trl_grads = first_step(trl_trainer)
    our_loss, our_grads = first_step(ours)
    errors = {"loss": assert_close_relative(our_loss, trl_loss, 1e-5, "first-step loss")}
    assert trl_grads.keys() == our_grads.keys() and len(trl_grads) > 0
    for name in trl_grads:
        assert trl_grads[name].abs().max() > 0, name
        errors[name] = assert_close_relative(our_grads[name], trl_grads[name], 1e-5, f"gradient of {name}")
    errors["gradients"] = max(v for k, v in errors.items() if k != "loss")
    # at initialisation policy = reference (loss = log 2): compare away from it too, same perturbation on both
    perturb(trl_trainer.model)
    perturb(ours.model)
    trl_loss_moved, trl_grads_moved = first_step(trl_trainer)
    our_loss_moved, our_grads_moved = first_step(ours)
    assert abs(float(trl_loss_moved) - 0.6931) > 0.01
    errors["moved loss"] = assert_close_relative(our_loss_moved, trl_loss_moved, 1e-5, "loss, perturbed policy")
    for name in trl_grads_moved:
        errors["moved gradients"] = max(errors.get("moved gradients", 0.0), assert_close_relative(
            our_grads_moved[name], trl_grads_moved[name], 1e-5, f"gradient of {name}, perturbed policy"))

    initial = {n: p.detach().clone() for n, p in ours.model.named_parameters()}
    trl_trainer.train()
    ours.train()
    trl_params = dict(trl_trainer.model.named_parameters())
    params_error = updates_error = 0.0
    for name, param in ours.model.named_parameters():
        expected = trl_params[name].detach()
        params_error = max(params_error, assert_close_relative(param.detach(), expected, 1e-5,
                                                               f"{name} after 3 SGD steps"))
        # the updates themselves agree (the parameters could agree because nothing moved)
        update, expected_update = param.detach() - initial[name], expected - initial[name]
        assert expected_update.abs().max() > 1e-4, name
        updates_error = max(updates_error, assert_close_relative(update, expected_update, 1e-4,
                                                                 f"{name} update over 3 SGD steps"))
    print(f"parity {loss}/{pack_prompts}: loss {float(trl_loss):.6f} rel.err {errors['loss']:.2e}, max grad rel.err "
          f"{errors['gradients']:.2e}; perturbed: loss {float(trl_loss_moved):.6f} rel.err {errors['moved loss']:.2e}, "
          f"grads {errors['moved gradients']:.2e}; params after 3 SGD rel.err {params_error:.2e}, "
          f"updates {updates_error:.2e}")
    trl_logs = [entry for entry in trl_trainer.state.log_history if "rewards/chosen" in entry]
    our_logs = [entry for entry in ours.state.log_history if "rewards/chosen" in entry]
    assert len(our_logs) == len(trl_logs) == 3
    for theirs, mine in zip(trl_logs, our_logs):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), key


# ------------------------------------------------------------------------------------------------------------
# Listwise training: every loss on K = 4 with ties and ragged K, against an independent full-logits oracle
# ------------------------------------------------------------------------------------------------------------

def perturb(model, seed=1, scale=0.05):
    """Move the policy away from the reference so that rewards are not all 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator))


def oracle_logps(model, prompt_ids, completion_ids):
    """Σ log p(completion | prompt) with the model's ordinary forward (full logits), one sequence at a time."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    token_logps = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return token_logps[len(prompt_ids) - 1:].sum()


def oracle_loss(trainer, ref_model, rows):
    """The configured prefrank loss on (B, K) log-probs from `oracle_logps` (float64)."""
    width = max(len(r["completion_ids"]) for r in rows)
    policy = torch.zeros(len(rows), width, dtype=torch.float64)
    ref = torch.zeros_like(policy)
    levels = torch.full((len(rows), width), -1)
    for b, row in enumerate(rows):
        dense = sorted(set(row["ranks"]))
        for k, completion in enumerate(row["completion_ids"]):
            policy[b, k] = oracle_logps(trainer.model, row["prompt_ids"], completion)
            ref[b, k] = oracle_logps(ref_model, row["prompt_ids"], completion)
            levels[b, k] = dense.index(row["ranks"][k])
    args = trainer.args
    if args.loss == "plackett_luce":
        return losses.listwise_dpo_loss(policy, ref, groups=levels, beta=args.beta, ties=args.ties).loss
    if args.loss == "sdpo":  # one best completion per row here: S-DPO's own function
        order = levels.where(levels >= 0, levels.shape[1]).argsort(dim=-1, stable=True)
        pick = lambda t: t.gather(1, order)  # noqa: E731
        mask = pick(levels)[:, 1:] >= 0
        return losses.sdpo_loss(pick(policy)[:, 0], pick(policy)[:, 1:], pick(ref)[:, 0], pick(ref)[:, 1:],
                                beta=args.beta, mask=mask).loss
    if args.loss == "smpro":
        return losses.smpro_loss(policy, ref, levels, beta=args.beta, network=args.network,
                                 relaxation=args.relaxation, steepness=args.steepness,
                                 anchor_weight=args.anchor_weight).loss
    pairs = [(b, i, j) for b in range(len(rows)) for i in range(width) for j in range(width)
             if levels[b, i] >= 0 and levels[b, j] >= 0 and levels[b, i] < levels[b, j]]
    b, i, j = (torch.tensor(x) for x in zip(*pairs))
    return losses.dpo_loss(policy[b, i], policy[b, j], ref[b, i], ref[b, j], beta=args.beta).loss


@pytest.mark.parametrize("loss", ["plackett_luce", "sdpo", "smpro", "dpo"])
def test_listwise_ties_ragged_trains(loss, llama_path, tokenizer, tmp_path):
    rows = ranked_rows()[:3]   # K = 4 with a tie, K = 3, K = 2: one fixed batch
    args = train_args(ListwiseConfig, tmp_path, loss=loss, per_device_train_batch_size=3, max_steps=6,
                      learning_rate=0.03, beta=0.5)
    trainer = ListwiseTrainer(model=load(llama_path), ref_model=None, args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    perturb(trainer.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert trainer.data_collator.pack, "pack_prompts='auto' packs a tiny sdpa Llama"
    assert batch["packed"].input_ids.shape[0] == 3  # one row per prompt
    assert batch["levels"].tolist() == [[1, 0, 1, 2], [0, 1, 2, -1], [1, 0, -1, -1]]

    trainer.model.eval()
    with torch.no_grad():
        before = trainer.compute_loss(trainer.model, batch)
    expected = oracle_loss(trainer, trainer.ref_model, [trainer.train_dataset[i] for i in range(3)])
    assert torch.isfinite(before)
    assert float(before) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)

    trainer.train()
    trainer.model.eval()
    with torch.no_grad():
        after = trainer.compute_loss(trainer.model, batch)
    assert float(after) < float(before) - 1e-3, (float(before), float(after))
    print(f"{loss}: fixed-batch loss {float(before):.4f} -> {float(after):.4f} after 6 SGD steps "
          f"(oracle {float(expected):.6f}, trainer {float(before):.6f})")
    logs = [entry for entry in trainer.state.log_history if "rewards/chosen" in entry]
    assert len(logs) == 6
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "rewards/group_0", "rewards/group_1", "rewards/group_2",
                "num_tokens"):
        assert key in logs[-1] and torch.isfinite(torch.tensor(logs[-1][key])), key
    assert any(key.startswith("loss/") for key in logs[-1])
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    assert logs[-1]["rewards/accuracies"] >= logs[0]["rewards/accuracies"]


def test_packed_equals_unpacked(llama_path, tokenizer, tmp_path):
    rows = ranked_rows()
    trainers = {}
    for mode in ("on", "off"):
        args = train_args(ListwiseConfig, tmp_path, loss="smpro", per_device_train_batch_size=3, pack_prompts=mode,
                          max_length=16)  # truncation: completions lose their tail, 2 prompts fill 16 tokens
        trainers[mode] = ListwiseTrainer(model=load(llama_path), args=args, train_dataset=Dataset.from_list(rows),
                                         processing_class=tokenizer)
        perturb(trainers[mode].model)
        assert len(trainers[mode].train_dataset) == 4
    assert trainers["on"].data_collator.pack and not trainers["off"].data_collator.pack
    packed_loss, packed_grads = first_step(trainers["on"])
    loss, grads = first_step(trainers["off"])
    assert_close_relative(packed_loss, loss, 1e-5, "packed loss")
    for name in grads:
        assert_close_relative(packed_grads[name], grads[name], 1e-5, name)


def test_precomputed_reference_matches_live_reference(llama_path, tokenizer, tmp_path):
    rows = ranked_rows()
    common = dict(loss="plackett_luce", per_device_train_batch_size=3)
    live = ListwiseTrainer(model=load(llama_path), args=train_args(ListwiseConfig, tmp_path, **common),
                           train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    pre = ListwiseTrainer(model=load(llama_path),
                          args=train_args(ListwiseConfig, tmp_path, precompute_ref_log_probs=True, **common),
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert pre.ref_model is None and "ref_logps" in pre.train_dataset.column_names
    assert [len(v) for v in pre.train_dataset["ref_logps"]] == [len(r["ranks"]) for r in rows]
    perturb(live.model)
    perturb(pre.model)
    live_loss, live_grads = first_step(live)
    pre_loss, pre_grads = first_step(pre)
    assert_close_relative(pre_loss, live_loss, 1e-5, "loss with precomputed reference")
    for name in live_grads:
        assert_close_relative(pre_grads[name], live_grads[name], 1e-5, name)


def test_peft_lora_reference_is_adapter_disabled(llama_path, tokenizer, tmp_path):
    from peft import LoraConfig

    rows = ranked_rows()
    args = train_args(ListwiseConfig, tmp_path, loss="plackett_luce", per_device_train_batch_size=3, max_steps=4,
                      learning_rate=0.5)
    trainer = ListwiseTrainer(model=load(llama_path), ref_model=None, args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.0, task_type="CAUSAL_LM"))
    assert trainer.ref_model is None
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param.detach(), base_before[name]), f"{name} moved: only the adapter trains"
    base = load(llama_path)
    tokenised = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer._prepare_inputs(trainer.data_collator(tokenised))
    ref = trainer._reference_logps(batch)
    trainer.model.eval()
    with torch.no_grad():
        policy = trainer._completion_logps(trainer.model, batch)
    for b, row in enumerate(tokenised):
        for k, completion in enumerate(row["completion_ids"]):
            expected = oracle_logps(base, row["prompt_ids"], completion)
            assert float(ref[b, k]) == pytest.approx(float(expected), rel=1e-5, abs=1e-5)
    assert (policy - ref).abs().max() > 1e-3, "the trained adapter changed nothing"
    logs = [entry for entry in trainer.state.log_history if "rewards/margins" in entry]
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]


# ------------------------------------------------------------------------------------------------------------
# Bad rows: ValueError naming the row and the column, before training starts
# ------------------------------------------------------------------------------------------------------------

def _bad(mutate):
    rows = [dict(r) for r in ranked_rows()]
    mutate(rows)
    return rows


BAD_ROWS = {
    "ranks of the wrong length": (lambda rows: rows[2].update(ranks=[0]), "row 2", "'ranks'"),
    "fewer than two levels": (lambda rows: rows[1].update(ranks=[1, 1, 1]), "row 1", "'ranks'"),
    "a single completion": (lambda rows: rows[4].update(completions=["x"], ranks=[0]), "row 4", "'completions'"),
    "non-integer rank": (lambda rows: rows[3].update(ranks=[0, 1.5, 1, 2]), "row 3", "'ranks'"),
    "negative rank": (lambda rows: rows[5].update(ranks=[-1, 0]), "row 5", "'ranks'"),
    "a row without prompt": (lambda rows: rows[4].pop("prompt"), "row 4", "'prompt'"),
    "a column missing": (lambda rows: [r.pop("ranks") for r in rows], "row 0", "'ranks'"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_raise_before_training(case, llama_path, tokenizer, tmp_path):
    mutate, row, column = BAD_ROWS[case]
    dataset = Dataset.from_list(_bad(mutate))
    model = load(llama_path)
    with pytest.raises(ValueError) as info:
        ListwiseTrainer(model=model, args=train_args(ListwiseConfig, tmp_path), train_dataset=dataset,
                        processing_class=tokenizer)
    message = str(info.value)
    assert f"train_dataset {row}:" in message and f"column {column}" in message, message


def test_float_and_string_ranks_are_rejected(llama_path, tokenizer, tmp_path):
    integral_floats = Dataset.from_list([{**r, "ranks": [float(x) for x in r["ranks"]]} for r in ranked_rows()])
    with pytest.raises(ValueError, match=r"train_dataset row 0: column 'ranks'\[0\] must be an int"):
        ListwiseTrainer(model=load(llama_path), args=train_args(ListwiseConfig, tmp_path),
                        train_dataset=integral_floats, processing_class=tokenizer)
    scalars = Dataset.from_list([{**r, "ranks": 0} for r in ranked_rows()])
    with pytest.raises(ValueError, match=r"train_dataset row 0: column 'ranks' must be a list of ints"):
        ListwiseTrainer(model=load(llama_path), args=train_args(ListwiseConfig, tmp_path),
                        train_dataset=scalars, processing_class=tokenizer)
    strings = Dataset.from_list([{**r, "ranks": [str(x) for x in r["ranks"]]} for r in ranked_rows()])
    with pytest.raises(ValueError, match=r"train_dataset row 0: column 'ranks'\[0\] must be an int"):
        ListwiseTrainer(model=load(llama_path), args=train_args(ListwiseConfig, tmp_path),
                        train_dataset=strings, processing_class=tokenizer)


def test_bad_eval_rows_and_options(llama_path, tokenizer, tmp_path):
    eval_rows = Dataset.from_list(_bad(lambda rows: rows[5].update(ranks=[0, 0])))
    with pytest.raises(ValueError, match=r"eval_dataset row 5: column 'ranks' has fewer than two"):
        ListwiseTrainer(model=load(llama_path), args=train_args(ListwiseConfig, tmp_path),
                        train_dataset=Dataset.from_list(ranked_rows()), eval_dataset=eval_rows,
                        processing_class=tokenizer)
    with pytest.raises(ValueError, match="loss must be one of"):
        train_args(ListwiseConfig, tmp_path, loss="listmle")
    with pytest.raises(ValueError, match="ties must be one of"):
        train_args(ListwiseConfig, tmp_path, ties="exact")
    with pytest.raises(ValueError, match="relaxation must be one of"):
        train_args(ListwiseConfig, tmp_path, loss="smpro", relaxation="sigmoid")
    with pytest.raises(ValueError, match="top_k applies to loss='plackett_luce'"):
        train_args(ListwiseConfig, tmp_path, loss="smpro", top_k=1)
    with pytest.raises(ValueError, match="loss_type applies to loss='dpo' only"):
        train_args(ListwiseConfig, tmp_path, loss="plackett_luce", loss_type="ipo")
    with pytest.raises(ValueError, match="does not support"):
        train_args(ListwiseConfig, tmp_path, ld_alpha=0.5)


# ------------------------------------------------------------------------------------------------------------
# Optional dependency
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("remainder", [None, 3])
def test_metrics_are_gathered_across_processes(remainder):
    """Every logged reward / logp metric is over every process's rows, also when the processes saw different
    numbers of levels, and a last eval batch's duplicated rows (accelerate's remainder) are dropped: two
    processes emulated, the other one's gathered tensors recorded from its own call."""
    from collections import defaultdict
    from types import SimpleNamespace

    class Recorder:  # one process alone: records what it hands to gather
        def __init__(self):
            self.calls = []

        def pad_across_processes(self, tensor, dim):
            return tensor

        def gather(self, tensor):
            self.calls.append(tensor)
            return tensor

        gather_for_metrics = gather

    class TwoProcesses(Recorder):  # this process's tensor, then the other's (padded alike), as accelerate
        def __init__(self, other_calls, remainder):
            self.other, self.remainder = iter(other_calls), remainder

        def gather(self, tensor, truncate=False):
            other = next(self.other)
            shape = [max(a, b) for a, b in zip(tensor.shape, other.shape)]
            pad = lambda t: torch.nn.functional.pad(  # noqa: E731
                t, [p for d in reversed(range(t.dim())) for p in (0, shape[d] - t.shape[d])])
            out = torch.cat([pad(tensor), pad(other)])
            return out[:self.remainder] if truncate and self.remainder else out

        def gather_for_metrics(self, tensor):
            return self.gather(tensor, truncate=True)

    def log(accelerator, policy, ref, levels):
        trainer = SimpleNamespace(args=SimpleNamespace(beta=0.1), accelerator=accelerator, _total_train_tokens=0,
                                  _metrics={"eval": defaultdict(list)})
        ListwiseTrainer._log_metrics(trainer, "eval", {"loss/anchor": torch.tensor(float(len(levels)))}, policy,
                                     ref, levels, {})
        return trainer._metrics["eval"]

    def batch(levels):
        levels = torch.tensor(levels)
        return torch.randn(levels.shape), torch.randn(levels.shape), levels

    this = batch([[0, 1, 1, -1], [0, 0, 1, 1]])  # levels 0..1
    other = batch([[0, 1, 2, 3], [2, 0, -1, 1]])  # levels 0..3; on the last batch only its first row is real
    recorder = Recorder()
    log(recorder, *other)
    logged = log(TwoProcesses(recorder.calls, remainder), *this)
    kept = slice(None, remainder)  # the rows gather_for_metrics keeps: this process's, then the other's
    policy, ref, levels = (torch.cat([a, b])[kept] for a, b in zip(this, other))
    rewards = 0.1 * (policy - ref)
    best, rest = levels == 0, levels > 0
    expected = {"rewards/chosen": rewards[best].mean(), "rewards/rejected": rewards[rest].mean(),
                "logps/chosen": policy[best].mean(), "logps/rejected": policy[rest].mean(),
                "rewards/margins": ((rewards * best).sum(-1) / best.sum(-1)
                                    - (rewards * rest).sum(-1) / rest.sum(-1)).mean()}
    pairs = [(r, i, j) for r in range(len(levels)) for i in range(4) for j in range(4)
             if 0 <= levels[r, i] < levels[r, j]]
    expected["rewards/accuracies"] = torch.tensor(sum(bool(rewards[r, i] > rewards[r, j]) for r, i, j in pairs)
                                                  / len(pairs))
    for level in range(4):
        if (levels == level).any():
            expected[f"rewards/group_{level}"] = rewards[levels == level].mean()
    for key, value in expected.items():
        assert logged[key] == pytest.approx([value.item()], rel=1e-5), key
    assert {k for k in logged if k.startswith("rewards/group_")} == {k for k in expected if "group_" in k}
    assert logged["loss/anchor"] == pytest.approx([2.0])  # the mean of both processes' batch means


def test_import_without_trl():
    code = (
        "import sys\n"
        "sys.modules['trl'] = None  # as if TRL were not installed\n"
        "import prefrank, prefrank.integrations\n"
        "try:\n"
        "    import prefrank.integrations.trl\n"
        "except ImportError as error:\n"
        "    assert 'pip install trl' in str(error), error\n"
        "    print('ImportError:', error)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "pip install trl" in result.stdout


# ------------------------------------------------------------------------------------------------------------
# A vision-language model: tiny Qwen2-VL from a config, `images` column
# ------------------------------------------------------------------------------------------------------------

QWEN_SPECIAL = ["<pad>", "</s>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>What is in the picture?"


def tiny_qwen2_vl():
    """A random Qwen2-VL and its processor, offline. transformers' Qwen2VLProcessor insists on a video processor,
    which needs torchvision (not installed here): the subclass below is the same processor minus videos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        ProcessorMixin,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
    )

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["a red square", "a blue circle", "What is in the picture?"],
                                trainers.BpeTrainer(vocab_size=300, special_tokens=QWEN_SPECIAL, show_progress=False,
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>")
    side = 56  # 4×4 patches of 14 → 4 image tokens after the 2×2 merge
    processor = ImageOnlyQwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side), tokenizer=tokenizer)
    token = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 256, "pad_token_id": tokenizer.pad_token_id,
                     "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None,
                     "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3},
        image_token_id=token("<|image_pad|>"), video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"), vision_end_token_id=token("<|vision_end|>"))
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config), processor


def image_rows():
    from PIL import Image

    colours = [(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0)]
    answers = [" a red square</s>", " a blue circle</s>", " a cat</s>", " nothing</s>"]
    rows = []
    for i, colour in enumerate(colours):
        image = Image.new("RGB", (56, 56), colour)
        k = 4 if i % 2 == 0 else 3
        completions = answers[i:] + answers[:i]
        rows.append({"prompt": IMAGE_PROMPT, "completions": completions[:k], "ranks": [0, 1, 1, 2][:k],
                     "images": [image]})
    return rows


def vlm_oracle_logps(model, processor, row):
    """Σ log p(completion | image, prompt), one unpadded sequence at a time, full logits."""
    out = []
    prompt = processor(images=[row["images"]], text=[row["prompt"]], return_tensors="pt", add_special_tokens=False)
    for completion in row["completions"]:
        ids = processor.tokenizer(completion, add_special_tokens=False, return_tensors="pt")["input_ids"]
        inputs = dict(prompt)
        inputs["input_ids"] = torch.cat([prompt["input_ids"], ids], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(ids)], dim=1)
        with torch.no_grad():
            logits = model(**inputs).logits[0, :-1].double()
        token_logps = logits.log_softmax(-1).gather(-1, inputs["input_ids"][0, 1:, None])[:, 0]
        out.append(token_logps[-ids.shape[1]:].sum())
    return torch.stack(out)


def test_qwen2_vl_images(tmp_path):
    model, processor = tiny_qwen2_vl()
    rows = image_rows()
    args = train_args(ListwiseConfig, tmp_path, loss="plackett_luce", per_device_train_batch_size=2, max_steps=3,
                      learning_rate=0.05, beta=0.5, max_length=None)
    trainer = ListwiseTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=processor)
    perturb(trainer.model)
    examples = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(examples)
    assert batch["input_ids"].shape[0] == 4 + 3 and "pixel_values" in batch and "image_grid_thw" in batch
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    policy = torch.zeros(2, 4, dtype=torch.float64)
    ref = torch.zeros_like(policy)
    for b, row in enumerate(examples):
        k = len(row["completions"])
        policy[b, :k] = vlm_oracle_logps(trainer.model, processor, row)
        ref[b, :k] = vlm_oracle_logps(trainer.ref_model, processor, row)
    levels = torch.tensor([[0, 1, 1, 2], [0, 1, 1, -1]])
    expected = losses.listwise_dpo_loss(policy, ref, groups=levels, beta=0.5).loss
    assert float(loss) == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    vision_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "visual" in n}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "rewards/chosen" in entry]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    params = dict(trainer.model.named_parameters())
    assert vision_before and any(not torch.equal(params[n].detach(), p) for n, p in vision_before.items()), \
        "the images reach the loss: the vision tower trains"


# ------------------------------------------------------------------------------------------------------------
# The example script
# ------------------------------------------------------------------------------------------------------------

def test_example_script_runs(tmp_path):
    """examples/trl_listwise.py end to end, offline on CPU (< 1 minute on a quiet machine; the bound here is
    looser because the CI machine is shared)."""
    import time

    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "trl_listwise.py"), "--loss", "smpro",
                             "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss=smpro final: loss=" in result.stdout and "nan" not in result.stdout.lower()
    print(f"example wall time {elapsed:.1f} s")


def test_conversational_rows_with_trl_defaults(llama_path, tmp_path):
    """Conversational rows (chat template), TRL's own defaults for bf16 autocast and gradient checkpointing."""
    from transformers import AutoTokenizer

    chat = AutoTokenizer.from_pretrained(llama_path)
    chat.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                          "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    rows = [{"prompt": [{"role": "user", "content": p}],
             "completions": [[{"role": "assistant", "content": c}] for c in (g, b, w)], "ranks": [0, 1, 1]}
            for p, g, b, w in zip(PROMPTS, GOOD, BAD, WORSE)]
    args = ListwiseConfig(output_dir=str(tmp_path / "out"), loss="plackett_luce", per_device_train_batch_size=3,
                          max_steps=2, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                          disable_tqdm=True)
    assert args.gradient_checkpointing and args.bf16  # TRL's defaults
    trainer = ListwiseTrainer(model=load(llama_path), args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=chat)
    first = trainer.train_dataset[0]
    assert chat.decode(first["prompt_ids"]).startswith("<s>user: The sky is</s><s>assistant")
    decoded = [chat.decode(ids) for ids in first["completion_ids"]]
    assert all(text.endswith(c + "</s>") for text, c in zip(decoded, (GOOD[0], BAD[0], WORSE[0]))), decoded
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "rewards/chosen" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    metrics = trainer.evaluate(eval_dataset=Dataset.from_list(rows[3:]))
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/group_1"):
        assert key in metrics and torch.isfinite(torch.tensor(metrics[key])), (key, metrics)
    with pytest.raises(ValueError, match="eval row 1: column 'ranks'"):
        trainer.evaluate(eval_dataset=Dataset.from_list([rows[0], {**rows[1], "ranks": [0, 1]}]))
