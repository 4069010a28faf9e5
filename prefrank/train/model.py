"""The policy: a tiny offline LLaVA built from configs, or any local transformers image-text-to-text model.

`VisionLanguageModel` hides the processor: it turns (image, question) into prompt tensors, responses into
completion token ids, packs (prompt, response) pairs into a right-padded batch with completion-only labels,
and generates answers; `collate_packed` lays each prompt out once followed by all of its responses
(prefrank.packing: one forward of the prompt and its image serves the K responses). `SequenceScorer` is
the nn.Module that DDP/FSDP wrap: backbone hidden states → the lm_head weight → `linear_sequence_logprobs`
on the completion tokens only (never full-vocabulary logits).
"""

import torch
from torch import nn

from prefrank.packing import pack_shared_prompt
from prefrank.train.api import linear_sequence_logprobs

IGNORE_INDEX = -100
TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>")


def task_corpus():
    """Text the built-in tokenizer's merges are learnt from: the synthetic task's questions and answers."""
    from prefrank.train.data import TASKS

    corpus = ["Question: Answer: "] * 8
    for templates, answers in TASKS.values():
        corpus += list(templates) * 4 + list(answers) * 8 + [" " + answer for answer in answers] * 4
    return corpus


def build_tokenizer(corpus=None, vocab_size=400):
    """A byte-level BPE tokenizer trained in code (no download) on `corpus` (default: the synthetic task's
    text, so every answer is ONE token: preference losses then act on the answer decision instead of
    pushing around sub-word pieces shared by different answers). Any text still encodes, byte by byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(TINY_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(task_corpus() if corpus is None else corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def build_tiny_vlm(seed=0, image_size=32, patch_size=8, text_hidden=64, text_layers=2, vision_hidden=32,
                   vision_layers=2):
    """A randomly initialised LLaVA (CLIP vision tower + Llama text model) and its processor. The image
    processor is the PIL one, so torchvision is not needed. Returns a `VisionLanguageModel`."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                       num_hidden_layers=vision_layers, num_attention_heads=4,
                                       image_size=image_size, patch_size=patch_size),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_hidden,
                                intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return VisionLanguageModel(model, processor)


def load_vlm(path):
    """Any local transformers image-text-to-text model folder with its processor (no network access)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    if model.generation_config.pad_token_id is None:
        tokenizer = processor.tokenizer
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    return VisionLanguageModel(model, processor)


class VisionLanguageModel:
    """A transformers VLM + its processor, with the encoding the trainer needs."""

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the model's tokenizer has no eos_token: responses could not be terminated")

    def prompt_text(self, question):
        if getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image_token = getattr(self.processor, "image_token", "<image>")
        return f"{image_token}\nQuestion: {question}\nAnswer: "

    def encode_prompt(self, image, question):
        """Processor output for one (image, question), batch dim 1: input_ids, attention_mask, any per-token
        keys (e.g. Qwen2-VL's mm_token_type_ids) and the image tensors (pixel_values, image_grid_thw …)."""
        encoded = self.processor(text=[self.prompt_text(question)], images=[image], return_tensors="pt")
        return {key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)}

    def encode_response(self, text):
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return [*ids, self.tokenizer.eos_token_id]

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def pad_id(self):
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens=8, device="cpu", **generate_kwargs):
        """Answers (decoded, stripped) for a list of encoded prompts: greedy by default; `generate_kwargs` go
        to HF `generate` (e.g. do_sample=True, temperature=0.8, num_return_sequences=4: the answers of one
        prompt are then consecutive)."""
        batch = {k: v.to(device) for k, v in left_pad(self.pad_id, prompts).items()}
        was_training = self.model.training
        self.model.eval()
        options = {"do_sample": False, **generate_kwargs}
        output = self.model.generate(**batch, max_new_tokens=max_new_tokens, **options)
        self.model.train(was_training)
        return [self.decode(row[batch["input_ids"].shape[1]:]).strip() for row in output]

    def save(self, directory):
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)


