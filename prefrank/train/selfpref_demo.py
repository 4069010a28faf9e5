"""The preference rows of `make demo` and the ONE generation round they all share (issues 7 and 16).

Every label-free row (the setting of SeVa, SMPRO and MISP-DPO; papers.md §2.3, §3) is built from the same
data: one SMPRO-recipe round generated once per demo run by the SFT base
(`prefrank.train.selfpref.smpro_round`): greedy + ``num_samples`` sampled answers on the clean image = the
positive group, greedy + ``negative_samples`` sampled answers on SeVa diffusion noise t = 500 ≻ 800 ≻ 950 = the
negative groups; answers equal to a positive are dropped from the negatives and prompts left without a
negative group are dropped (`records_from_groups`). The round is saved as ``<out>/data/shared_round_seed<k>.jsonl``
and memoised per base trainer.

- DPO (one pair / prompt) = SeVa: greedy clean answer ≻ the answer of the most severe negative level present;
- listwise PL: the whole ranked list (positive group ≻ t500 ≻ t800 ≻ t950, ties within a level),
  `listwise_dpo_loss`;
- S-DPO: the greedy clean answer ≻ every negative answer, unordered (`listwise_dpo_loss` with groups
  [0, 1, …, 1] and top_k = 1, i.e. `sdpo_loss`);
- SMPRO: the positive and negative groups, `smpro_loss` (offline on the shared round: online regeneration
  would multiply its generation budget);
- MISP-DPO: the DPO pairs as input; the trainer's selfpref hook (`misp_select`) picks K = 3 SAE-selected
  negative images with their log q and makes the policy's answer on the first of them the text negative (the
  SeVa rejected answer when the two coincide); its pool checks are extra generated answers, counted;
- upper bound (labelled, NOT label-free): listwise PL on the gold ranking of the synthetic task (gold answer ≻
  every other answer of its kind).

Apart from the upper-bound row, the labelled answers of the synthetic task are used only to evaluate
(held-out accuracy and the gold-rate diagnostics of the report).
"""

import json
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from prefrank.train.data import TASKS, PreferenceRecord
from prefrank.train.preference_groups import normalize_answer, save_records_jsonl
from prefrank.train.selfpref import SelfPrefOptions, group_statistics, records_from_groups, smpro_round

# one sampled answer per noisy view: 622/1024 prompts get a negative group, against 49 with greedy answers only
ROUND_OPTIONS = {"num_samples": 2, "negative_samples": 1, "temperature": 0.7, "corruption": "diffusion",
                 "generation_batch_size": 128}
# `--quick`: a 3-step base answers the same on clean and noisy images, so the quick round also samples on the
# corrupted views (seeded: deterministic) to give prompts a negative group.
QUICK_ROUND_OPTIONS = {**ROUND_OPTIONS, "num_samples": 2, "negative_samples": 2, "temperature": 1.0}
MISP_OPTIONS = {"pool_size": 64, "candidates_per_record": 16, "sae_steps": 200, "proj_dim": 16,
                "generation_batch_size": 128}


@dataclass
class SharedRound:
    """One generation round of the SFT base on every training prompt."""
    prompts: list  # the training PreferenceRecords it was generated on (labels unused)
    options: dict
    groups: list  # GroupRecord per prompt (image = prompt index; meta["generated"] = every raw answer)
    records: list  # PreferenceRecords with the full ranked list, for prompts with a negative group
    seconds: float = 0.0

    @property
    def generated_answers(self):
        """Answers the base generated, before dedup: prompts × (1 + num_samples + levels × (1 + negative_samples))."""
        return sum(len(answers) for g in self.groups for answers in g.meta["generated"].values())


_ROUNDS = weakref.WeakKeyDictionary()  # base Trainer → SharedRound


def shared_round(base, train_records, settings):
    """The round of ``base`` on ``train_records`` with ``settings.round_options``: generated on the first call
    for this base trainer (and written to ``<settings.out>/data/shared_round_seed<k>.jsonl``, k = the round's
    sampling seed), reused afterwards."""
    cached = _ROUNDS.get(base)
    if cached is not None and cached.prompts is train_records and cached.options == settings.round_options:
        return cached
    options = SelfPrefOptions.from_dict(settings.round_options)
    started = time.perf_counter()
    groups = smpro_round(base.vlm, train_records, options, seed=options.seed,
                         max_new_tokens=base.config.max_new_tokens, device=base.state.device)
    records = records_from_groups(train_records, groups)
    if not records:
        raise ValueError(f"demo: in the shared generation round every prompt's corrupted-view answers equal a "
                         f"clean-view answer (round_options={settings.round_options}), so no method has a "
                         "preference to train on; sample on the corrupted views (negative_samples) or use a "
                         "stronger base")
    save_records_jsonl(Path(settings.out) / "data" / f"shared_round_seed{options.seed}.jsonl", groups)
    _ROUNDS[base] = SharedRound(train_records, dict(settings.round_options), groups, records,
                                time.perf_counter() - started)
    return _ROUNDS[base]


