"""Self-generated preference data in the reference trainer (issue 7): SMPRO groups and MISP-DPO negatives.

Switched on by ``TrainConfig.self_generate`` ("offline" | "online"; "off" keeps the records' own groups) for
``--method smpro`` and ``--method misp_dpo``; options in ``TrainConfig.selfpref`` (:class:`SelfPrefOptions`).

SMPRO (papers.md §2.3): the policy answers every training (image, question) greedily and ``num_samples``
times at ``temperature`` on the clean image (positive group) and greedily on corrupted views of increasing
severity (SeVa diffusion noise at t = 500/800/950 by default, or patch shuffle / blur) → negative groups;
``prefrank.train.preference_groups`` builds the groups, every candidate is scored on the clean image, and the
loss is ``prefrank.losses.smpro_loss``. Prompts whose negatives all equal a positive carry no ranking signal
and are dropped (SeVa's chosen == rejected filter). "offline": one round before training, cached as
``<out>/selfpref/round_0000.jsonl``; "online": a new round from the current policy every ``regenerate_every``
steps (``round_<k>.jsonl``; a resumed run reloads the round it was in instead of regenerating it).
``selfpref.cache`` = a round JSONL of an earlier run to train on without generating.

MISP-DPO (papers.md §3.3–3.4): a gallery of ``pool_size`` images (the synthetic generator with ``pool_seed``,
or every image of ``pool_folder``); per record, the gallery minus the images on which the policy itself gives
the record's best answer (our choice: such an image supports y_p, so it is no negative for it), then the
``candidates_per_record`` most similar ones (the paper's CLIP-retrieval step; all of them for a record with
fewer allowed images: candidate sets differ in size and are masked, not cut to the smallest); joint embeddings from the
policy's own vision tower (mean of the projected image tokens) and token embeddings (mean over the
question's tokens), randomly projected to ``proj_dim`` per side; one sparse autoencoder fitted on every
(record, candidate) difference vector; K = ``TrainConfig.num_negatives`` negatives per record picked by
``prefrank.negatives.select_negatives`` with their log q (over the record's candidates) for the importance
correction. Text side: the record's best response vs the policy's greedy
answer on the first selected negative image (the record's worst response when the two coincide). Loss:
``prefrank.losses.misp_dpo_loss``. Selection happens once, from the initial policy ("offline"; "online" is
SMPRO-only).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from prefrank import negatives as neg
from prefrank.train.corruptions import FAMILIES, corruption_ladder
from prefrank.train.data import PreferenceRecord, synthetic_dataset
from prefrank.train.model import left_pad
from prefrank.train.preference_groups import (
    GroupRecord,
    generate_group_records,
    load_records_jsonl,
    normalize_answer,
    save_records_jsonl,
)

MODES = ("off", "offline", "online")


@dataclass
class SelfPrefOptions:
    # SMPRO group generation
    num_samples: int = 2  # sampled answers on the clean image (besides the greedy one)
    temperature: float = 1.0
    negative_samples: int = 0  # sampled answers per corrupted view (besides the greedy one)
    corruption: str = "diffusion"  # diffusion | patch_shuffle | blur
    severities: list | None = None  # None = the family's default ladder
    max_per_group: int | None = None
    generation_batch_size: int = 64
    cache: str | None = None  # offline: load this round-0 JSONL (written by an earlier run) instead of generating
    # MISP-DPO negative selection
    pool_size: int = 64
    pool_seed: int = 7
    pool_folder: str | None = None
    candidates_per_record: int | None = 16  # retrieval: the most similar allowed pool images (None = all)
    exclude_supporting: bool = True  # drop pool images on which the policy answers the record's best response
    proj_dim: int = 16
    sae_latents: int = 128
    sae_steps: int = 200
    sae_rho: float = 0.05
    sae_gamma: float = 1.0
    diversity_weight: float = 1.0
    tau: float = 1.0
    selection: str = "greedy"  # greedy | sample | uniform (MISP-DPO's "Random" baseline: log_q = None)
    seed: int = 0

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"selfpref: unknown option(s) {unknown}; known: {sorted(known)}")
        options = cls(**values)
        if options.corruption not in FAMILIES:
            raise ValueError(f"selfpref.corruption must be one of {sorted(FAMILIES)}, got {options.corruption!r}")
        if options.selection not in ("greedy", "sample", "uniform"):
            raise ValueError(f"selfpref.selection must be greedy|sample|uniform, got {options.selection!r}")
        for name in ("num_samples", "negative_samples"):
            if getattr(options, name) < 0:
                raise ValueError(f"selfpref.{name} must be >= 0, got {getattr(options, name)}")
        for name in ("generation_batch_size", "pool_size", "proj_dim", "sae_latents", "sae_steps"):
            if getattr(options, name) < 1:
                raise ValueError(f"selfpref.{name} must be >= 1, got {getattr(options, name)}")
        if options.candidates_per_record is not None and options.candidates_per_record < 1:
            raise ValueError("selfpref.candidates_per_record must be >= 1 or None, got "
                             f"{options.candidates_per_record}")
        if not options.temperature > 0:
            raise ValueError(f"selfpref.temperature must be > 0, got {options.temperature}")
        return options


# ------------------------------------------------------------------------------------------------------------
# Generation with the policy
# ------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_answers(vlm, prompts, *, do_sample=False, temperature=1.0, seed=0, max_new_tokens=8,
                     device="cpu", batch_size=64):
    """Answers (decoded, stripped) for encoded prompts; sampling is seeded by ``seed`` (pure softmax sampling at
    ``temperature``: no top-k/top-p truncation) and leaves the global RNG untouched."""
    answers = []
    was_training = vlm.model.training
    vlm.model.eval()
    device = torch.device(device)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                batch = {k: v.to(device) for k, v in left_pad(vlm.pad_id, prompts[start:start + batch_size]).items()}
                options = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample \
                    else dict(do_sample=False)
                output = vlm.model.generate(**batch, max_new_tokens=max_new_tokens, **options)
                answers += [vlm.decode(row[batch["input_ids"].shape[1]:]).strip() for row in output]
    finally:
        vlm.model.train(was_training)
    return answers


def _with_pixels(prompt, pixels):
    return {**prompt, "pixel_values": pixels}


def smpro_round(vlm, records, options, *, seed, max_new_tokens, device):
    """One SMPRO generation round over ``records`` → GroupRecords (``image`` = record index)."""
    ladder = corruption_ladder(options.corruption, options.severities)
    prompts = [vlm.encode_prompt(r.image, r.question) for r in records]
    if any("pixel_values" not in p for p in prompts):
        raise ValueError("SMPRO self-generation corrupts the processor's pixel_values; this model's processor "
                         "gives none")
    generator = torch.Generator().manual_seed(seed)

    def generator_for(chunk_prompts):
        def generate(views, questions, do_sample, temperature, generator):
            batch_prompts = [_with_pixels(p, v) for p, v in zip(chunk_prompts, views, strict=True)]
            draw_seed = int(torch.randint(2**62, (1,), generator=generator))
            return generate_answers(vlm, batch_prompts, do_sample=do_sample, temperature=temperature,
                                    seed=draw_seed, max_new_tokens=max_new_tokens, device=device,
                                    batch_size=options.generation_batch_size)
        return generate

    out = []
    step = options.generation_batch_size
    for start in range(0, len(records), step):
        chunk = list(range(start, min(start + step, len(records))))
        chunk_prompts = [prompts[i] for i in chunk]
        out += generate_group_records(
            generator_for(chunk_prompts), [p["pixel_values"] for p in chunk_prompts],
            [records[i].question for i in chunk], chunk, ladder, num_samples=options.num_samples,
            temperature=options.temperature, negative_samples=options.negative_samples,
            max_per_group=options.max_per_group, generator=generator)
    return out


def records_from_groups(base_records, group_records):
    """Trainer records from generated groups (``image`` = index into ``base_records``), dropping prompts
    without a negative group (SeVa's chosen == rejected filter); may be empty."""
    out = []
    for g in group_records:
        index = int(g.image)
        if not 0 <= index < len(base_records):
            raise ValueError(f"selfpref: group record image={g.image!r} is not an index of the {len(base_records)} "
                             "training records (was the cache made with another data config?)")
        if g.num_levels < 2:
            continue
        base = base_records[index]
        out.append(PreferenceRecord(image=base.image, question=base.question, responses=list(g.responses),
                                    groups=list(g.groups), answer=base.answer))
    return out


# ------------------------------------------------------------------------------------------------------------
# MISP-DPO negatives from the policy's own encoders
# ------------------------------------------------------------------------------------------------------------

def policy_encoders(vlm, device):
    """(image_encoder, text_encoder) callables from the policy: mean of the projected image tokens
    (``get_image_features``) and mean of the question's token embeddings."""
    model = vlm.model

    @torch.no_grad()
    def image_encoder(prompts):
        features = []
        for prompt in prompts:
            inputs = {k: v.to(device) for k, v in prompt.items() if k in ("pixel_values", "image_sizes")}
            out = model.get_image_features(**inputs)
            out = getattr(out, "pooler_output", out)
            tokens = torch.cat([t.reshape(-1, t.shape[-1]) for t in out]) if isinstance(out, (list, tuple)) \
                else out.reshape(-1, out.shape[-1])
            features.append(tokens.float().mean(0))
        return torch.stack(features).cpu()

    @torch.no_grad()
    def text_encoder(questions):
        table = model.get_input_embeddings()
        rows = []
        for question in questions:
            ids = vlm.tokenizer(question, add_special_tokens=False)["input_ids"]
            rows.append(table(torch.tensor(ids, device=table.weight.device)).float().mean(0))
        return torch.stack(rows).cpu()

    return image_encoder, text_encoder


def candidate_pool(options):
    """The MISP-DPO candidate images: every image in ``pool_folder`` (sorted), else ``pool_size`` synthetic
    images from ``pool_seed``."""
    if options.pool_folder is None:
        return [r.image for r in synthetic_dataset(options.pool_size, options.pool_seed)]
    from PIL import Image

    paths = sorted(p for p in Path(options.pool_folder).iterdir()
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if not paths:
        raise ValueError(f"selfpref.pool_folder={options.pool_folder!r} holds no images")
    return [Image.open(p).convert("RGB") for p in paths]


def _pool_answers(vlm, pool, questions, pairs, options, *, max_new_tokens, device):
    """The policy's greedy answer for each (pool index, question index) pair in ``pairs`` (deduplicated)."""
    pairs = sorted(set(pairs))
    prompts = [vlm.encode_prompt(pool[k], questions[q]) for k, q in pairs]
    answers = generate_answers(vlm, prompts, max_new_tokens=max_new_tokens, device=device,
                               batch_size=options.generation_batch_size)
    return dict(zip(pairs, answers, strict=True))


def misp_select(vlm, records, options, *, num_negatives, max_new_tokens, device):
    """Attach ``num_negatives`` selected pool images (+ their log q) and a generated text negative to each
    record. Returns (new records, selection summary; its ``generated_answers`` = the pool answers generated).

    Per record: (1) candidates = the pool minus the images on which the policy itself answers the record's
    best response (``exclude_supporting``: such an image is not a negative for that answer; when fewer than
    ``num_negatives`` images are left, the whole pool); (2) retrieval of the ``candidates_per_record`` most
    similar of them (cosine of the image embeddings; None = all; a record with fewer allowed images keeps them
    all), the CLIP retrieval step of the paper; (3) SAE score, greedy diverse selection and q over those
    candidates. The per-record candidate sets are padded to one width and masked (``select_negatives(mask=)``);
    the SAE is fitted on the valid (record, candidate) difference vectors only. The summary reports each
    record's candidate count (rows' ``candidates``) and their mean/min/max (top-level ``candidates``).
    """
    pool = candidate_pool(options)
    if num_negatives > len(pool):
        raise ValueError(f"num_negatives={num_negatives} exceeds the candidate pool ({len(pool)} images)")
    image_encoder, text_encoder = policy_encoders(vlm, device)
    embedder = neg.JointEmbedder(image_encoder, text_encoder, image_proj=options.proj_dim,
                                 text_proj=options.proj_dim, seed=options.seed)
    distinct = sorted({r.question for r in records})
    question_index = {q: i for i, q in enumerate(distinct)}
    h_pos = embedder.encode_images([vlm.encode_prompt(r.image, r.question) for r in records])
    h_pool = embedder.encode_images([vlm.encode_prompt(image, distinct[0]) for image in pool])
    h_text = embedder.encode_texts([r.question for r in records])
    chosen = [r.responses[r.groups.index(min(g for g in r.groups if g >= 0))] for r in records]

    allowed = torch.ones(len(records), len(pool), dtype=torch.bool)
    answers = {}
    if options.exclude_supporting:
        pairs = [(k, q) for k in range(len(pool)) for q in range(len(distinct))]  # cost: pool × distinct questions
        answers = _pool_answers(vlm, pool, distinct, pairs, options, max_new_tokens=max_new_tokens, device=device)
        for i, record in enumerate(records):
            q = question_index[record.question]
            supporting = torch.tensor([normalize_answer(answers[k, q]) == normalize_answer(chosen[i])
                                       for k in range(len(pool))])
            if int((~supporting).sum()) >= num_negatives:  # else: too few left, keep the whole pool
                allowed[i] = ~supporting
    limit = len(pool) if options.candidates_per_record is None else options.candidates_per_record
    counts = allowed.sum(1).clamp(max=limit)                                          # (N,) candidates per record
    m = int(counts.max())
    similarity = torch.nn.functional.normalize(h_pos, dim=-1) @ torch.nn.functional.normalize(h_pool, dim=-1).T
    similarity = similarity.masked_fill(~allowed, float("-inf"))
    # (N, m) pool indices, most similar first: a record's first counts[i] are its allowed candidates, the rest
    # (disallowed images, there only to pad the rows to one width) are marked invalid
    candidates = similarity.topk(m, dim=1).indices
    valid = torch.arange(m) < counts[:, None]                                         # (N, m)
    e_pos = neg.joint_embedding(h_pos, h_text)                                        # (N, P)
    e_cand = neg.joint_embedding(h_pool[candidates], h_text[:, None, :])              # (N, m, P)
    diffs = neg.difference_vectors(e_pos, e_cand)
    fit = neg.train_sae(diffs[valid], latent_dim=options.sae_latents, rho=options.sae_rho,
                        gamma=options.sae_gamma, steps=options.sae_steps, seed=options.seed)
    if options.selection == "uniform":
        generator = torch.Generator().manual_seed(options.seed)
        local = torch.stack([torch.randperm(int(c), generator=generator)[:num_negatives] for c in counts])
        log_q = None
    else:
        selection = neg.select_negatives(fit.sae, diffs, num_negatives, mode=options.selection,
                                         diversity_weight=options.diversity_weight, tau=options.tau,
                                         generator=torch.Generator().manual_seed(options.seed), mask=valid)
        local, log_q = selection.indices, selection.log_q
    indices = candidates.gather(1, local)
    missing = [(int(indices[i, 0]), question_index[r.question]) for i, r in enumerate(records)
               if (int(indices[i, 0]), question_index[r.question]) not in answers]
    answers.update(_pool_answers(vlm, pool, distinct, missing, options, max_new_tokens=max_new_tokens,
                                 device=device) if missing else {})
    out, summary = [], []
    for i, record in enumerate(records):
        rejected = answers[int(indices[i, 0]), question_index[record.question]]
        from_policy = normalize_answer(rejected) != normalize_answer(chosen[i])
        if not from_policy:
            worst = max(record.groups)
            rejected = record.responses[record.groups.index(worst)]
        picked = [int(k) for k in indices[i]]
        out.append(PreferenceRecord(image=record.image, question=record.question,
                                    responses=[chosen[i], rejected], groups=[0, 1], answer=record.answer,
                                    negative_images=[pool[k] for k in picked],
                                    negative_log_q=None if log_q is None else [float(v) for v in log_q[i]]))
        summary.append({"record": i, "negatives": picked, "log_q": out[-1].negative_log_q,
                        "allowed": int(allowed[i].sum()), "candidates": int(counts[i]), "text_negative": rejected,
                        "text_negative_from_policy": from_policy})
    candidate_counts = {"mean": float(counts.double().mean()), "min": int(counts.min()), "max": m}
    return out, {"sae_loss_first": fit.losses[0], "sae_loss_last": fit.losses[-1], "candidates": candidate_counts,
                 "generated_answers": len(answers), "rows": summary}


# ------------------------------------------------------------------------------------------------------------
# The trainer hook
# ------------------------------------------------------------------------------------------------------------

class SelfGenerator:
    """Owns the self-generated data of a run: ``prepare`` (before training) and ``on_step`` (online rounds)."""

    def __init__(self, config, vlm, state):
        self.config, self.vlm, self.state = config, vlm, state
        self.mode = config.self_generate
        self.options = SelfPrefOptions.from_dict(config.selfpref)
        self.base_records = None
        self.records = None
        self.round = None
        self.round_stats = []
        self.generated_answers = 0  # answers the policy generated for this run's data (the generation budget)
        self.cache_dir = Path(config.out) / "selfpref"
        if config.method not in ("smpro", "misp_dpo"):
            raise ValueError(f"self_generate={self.mode!r} needs method smpro or misp_dpo, got {config.method!r}")
        if self.mode == "online":
            if config.method != "smpro":
                raise ValueError("self_generate='online' regenerates SMPRO groups; misp_dpo selects its "
                                 "negatives once (use 'offline')")
            if config.regenerate_every < 1:
                raise ValueError(f"self_generate='online' needs regenerate_every >= 1, got "
                                 f"{config.regenerate_every}")
            if config.reference != "model":
                raise ValueError("self_generate='online' needs reference='model': precomputed reference "
                                 "log-probs would go stale when the groups are regenerated")

    @classmethod
    def from_config(cls, config, vlm, state):
        """None when self-generation is off."""
        if config.self_generate not in MODES:
            raise ValueError(f"self_generate must be one of {MODES}, got {config.self_generate!r}")
        return None if config.self_generate == "off" else cls(config, vlm, state)

    def prepare(self, records):
        self.base_records = records
        if self.config.method == "misp_dpo":
            out, summary = misp_select(self.vlm, records, self.options, num_negatives=self.config.num_negatives,
                                       max_new_tokens=self.config.max_new_tokens, device=self.state.device)
            self._write_json("misp_negatives.json", summary)
            self.generated_answers += summary["generated_answers"]
            return out
        return self._smpro_round(0)

    def on_step(self, trainer):
        """Online mode: at each multiple of ``regenerate_every``, swap in the round of the current step."""
        if self.mode != "online":
            return
        round_index = trainer.step // self.config.regenerate_every
        if round_index != self.round:
            from prefrank.train.methods import EncodedRecords

            trainer.train_data = EncodedRecords.build(self.vlm, self._smpro_round(round_index))

    def _smpro_round(self, round_index):
        path = self.cache_dir / f"round_{round_index:04d}.jsonl"
        if round_index == 0 and self.options.cache is not None:
            groups = load_records_jsonl(self.options.cache)
        elif path.exists() and self.config.resume:  # the round this run generated before it was interrupted
            groups = load_records_jsonl(path)
        else:
            groups = smpro_round(self.vlm, self.base_records, self.options,
                                 seed=self.options.seed * 1_000_003 + round_index,
                                 max_new_tokens=self.config.max_new_tokens, device=self.state.device)
            self.generated_answers += sum(len(a) for g in groups for a in g.meta["generated"].values())
            if self.state.is_main:
                save_records_jsonl(path, groups)
        self.round = round_index
        self.round_stats.append({"round": round_index, **group_statistics(groups)})
        self._write_json("rounds.json", self.round_stats)
        records = records_from_groups(self.base_records, groups)
        if records:
            self.records = records
        elif round_index == 0:
            raise ValueError("selfpref: every prompt's corrupted-view answers equal a clean-view answer, so no "
                             "SMPRO group has a negative; use stronger corruptions or more samples")
        # else: a round without any contrast keeps training on the previous round's groups (see rounds.json)
        return self.records

    def _write_json(self, name, payload):
        if self.state.is_main:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            (self.cache_dir / name).write_text(json.dumps(payload, indent=1))


def group_statistics(group_records: list[GroupRecord]):
    """Counts of a round: prompts, prompts with a negative group, mean candidates and levels per prompt."""
    kept = [g for g in group_records if g.num_levels >= 2]
    return {"prompts": len(group_records), "prompts_with_negatives": len(kept),
            "mean_candidates": sum(len(g.responses) for g in kept) / max(1, len(kept)),
            "mean_levels": sum(g.num_levels for g in kept) / max(1, len(kept))}
