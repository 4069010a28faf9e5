"""Shared-prompt packing: packed log-probs and parameter gradients equal the unpacked rows' on random tiny
Llama / Qwen2 / LLaVA models (eager and sdpa, fp32 and fp64), no cross-response leakage, model checks, bad
input. The oracle is the model run on each unpacked row ``[prompt, response]`` alone (batch of one, no
padding), scored with a plain log_softmax."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from prefrank.packing import PackedPrompts, check_model, pack_shared_prompt

V = 97
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def tiny_text_model(kind, attn, dtype=torch.float32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config,
                                                                                         Qwen2ForCausalLM)
    config = config_class(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          attn_implementation=attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return exact_rotary(sharpen_attention(model).to(dtype))


@torch.no_grad()
def sharpen_attention(model, factor=20.0):
    """Random init (std 0.02) gives near-uniform attention, where positions barely matter and a wrong mask
    moves little. Scaled query/key projections give peaked, position-sensitive attention."""
    for name, parameter in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            parameter.mul_(factor)
    return model


def exact_rotary(model):
    """A float64 model computed in float64 throughout. transformers computes the rotary cos/sin and the
    RMSNorm statistics in float32 whatever the model dtype (and eager attention's softmax too, so eager is
    tested in float32 only). Float32 intermediates make packed and unpacked rows differ by ~1e-8: the
    vectorised and scalar-tail float32 cos differ in the last ulp across layouts, and the shared prompt's
    gradient is rounded to float32 once per response unpacked but once in total packed. Here those modules
    compute in float64, so the fp64 bound tests the packing, not transformers' float32 islands."""
    if next(model.parameters()).dtype != torch.float64:
        return model
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RotaryEmbedding") and hasattr(module, "inv_freq"):
            def rotary(x, position_ids, module=module):
                freqs = position_ids[..., None].double() * module.inv_freq.double()
                emb = torch.cat((freqs, freqs), dim=-1)
                return ((emb.cos() * module.attention_scaling).to(x.dtype),
                        (emb.sin() * module.attention_scaling).to(x.dtype))
            module.forward = rotary
        elif name.endswith("RMSNorm"):
            def norm(x, module=module):
                return module.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
            module.forward = norm
    return model


def random_problem(generator, B, prompt_lengths=(1, 9), response_lengths=(1, 6), K=(1, 4), vocab=V):
    def ids(n):
        return torch.randint(0, vocab, (n,), generator=generator).tolist()

    def length(bounds):
        return int(torch.randint(bounds[0], bounds[1] + 1, (), generator=generator))

    prompts = [ids(length(prompt_lengths)) for _ in range(B)]
    responses = [[ids(length(response_lengths)) for _ in range(length(K))] for _ in range(B)]
    return prompts, responses


def unpacked_logps(model, prompts, responses, extras=None):
    """(B, K) oracle: one forward per row [prompt, response], log_softmax gathered in float64."""
    K = max(len(r) for r in responses)
    out = torch.zeros(len(prompts), K, dtype=torch.float64)
    rows = []
    for b, (prompt, row) in enumerate(zip(prompts, responses)):
        for k, response in enumerate(row):
            device = next(model.parameters()).device
            ids = torch.tensor([prompt + response], device=device)
            kwargs = {key: value[b:b + 1] for key, value in (extras or {}).items()}
            logits = model(input_ids=ids, use_cache=False, **kwargs).logits[0]
            logp = logits[len(prompt) - 1:-1].double().log_softmax(-1)
            rows.append(((b, k), logp.gather(-1, torch.tensor(response, device=device)[:, None]).sum().cpu()))
    for (b, k), value in rows:
        out[b, k] = value
    return out, rows


def weights_for(mask, generator):
    return torch.randn(mask.shape, generator=generator, dtype=torch.float64) * mask


def grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(packed, unpacked, tolerance, noise=None):
    """Per parameter ‖packed − unpacked‖ ≤ tolerance·‖unpacked‖ + 4·noise. ``noise`` (fp32 only): per parameter
    ‖g_fp32 − g_fp64‖ of the unpacked oracle itself, i.e. fp32's own error on that gradient (a deep
    vision-tower weight can sit above 1e-5 relative from rounding alone). A parameter
    whose gradient is zero in exact arithmetic (CLIP's key bias: softmax ignores a per-query shift) holds
    rounding noise on both sides: it must stay below 1e-6 of the whole gradient's norm instead."""
    assert packed.keys() == unpacked.keys()
    total = torch.cat([g.double().flatten() for g in unpacked.values()]).norm()
    for name, expected in unpacked.items():
        expected_norm = expected.double().norm()
        if expected_norm <= 1e-6 * total:
            assert packed[name].double().norm() <= 1e-6 * total, name
            continue
        error = (packed[name].double() - expected.double()).norm()
        floor = 0.0 if noise is None else 4 * noise[name]
        assert error <= tolerance * expected_norm + floor, (name, error, expected_norm, floor)