def seva_pair(record):
    """SeVa's pair from one ranked list: the greedy clean answer (the first positive) ≻ the first answer of the
    most severe negative level present."""
    worst = max(record.groups)
    return PreferenceRecord(image=record.image, question=record.question,
                            responses=[record.responses[record.groups.index(0)],
                                       record.responses[record.groups.index(worst)]],
                            groups=[0, 1], answer=record.answer)


def seva_pairs(base, train_records, settings):
    return [seva_pair(r) for r in shared_round(base, train_records, settings).records]


def ranked_lists(base, train_records, settings):
    return list(shared_round(base, train_records, settings).records)


def sdpo_list(record):
    """S-DPO's list from one ranked list: the greedy clean answer (level 0) ≻ every negative answer (level 1,
    unordered); the other positives are left out (they are neither the chosen answer nor negatives)."""
    negatives = [text for text, level in zip(record.responses, record.groups) if level > 0]
    return PreferenceRecord(image=record.image, question=record.question,
                            responses=[record.responses[record.groups.index(0)], *negatives],
                            groups=[0] + [1] * len(negatives), answer=record.answer)


def sdpo_lists(base, train_records, settings):
    return [sdpo_list(r) for r in shared_round(base, train_records, settings).records]


def gold_lists(base, train_records, settings):
    """The labelled ranking of the synthetic task (gold ≻ every other answer of its kind): the upper bound."""
    return list(train_records)


def demo_rows(demo_method_cls):
    """The preference rows (the class is passed in to keep prefrank.demo the only importer)."""
    return [
        demo_method_cls("DPO (one pair / prompt)", "dpo", "dpo", seva_pairs),
        demo_method_cls("listwise PL (ranked list)", "listwise", "listwise", ranked_lists),
        demo_method_cls("S-DPO (chosen ≻ unordered negatives)", "sdpo", "listwise", sdpo_lists,
                        dict(loss_kwargs={"top_k": 1})),
        demo_method_cls("SMPRO (groups)", "smpro", "smpro", ranked_lists),
        demo_method_cls("MISP-DPO (SAE-selected negatives)", "misp_dpo", "misp_dpo", seva_pairs,
                        dict(self_generate="offline", num_negatives=3, selfpref=dict(MISP_OPTIONS))),
        demo_method_cls("upper bound: listwise PL on the gold ranking (labels)", "gold_listwise", "listwise",
                        gold_lists, upper_bound=True),
    ]


def gold_rates(round_):
    """Diagnostics only (no row trains on labels): how often answers equal the gold answer — the greedy answer
    of each view over every prompt, then, over the kept prompts, the positive / negative groups and the two
    sides of the SeVa pair."""
    def rate(pairs):
        pairs = list(pairs)
        return sum(normalize_answer(a) == normalize_answer(gold) for a, gold in pairs) / max(1, len(pairs))

    golds = [round_.prompts[int(g.image)].answer for g in round_.groups]
    views = list(round_.groups[0].meta["generated"])
    rates = {f"greedy, {view}": rate((g.meta["generated"][view][0], gold) for g, gold in zip(round_.groups, golds))
             for view in views}
    kept = round_.records
    rates["kept: positive group"] = rate((a, r.answer) for r in kept for a, lv in zip(r.responses, r.groups)
                                         if lv == 0)
    rates["kept: negative groups"] = rate((a, r.answer) for r in kept for a, lv in zip(r.responses, r.groups)
                                          if lv > 0)
    pairs = [seva_pair(r) for r in kept]
    rates["SeVa chosen"] = rate((p.responses[0], p.answer) for p in pairs)
    rates["SeVa rejected"] = rate((p.responses[1], p.answer) for p in pairs)
    return rates


def contrast_by_task(round_):
    """Per question kind of the synthetic task: (prompts, prompts with a negative group, gold rate of the SeVa
    chosen answers, of the rejected ones) — diagnostics only."""
    kind = {question: task for task, (questions, _) in TASKS.items() for question in questions}
    out = {}
    for task in TASKS:
        prompts = sum(kind.get(p.question) == task for p in round_.prompts)
        pairs = [seva_pair(r) for r in round_.records if kind.get(r.question) == task]
        gold = [[normalize_answer(text) == normalize_answer(p.answer) for text in p.responses] for p in pairs]
        out[task] = (prompts, len(pairs), sum(g[0] for g in gold) / max(1, len(gold)),
                     sum(g[1] for g in gold) / max(1, len(gold)))
    return out