def collate(pad_id, prompts, responses):
    """Pack sequence i = prompts[i] + responses[i] (right-padded). `labels[t]` is the token at t+1 when
    that token belongs to the response, else IGNORE_INDEX, so hidden state t scores it."""
    lengths = [p["input_ids"].shape[1] + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(lengths)
    token_keys = _token_keys(prompts[0])
    batch = {k: torch.zeros(len(prompts), width, dtype=prompts[0][k].dtype) for k in token_keys}
    batch["input_ids"].fill_(pad_id)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        prompt_len = prompt["input_ids"].shape[1]
        for key in token_keys:
            batch[key][row, :prompt_len] = prompt[key][0]
        response_ids = torch.tensor(response, dtype=torch.long)
        batch["input_ids"][row, prompt_len:prompt_len + len(response)] = response_ids
        batch["attention_mask"][row, :prompt_len + len(response)] = 1
        labels[row, prompt_len - 1:prompt_len + len(response) - 1] = response_ids
    for key in prompts[0]:
        if key not in token_keys:
            batch[key] = torch.cat([p[key] for p in prompts], dim=0)
    return batch, labels


def collate_packed(pad_id, prompts, responses):
    """One row per prompt: the prompt once, then its K_b responses (prefrank.packing.pack_shared_prompt:
    4-D attention mask, position ids continued from the prompt's end). `responses[b]` = token id lists of
    prompt b's responses. Returns (inputs, labels, segments, mask): labels and segments
    (`segment_ids`, `num_segments`: slot b·K + k) for `linear_sequence_logprobs`, mask (B, K) of real slots.
    Image tensors (pixel_values …) are concatenated, one per prompt: each image is encoded once."""
    token_keys = _token_keys(prompts[0])
    per_token_extras = sorted(set(token_keys) - {"input_ids", "attention_mask"})
    if per_token_extras:
        raise ValueError(f"cannot pack prompts with per-token inputs {per_token_extras}: run unpacked "
                         "(pack_prompts='off')")
    for index, prompt in enumerate(prompts):
        if "attention_mask" in prompt and not bool(prompt["attention_mask"].all()):
            raise ValueError(f"prompt {index} is padded (attention_mask has zeros): pass unpadded prompts")
    packed = pack_shared_prompt([p["input_ids"][0] for p in prompts], responses, pad_token_id=pad_id)
    images = {key: torch.cat([p[key] for p in prompts], dim=0) for key in prompts[0] if key not in token_keys}
    segments = {"segment_ids": packed.segment_ids, "num_segments": packed.num_segments}
    return packed.model_inputs(**images), packed.labels, segments, packed.mask


def left_pad(pad_id, prompts):
    """Prompts left-padded for batched generation."""
    width = max(p["input_ids"].shape[1] for p in prompts)
    token_keys = _token_keys(prompts[0])
    batch = {k: torch.zeros(len(prompts), width, dtype=prompts[0][k].dtype) for k in token_keys}
    batch["input_ids"].fill_(pad_id)
    for row, prompt in enumerate(prompts):
        length = prompt["input_ids"].shape[1]
        for key in token_keys:
            batch[key][row, width - length:] = prompt[key][0]
    for key in prompts[0]:
        if key not in token_keys:
            batch[key] = torch.cat([p[key] for p in prompts], dim=0)
    return batch


def _token_keys(prompt):
    """Keys with one entry per token (input_ids, attention_mask, mm_token_type_ids …), padded with the ids."""
    length = prompt["input_ids"].shape[1]
    return [key for key, value in prompt.items() if value.dim() == 2 and value.shape[1] == length]


def backbone_of(model):
    """The multimodal backbone that returns last_hidden_state (everything but the lm_head)."""
    backbone = getattr(model, "model", None)
    if backbone is None:
        raise TypeError(f"{type(model).__name__} has no `.model` backbone: the trainer needs hidden states "
                        "and the lm_head separately to compute completion log-probs")
    return backbone


class SequenceScorer(nn.Module):
    """Summed completion log-probs of a batch (rows of `collate`, or `collate_packed` with its segments): the
    module DDP / FSDP wrap, so that the whole forward (backbone + lm_head weight) runs inside the wrapper's
    forward. Returns one log-prob per row, or per segment slot when `segment_ids` is given."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs, labels, segment_ids=None, num_segments=None):
        hidden = backbone_of(self.model)(**inputs, use_cache=False).last_hidden_state
        head = self.model.get_output_embeddings()
        return linear_sequence_logprobs(hidden, head.weight, labels, bias=head.bias, segment_ids=segment_ids,
                                        num_segments=num_segments)