def check_equal(model, prompts, responses, dtype, padding_side, generator, extras=None, fused=False):
    """Packed vs unpacked log-probs and parameter gradients of Σ w·logps (random w)."""
    tolerance = TOLERANCE[dtype]
    packed = pack_shared_prompt(prompts, responses, pad_token_id=0, padding_side=padding_side)
    weights = weights_for(packed.mask, generator)

    model.zero_grad(set_to_none=True)
    expected, rows = unpacked_logps(model, prompts, responses, extras)
    sum(weights[b, k] * value for (b, k), value in rows).backward()
    expected_grads = grads(model)
    noise = None
    if dtype == torch.float32:  # fp32's own error of the oracle: the same unpacked gradient in float64
        model64 = copy.deepcopy(model).double()
        extras64 = {k: v.double() if v.is_floating_point() else v for k, v in (extras or {}).items()}
        _, rows64 = unpacked_logps(model64, prompts, responses, extras64)
        sum(weights[b, k] * value for (b, k), value in rows64).backward()
        exact = grads(model64)
        noise = {name: (g.double() - exact[name]).norm() for name, g in expected_grads.items()}

    model.zero_grad(set_to_none=True)
    inputs = packed.model_inputs(use_cache=False, mask_dtype=dtype, **(extras or {}))
    if fused:
        hidden = model.model(**inputs).last_hidden_state
        head = model.get_output_embeddings()
        logps = packed.linear_sequence_logprobs(hidden, head.weight, bias=head.bias)
    else:
        logps = packed.sequence_logprobs(model(**inputs).logits)
    assert logps.shape == packed.mask.shape
    assert logps.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not logps.isnan().any()
    assert (logps[~packed.mask] == 0).all()
    torch.testing.assert_close(logps.double(), expected, rtol=tolerance, atol=tolerance)
    (weights.to(logps.dtype) * logps).sum().backward()
    assert_grads_close(grads(model), expected_grads, tolerance, noise)


