"""`python -m prefrank.demo --quick`: the whole demo pipeline on a few steps (table, report, plots, data), and
the rows' data: every preference row built from ONE shared generation round of the base."""

import json
from dataclasses import replace

import pytest

from prefrank import demo
from prefrank.train import selfpref_demo
from prefrank.train.data import synthetic_dataset
from prefrank.train.preference_groups import GroupRecord, build_groups
from prefrank.train.selfpref import records_from_groups

VIEWS = ["diffusion@500", "diffusion@800", "diffusion@950"]


def test_demo_quick_writes_report_table_and_plots(tmp_path, capsys):
    rows = demo.main(["--quick", "--out", str(tmp_path)])
    assert [row["method"] for row in rows] == ["sft"] + [m.method for m in demo.DEMO_METHODS]
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows)
    report = (tmp_path / "report.md").read_text()
    assert "| base (SFT warm-up) |" in report and "| DPO (one pair / prompt) |" in report
    assert "generated answers / prompt" in report and "malformed answers" in report
    assert "## The shared generation round" in report
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert "held-out exact match" in capsys.readouterr().out

    # one shared round: 32 prompts × (1 + 2 samples on the clean view + 3 levels × (1 + 2 samples))
    round_lines = [json.loads(line) for line in (tmp_path / "data" / "shared_round.jsonl").read_text().splitlines()]
    assert len(round_lines) == 32
    assert all(sum(map(len, g["meta"]["generated"].values())) == 12 for g in round_lines)
    kept = [g for g in round_lines if len(set(g["groups"])) > 1]
    assert kept, "the quick round must give prompts a negative group"
    by_method = {row["method"]: row for row in rows}
    for method in ("dpo", "listwise", "smpro"):
        assert by_method[method]["generated_per_prompt"] == 12.0
        assert by_method[method]["train_prompts"] == len(kept)
    # MISP-DPO: the same round + one gallery check per (gallery image, distinct question)
    misp = json.loads((tmp_path / "misp_dpo" / "selfpref" / "misp_negatives.json").read_text())
    assert misp["generated_answers"] > 0
    counts = [row["candidates"] for row in misp["rows"]]              # per-prompt candidate sets, not one cap
    assert misp["candidates"] == {"mean": pytest.approx(sum(counts) / len(counts)), "min": min(counts),
                                  "max": max(counts)}
    assert (f"candidates per prompt: mean {misp['candidates']['mean']:.1f} (min {min(counts)}, "
            f"max {max(counts)}") in report
    assert by_method["misp_dpo"]["generated_per_prompt"] == 12.0 + misp["generated_answers"] / 32
    pairs = [json.loads(line) for line in (tmp_path / "data" / "dpo.jsonl").read_text().splitlines()]
    assert len(pairs) == len(kept) and all(p["groups"] == [0, 1] for p in pairs)
    assert [p["responses"][0] for p in pairs] == [g["meta"]["generated"]["clean"][0] for g in kept]
    lists = [json.loads(line) for line in (tmp_path / "data" / "smpro.jsonl").read_text().splitlines()]
    assert [(r["responses"], r["groups"]) for r in lists] == [(g["responses"], g["groups"]) for g in kept]


def _group(index, question, clean, *negatives):
    responses, groups = build_groups(clean, negatives)
    return GroupRecord(index, question, responses, groups,
                       {"corruptions": VIEWS, "generated": {"clean": clean, **dict(zip(VIEWS, negatives))}})


class _Base:
    """Stands in for the base trainer: the shared round is memoised per base object."""


def test_rows_come_from_one_shared_round_with_the_seva_pair(tmp_path):
    prompts = [replace(r, answer=a) for r, a in zip(synthetic_dataset(4, seed=4), ["red", "two", "one", "blue"])]
    groups = [
        # greedy "blue" ≻ ...; t500 equals a positive (dropped); t950 "red" equals a positive → most severe = t800
        _group(0, "q0", ["blue", "Red.", "blue"], ["red"], ["green"], ["red"]),
        # t800 repeats the t500 answer (kept at t500 only) → levels 0, 1 (t500), 2 (t950)
        _group(1, "q1", ["two", "two", "two"], ["three"], ["Three"], ["four"]),
        # every corrupted-view answer equals a positive: no contrast, dropped from every row
        _group(2, "q2", ["one", "one", "two"], ["one"], ["two."], ["one"]),
        _group(3, "q3", ["blue", "blue", "blue"], ["blue"], ["blue"], ["grey"]),
    ]
    settings = demo.DemoSettings(out=str(tmp_path))
    round_ = selfpref_demo.SharedRound(prompts, settings.round_options, groups, records_from_groups(prompts, groups))
    base = _Base()
    selfpref_demo._ROUNDS[base] = round_
    assert round_.generated_answers == 4 * 6

    rows = {m.method: m.build_records(base, prompts, settings) for m in demo.DEMO_METHODS}
    assert selfpref_demo.shared_round(base, prompts, settings) is round_  # reused, not regenerated
    expected_lists = [(["blue", "Red.", "green"], [0, 0, 1]), (["two", "three", "four"], [0, 1, 2]),
                      (["blue", "grey"], [0, 1])]
    for method in ("listwise", "smpro"):
        assert [(r.responses, r.groups) for r in rows[method]] == expected_lists
        assert [r.answer for r in rows[method]] == ["red", "two", "blue"]
    for method in ("dpo", "misp_dpo"):  # MISP-DPO starts from the SeVa pairs (its hook adds the images)
        assert [(r.responses, r.groups) for r in rows[method]] == [
            (["blue", "green"], [0, 1]), (["two", "four"], [0, 1]), (["blue", "grey"], [0, 1])]
        assert all(r.image is p.image for r, p in zip(rows[method], [prompts[0], prompts[1], prompts[3]]))

    rates = selfpref_demo.gold_rates(round_)
    assert rates["greedy, clean"] == 3 / 4 and rates["greedy, diffusion@500"] == 3 / 4
    assert rates["greedy, diffusion@950"] == 2 / 4
    assert rates["kept: positive group"] == 3 / 4 and rates["kept: negative groups"] == 0.0
    assert rates["SeVa chosen"] == 2 / 3 and rates["SeVa rejected"] == 0.0
    by_task = selfpref_demo.contrast_by_task(round_)
    assert sum(v[0] for v in by_task.values()) == 4 and sum(v[1] for v in by_task.values()) == 3
    section = selfpref_demo.report_section(tmp_path, round_)
    assert "3/4 prompts have a negative group" in section and "6.00 answers generated per prompt" in section