def report_section(round_, misp_path=None):
    """Markdown for `runs/demo/report.md`: the shared round and (``misp_path``: a misp_negatives.json)
    MISP-DPO's selection, measured."""
    options = round_.options
    stats = group_statistics(round_.groups)
    levels = {}
    for record in round_.records:
        levels[max(record.groups)] = levels.get(max(record.groups), 0) + 1
    lines = ["## The shared generation round and the preference rows", "",
             "Every label-free preference row of a seed starts from that seed's SFT base with the same steps × "
             "prompts, lr and β, and trains on the same data: ONE round generated by that base on every training "
             "prompt "
             f"(`data/shared_round_seed{SelfPrefOptions.from_dict(options).seed}.jsonl`, {round_.seconds:.0f} s): "
             f"greedy + {options['num_samples']} samples "
             f"(T = {options['temperature']}) on the clean image = the positive group, greedy "
             f"(+ {options['negative_samples']} samples) on SeVa diffusion noise t = 500 ≻ 800 ≻ 950 = the "
             "negative groups; negatives equal to a positive are dropped, and so are prompts left without a "
             "negative group.", "",
             "- **DPO (one pair / prompt)** = SeVa: greedy clean answer ≻ the answer of the most severe negative "
             "level present, `dpo_loss`.",
             "- **listwise PL**: the whole ranked list (positive group ≻ t500 ≻ t800 ≻ t950, Breslow ties within "
             "a level), `listwise_dpo_loss`.",
             "- **S-DPO**: the greedy clean answer ≻ every negative answer, unordered: `listwise_dpo_loss` with "
             "groups [0, 1, …, 1] and top_k = 1 (= `sdpo_loss`).",
             "- **SMPRO**: the same groups, `smpro_loss` (offline: online regeneration would multiply its "
             "generation budget).",
             "- **MISP-DPO**: the DPO pairs; K = 3 negative images per prompt out of a "
             f"{MISP_OPTIONS['pool_size']}-image synthetic gallery (images on which the policy itself gives the "
             f"chosen answer excluded, the {MISP_OPTIONS['candidates_per_record']} most similar remaining ones by "
             "policy vision embedding scored by the SAE, greedy diverse pick, log q for the importance "
             "correction); text negative = the policy's answer on the first negative image (the SeVa rejected "
             "answer when they coincide), `misp_dpo_loss`. Its gallery checks are extra generated answers.", "",
             f"Round: {stats['prompts_with_negatives']}/{stats['prompts']} prompts have a negative group "
             f"({round_.generated_answers / len(round_.prompts):.2f} answers generated per prompt; kept prompts "
             f"have {stats['mean_candidates']:.2f} distinct answers and {stats['mean_levels']:.2f} levels on "
             "average; most severe negative level present: "
             + ", ".join(f"level {k}: {v}" for k, v in sorted(levels.items())) + ").", "",
             "Gold rates (diagnostics with the labels no row trains on):", "",
             "| answers | gold rate |", "|---|---|"]
    lines += [f"| {key} | {value:.2f} |" for key, value in gold_rates(round_).items()]
    lines += ["", "| question kind | prompts with a negative group | gold rate, SeVa chosen | "
              "gold rate, SeVa rejected |", "|---|---|---|---|"]
    lines += [f"| {task} | {kept}/{prompts} | {chosen:.2f} | {rejected:.2f} |"
              for task, (prompts, kept, chosen, rejected) in contrast_by_task(round_).items()]
    lines.append("")
    if misp_path is not None and Path(misp_path).exists():
        misp = json.loads(misp_path.read_text())
        rows = misp["rows"]
        distinct = len({k for row in rows for k in row["negatives"]})
        from_policy = sum(row["text_negative_from_policy"] for row in rows) / len(rows)
        counts = misp["candidates"]
        lines += [f"MISP-DPO selection: {misp['generated_answers']} gallery answers generated; SAE loss "
                  f"{misp['sae_loss_first']:.1f} → {misp['sae_loss_last']:.1f}; candidates per prompt: mean "
                  f"{counts['mean']:.1f} (min {counts['min']}, max {counts['max']}; at most "
                  f"{MISP_OPTIONS['candidates_per_record']}, fewer where fewer gallery images are allowed); "
                  f"{distinct} distinct gallery images among the picked negatives; text negative = "
                  f"the policy's answer on a negative image for {from_policy:.0%} of the prompts (else the SeVa "
                  "rejected answer).", ""]
    return "\n".join(lines)