# eager attention's softmax runs in float32 even in a float64 model (transformers): eager in float32 only
SETTINGS = [("sdpa", torch.float32), ("eager", torch.float32), ("sdpa", torch.float64)]
SETTING_IDS = ["sdpa-fp32", "eager-fp32", "sdpa-fp64"]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn, dtype", SETTINGS, ids=SETTING_IDS)
def test_text_models_packed_equals_unpacked(kind, attn, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    model = tiny_text_model(kind, attn, dtype, seed)
    # ragged K (1..4), ragged prompts (1..9) and responses (1..6): K = 1 and length-1 responses included
    prompts, responses = random_problem(generator, B=3)
    responses[0] = [responses[0][0]]  # K = 1
    responses[1][0] = responses[1][0][:1]  # a response of length 1
    for padding_side in ("right", "left"):
        check_equal(model, prompts, responses, dtype, padding_side, generator)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_lm_head_path(kind, seed):
    generator = torch.Generator().manual_seed(seed)
    model = tiny_text_model(kind, "sdpa", torch.float64, seed)
    prompts, responses = random_problem(generator, B=3)
    check_equal(model, prompts, responses, torch.float64, "left", generator, fused=True)


def tiny_llava(attn, dtype):
    from prefrank.train.model import build_tiny_vlm

    vlm = build_tiny_vlm(seed=3)
    vlm.model.set_attn_implementation(attn)
    exact_rotary(sharpen_attention(vlm.model).to(dtype))
    return vlm


@pytest.mark.parametrize("attn, dtype", SETTINGS, ids=SETTING_IDS)
def test_llava_packed_equals_unpacked(attn, dtype, seed):
    """One image per prompt, encoded once: the prompt's expanded image tokens keep their positions/mask."""
    generator = torch.Generator().manual_seed(seed)
    vlm = tiny_llava(attn, dtype)
    questions = ["What colour is the square?", "How many?", "Where is it?"]
    images = [Image.fromarray(np.asarray(torch.randint(0, 256, (32, 32, 3), generator=generator),
                                         dtype=np.uint8)) for _ in questions]
    encoded = [vlm.encode_prompt(image, q) for image, q in zip(images, questions)]
    prompts = [e["input_ids"][0].tolist() for e in encoded]
    vocab = vlm.model.get_input_embeddings().num_embeddings
    image_token = vlm.model.config.image_token_id
    _, responses = random_problem(generator, B=3, K=(1, 4), vocab=vocab)
    responses = [[[t if t != image_token else 1 for t in r] for r in row] for row in responses]
    responses[2] = [[vlm.tokenizer.eos_token_id]]  # K = 1, length 1
    pixel_values = torch.cat([e["pixel_values"] for e in encoded]).to(dtype)
    for padding_side, fused in (("right", False), ("left", True)):
        check_equal(vlm.model, prompts, responses, dtype, padding_side, generator,
                    extras={"pixel_values": pixel_values}, fused=fused)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_no_cross_response_leakage(attn, seed):
    """Changing response j (same length or not) leaves every other response's log-probs unchanged."""
    generator = torch.Generator().manual_seed(seed)
    model = tiny_text_model("llama", attn, torch.float32, seed).eval()
    prompts, responses = random_problem(generator, B=2, K=(3, 4), response_lengths=(2, 6))
    with torch.no_grad():
        base = pack_shared_prompt(prompts, responses, pad_token_id=0)
        before = base.sequence_logprobs(model(**base.model_inputs()).logits)
        for j, replacement_length in ((1, len(responses[0][1])), (0, 3)):
            changed = [[list(r) for r in row] for row in responses]
            changed[0][j] = torch.randint(0, V, (replacement_length,), generator=generator).tolist()
            packed = pack_shared_prompt(prompts, changed, pad_token_id=0)
            after = packed.sequence_logprobs(model(**packed.model_inputs()).logits)
            others = torch.ones_like(base.mask)
            others[0, j] = False
            others &= base.mask
            torch.testing.assert_close(after[others], before[others], rtol=1e-6, atol=1e-6)
            assert not torch.allclose(after[0, j], before[0, j])


def test_mask_layout():
    packed = pack_shared_prompt([[5, 6, 7]], [[[8, 9], [10]]], pad_token_id=0, padding_side="left")
    # one row: prompt[:-1] | 7 8 9 | 7 10 — no padding (a single row fills its width)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 7, 10]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    assert packed.labels.tolist() == [[-100, -100, 8, 9, -100, 10, -100]]
    assert packed.segment_ids.tolist() == [[-1, -1, 0, 0, -1, 1, -1]]
    visible = packed.attention_mask()[0, 0] == 0
    expected = torch.tensor([[1, 0, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 1, 0, 0],
                             [1, 1, 0, 0, 0, 1, 0],
                             [1, 1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(visible, expected)
    two = pack_shared_prompt([[5], [1, 2, 3]], [[[8]], [[4], [6]]], pad_token_id=0, padding_side="left")
    assert two.input_ids.tolist() == [[0, 0, 0, 0, 5, 8], [1, 2, 3, 4, 3, 6]]
    pad_rows = two.attention_mask()[0, 0] == 0
    assert torch.equal(pad_rows[:4], torch.eye(6, dtype=torch.bool)[:4])  # padding sees only itself
    assert two.mask.tolist() == [[True, False], [True, True]]


def test_check_model_accepts_supported_models():
    for kind in ("llama", "qwen2"):
        for attn in ("sdpa", "eager"):
            check_model(tiny_text_model(kind, attn))


def test_check_model_rejects_flash_attention():
    model = tiny_text_model("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"  # flash-attn is not installed on CPU test hosts
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.*flash_attention_2.*attn_implementation='sdpa'"):
        check_model(model)


class DropsTheMask(torch.nn.Module):
    """A model that builds its own causal mask (ignores the packed one): check_model must catch it."""

    def __init__(self, inner, drop):
        super().__init__()
        self.inner, self.drop = inner, drop

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        if self.drop == "mask":
            attention_mask = None
        else:
            position_ids = None
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          **kwargs)


@pytest.mark.parametrize("drop", ["mask", "positions"])
def test_check_model_probe_catches_a_model_that_ignores_the_packing(drop):
    model = DropsTheMask(tiny_text_model("llama", "sdpa"), drop)
    with pytest.raises(ValueError, match="DropsTheMask"):
        check_model(model)


def test_check_model_rejects_multimodal_rope():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
                           vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2))
    with pytest.raises(ValueError, match="Qwen2VLForConditionalGeneration.*(RoPE|position ids)"):
        check_model(Qwen2VLForConditionalGeneration(config))


@pytest.mark.parametrize("prompts, responses, kwargs, match", [
    ([[1, 2]], [[[3], []]], {}, r"responses\[0\]\[1\] is empty"),
    ([[1, 2], [3]], [[[3]], []], {}, r"responses\[1\] is empty.*K = 0"),
    ([[]], [[[3]]], {}, r"prompts\[0\] is empty"),
    ([[1, 2]], [[[3, 99]]], {"vocab_size": 50}, r"responses\[0\]\[0\].*99.*vocabulary"),
    ([[1, 200]], [[[3]]], {"vocab_size": 50}, r"prompts\[0\].*200"),
    ([[1, 2]], [[[3]]], {"vocab_size": 3}, r"responses\[0\]\[0\] holds token id 3"),
    ([[1, -2]], [[[3]]], {}, r"prompts\[0\] holds a negative"),
    ([[1, 2]], [[[3]]], {"pad_token_id": -1}, r"pad_token_id holds a negative"),
    ([[1, 2]], [[[3, -100]]], {}, r"responses\[0\]\[0\] contains ignore_index"),
    ([[1, 2]], [[[3]], [[4]]], {}, r"one list per prompt"),
    ([], [], {}, r"prompts is empty"),
    ([[1, 2]], [[[3]]], {"padding_side": "middle"}, r"padding_side"),
])
def test_bad_input_raises_value_error(prompts, responses, kwargs, match):
    kwargs = {"pad_token_id": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        pack_shared_prompt(prompts, responses, **kwargs)


@pytest.mark.parametrize("prompts, responses, kwargs, match", [
    ([[1, 2.5]], [[[3]]], {"pad_token_id": 0}, r"prompts\[0\]\[1\] must be an int"),
    ([[1, 2]], [[[3]]], {"pad_token_id": 0.0}, r"pad_token_id"),
    ([[1, 2]], [["abc"]], {"pad_token_id": 0}, r"responses\[0\]\[0\]"),
    ([torch.tensor([1.0, 2.0])], [[[3]]], {"pad_token_id": 0}, r"prompts\[0\].*integer"),
])
def test_bad_types_raise_type_error(prompts, responses, kwargs, match):
    with pytest.raises(TypeError, match=match):
        pack_shared_prompt(prompts, responses, **kwargs)


def test_out_of_vocabulary_against_logits_and_weight():
    packed = pack_shared_prompt([[1, 2]], [[[3, 40]]], pad_token_id=0)
    logits = torch.randn(1, packed.input_ids.shape[1], 32)
    with pytest.raises(ValueError, match=r"token id 40.*logits \(V = 32\)"):
        packed.sequence_logprobs(logits)
    hidden = torch.randn(1, packed.input_ids.shape[1], 8)
    with pytest.raises(ValueError, match=r"token id 40.*weight \(V = 32\)"):
        packed.linear_sequence_logprobs(hidden, torch.randn(32, 8))
    with pytest.raises(ValueError, match=r"logits must be \(B, L, ·\)"):
        packed.sequence_logprobs(torch.randn(2, 3, 64))


def test_model_inputs_extras_pass_through_and_clashes_raise():
    packed = pack_shared_prompt([[1, 2]], [[[3]]], pad_token_id=0)
    pixels = torch.randn(1, 3, 4, 4)
    inputs = packed.model_inputs(pixel_values=pixels)
    assert inputs["pixel_values"] is pixels
    assert inputs["attention_mask"].shape == (1, 1, 3, 3) and inputs["attention_mask"].dtype == torch.float32
    with pytest.raises(ValueError, match="position_ids"):
        packed.model_inputs(position_ids=None)


def test_inputs_are_not_modified_and_tensors_accepted():
    prompts = [torch.tensor([4, 5, 6])]
    responses = [[[7, 8], torch.tensor([9])]]
    packed = pack_shared_prompt(prompts, responses, pad_token_id=0)
    assert isinstance(packed, PackedPrompts)
    assert prompts[0].tolist() == [4, 5, 6] and responses[0][0] == [7, 8]
    assert packed.response_lengths.tolist() == [[2, 1]]


def test_float64_logits_need_a_float64_mask():
    """torch's CPU sdpa misreads a float32 mask under float64 queries: refuse instead of a wrong result."""
    packed = pack_shared_prompt([[1, 2]], [[[3]]], pad_token_id=0)
    packed.model_inputs()
    logits = torch.randn(1, packed.input_ids.shape[1], 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"mask_dtype=torch.float64"):
        packed.sequence_logprobs(logits)
    assert packed.model_inputs(mask_dtype=torch.float64)["attention_mask"].dtype == torch.float64
    packed.sequence_logprobs(logits)


# ---------------------------------------------------------------------------------------------------------
# Trainer: packed by default for the methods whose responses share their prompt, same step either way
# ---------------------------------------------------------------------------------------------------------

def _trainer(tmp_path, method, pack, **overrides):
    from prefrank.train.config import TrainConfig
    from prefrank.train.loop import Trainer

    values = dict(method=method, out=str(tmp_path / f"{method}-{pack}"), steps=2, batch_size=4, num_train=8,
                  num_eval=4, num_negatives=2, lr=1e-2, progress=False, pack_prompts=pack)
    values.update(overrides)
    return Trainer(TrainConfig(**values))


@pytest.mark.parametrize("method, reference", [("listwise", "model"), ("smpro", "precomputed"),
                                               ("dpo", "model"), ("sft", "model")])
def test_trainer_steps_equal_packed_and_unpacked(tmp_path, capsys, method, reference):
    """Step-1 loss and gradient norm equal with packing on and off; step 2 (policy ≠ reference after one
    AdamW step, so the rewards and the loss are not constants) too. Reference model or precomputed."""
    packed = _trainer(tmp_path, method, "auto", reference=reference)
    assert packed.packed
    assert f"{method} runs packed" in capsys.readouterr().out
    unpacked = _trainer(tmp_path, method, "off", reference=reference)
    assert not unpacked.packed
    assert f"{method} runs unpacked (pack_prompts='off')" in capsys.readouterr().out
    for _ in range(2):
        on, off = packed.train_step(), unpacked.train_step()
        assert on.keys() == off.keys()
        for key in on:
            assert on[key] == pytest.approx(off[key], rel=1e-4, abs=1e-6, nan_ok=True), key
    # (the weights themselves are not compared: AdamW's first step divides by |g|, so a parameter whose
    # exact gradient is 0 — CLIP's key bias — moves by rounding noise, differently in either layout)


def test_trainer_misp_dpo_stays_unpacked(tmp_path, capsys):
    trainer = _trainer(tmp_path, "misp_dpo", "on")
    assert not trainer.packed
    assert "misp_dpo runs unpacked (misp_dpo scores one response under several images" in capsys.readouterr().out
    assert trainer.train_step()["grad_norm"] > 0


def test_trainer_pack_on_raises_for_a_model_that_cannot(tmp_path, monkeypatch):
    from prefrank.train import loop

    def refuse(model):
        raise ValueError(f"{type(model).__name__} runs attn_implementation='flash_attention_2'")

    monkeypatch.setattr(loop, "check_model", refuse)
    with pytest.raises(ValueError, match="flash_attention_2"):
        _trainer(tmp_path, "listwise", "on")
    assert not _trainer(tmp_path, "listwise", "auto").packed  # auto falls back, saying why


def test_pack_prompts_flag():
    from prefrank.train.config import parse_args

    assert parse_args(["--method", "smpro"]).pack_prompts == "auto"
    assert parse_args(["--method", "smpro", "--pack-prompts", "off"]).pack_prompts == "off"
    with pytest.raises(SystemExit):
        parse_args(["--pack-prompts", "maybe"])


@pytest.mark.cuda
def test_flex_attention_block_mask_forward(seed):
    """attn_implementation="flex_attention" with the packed BlockMask (forward). CUDA only: on CPU
    transformers compiles flex attention once per sequence length (passes, but ~6 minutes on 2 cores)."""
    generator = torch.Generator().manual_seed(seed)
    model = tiny_text_model("llama", "flex_attention", torch.float32, seed).eval().cuda()
    prompts, responses = random_problem(generator, B=2, K=(2, 3))
    packed = pack_shared_prompt(prompts, responses, pad_token_id=0, padding_side="left").to("cuda")
    with torch.no_grad():
        logits = model(**packed.model_inputs(block_mask=True, use_cache=False)).logits
        logps = packed.sequence_logprobs(logits).cpu()
        expected, _ = unpacked_logps(model, prompts, responses)
    torch.testing.assert_close(logps.double(), expected, rtol=1e-4, atol=1e-4)
