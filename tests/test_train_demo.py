"""`python -m prefrank.demo --quick`: the whole demo pipeline on a few steps (library-value section, base
ablation, every row over seeds, report, plots, data, one log line per run), and the rows' data: every
label-free row built from ONE shared generation round of the base."""

import json
from dataclasses import replace

import pytest
import torch

from prefrank import demo
from prefrank.train import selfpref_demo
from prefrank.train.data import TASKS, synthetic_dataset
from prefrank.train.preference_groups import GroupRecord, build_groups
from prefrank.train.selfpref import records_from_groups

VIEWS = ["diffusion@500", "diffusion@800", "diffusion@950"]


def test_demo_quick_writes_report_table_and_plots(tmp_path, capsys):
    # the workers must not be plain forks of this process: once a compiled backward has run here (as in
    # another test of the same pytest worker), autograd's device threads have started and a forked child's
    # backward fails ("Unable to handle autograd's threading in combination with fork-based multiprocessing")
    torch.compile(lambda x: x.sin().sum())(torch.ones(2, requires_grad=True)).backward()
    result = demo.main(["--quick", "--out", str(tmp_path)])
    seeds = demo.QUICK["seeds"]
    rows = result["rows"]
    assert [row["name"] for row in rows] == [m.name for m in demo.DEMO_METHODS]
    assert [row["upper_bound"] for row in rows] == [False] * 5 + [True]
    for row in rows:
        assert len(row["accuracies"]) == len(seeds) and all(0.0 <= a <= 1.0 for a in row["accuracies"])
        assert row["accuracy"][0] == pytest.approx(sum(row["accuracies"]) / len(seeds))
        assert set(row["per_task"]) == set(TASKS)
    dpo = next(row for row in rows if row["name"] == "dpo")
    assert dpo["vs_paired"] == (0.0, 0.0)

    # the library-value runs: same losses on the three paths (float tolerance), time and memory measured
    value = result["value"]
    assert [path["label"] for path in value] == [label for label, _, _ in demo.VALUE_PATHS]
    for path in value:
        assert len(path["losses"]) == demo.QUICK["value_steps"] == len(path["step_cpu"])
        assert path["max_delta"] < 1e-4 and path["step_ms"] > 0 and path["peak_mib"] > 0
    assert value[0]["max_delta"] == 0.0

    base = result["base"]  # one SFT base per seed, every row paired with its seed's base
    assert len(base["accuracies"]) == len(base["noise_accuracies"]) == len(seeds)
    assert base["accuracy"][0] == pytest.approx(sum(base["accuracies"]) / len(seeds))
    assert 0.0 <= base["noise_accuracy"][0] <= 1.0 and 0.2 < base["chance"] < 0.4
    for row in rows:
        differences = [a - b for a, b in zip(row["accuracies"], base["accuracies"])]
        assert row["vs_base"][0] == pytest.approx(sum(differences) / len(seeds))

    report = (tmp_path / "report.md").read_text()
    sections = ["## What prefrank buys", "## The base and its image ablation", "## Method effects over",
                "## Time", "## The shared generation round"]
    assert [report.index(s) for s in sections] == sorted(report.index(s) for s in sections)
    assert "Packed vs unpacked" in report and "| noise images |" in report
    assert "| base (SFT warm-up) |" in report and "| DPO (one pair / prompt) |" in report
    assert "| S-DPO (chosen ≻ unordered negatives) |" in report and "upper bound" in report
    assert "seed by seed" in report
    assert (tmp_path / "demo.png").stat().st_size > 0 and (tmp_path / "value.png").stat().st_size > 0
    out = capsys.readouterr().out
    # not a terminal: one line per finished run, no carriage-return progress bars
    assert "\r" not in out
    assert out.count("[demo] done: ") == len(demo.VALUE_PATHS) + (1 + len(rows)) * len(seeds)

    # one shared round per seed: 32 prompts × (1 + 2 samples on the clean view + 3 levels × (1 + 2 samples))
    assert all((tmp_path / "data" / f"shared_round_seed{seed}.jsonl").exists() for seed in seeds)
    round_lines = [json.loads(line)
                   for line in (tmp_path / "data" / "shared_round_seed0.jsonl").read_text().splitlines()]
    assert len(round_lines) == 32
    assert all(sum(map(len, g["meta"]["generated"].values())) == 12 for g in round_lines)
    kept = [g for g in round_lines if len(set(g["groups"])) > 1]
    assert kept, "the quick round must give prompts a negative group"
    by_name = {row["name"]: row for row in rows}
    for name in ("dpo", "listwise", "sdpo", "smpro"):  # train_prompts: seed 0's
        assert by_name[name]["train_prompts"] == len(kept)
        assert by_name[name]["extra_generated"] == 0
    assert by_name["gold_listwise"]["train_prompts"] == 32
    misp = json.loads((tmp_path / "runs" / "misp_dpo" / "seed0" / "selfpref" / "misp_negatives.json").read_text())
    assert misp["generated_answers"] > 0 and by_name["misp_dpo"]["extra_generated"] == misp["generated_answers"]
    counts = [row["candidates"] for row in misp["rows"]]              # per-prompt candidate sets, not one cap
    assert (f"candidates per prompt: mean {misp['candidates']['mean']:.1f} (min {min(counts)}, "
            f"max {max(counts)}") in report
    pairs = [json.loads(line) for line in (tmp_path / "data" / "dpo_seed0.jsonl").read_text().splitlines()]
    assert len(pairs) == len(kept) and all(p["groups"] == [0, 1] for p in pairs)
    assert [p["responses"][0] for p in pairs] == [g["meta"]["generated"]["clean"][0] for g in kept]
    lists = [json.loads(line) for line in (tmp_path / "data" / "smpro_seed0.jsonl").read_text().splitlines()]
    assert [(r["responses"], r["groups"]) for r in lists] == [(g["responses"], g["groups"]) for g in kept]
    sdpo = [json.loads(line) for line in (tmp_path / "data" / "sdpo_seed0.jsonl").read_text().splitlines()]
    assert all(r["groups"] == [0] + [1] * (len(r["groups"]) - 1) for r in sdpo)


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

    rows = {m.name: m.build_records(base, prompts, settings) for m in demo.DEMO_METHODS}
    assert selfpref_demo.shared_round(base, prompts, settings) is round_  # reused, not regenerated
    expected_lists = [(["blue", "Red.", "green"], [0, 0, 1]), (["two", "three", "four"], [0, 1, 2]),
                      (["blue", "grey"], [0, 1])]
    for name in ("listwise", "smpro"):
        assert [(r.responses, r.groups) for r in rows[name]] == expected_lists
        assert [r.answer for r in rows[name]] == ["red", "two", "blue"]
    # S-DPO: the greedy clean answer ≻ every negative, unordered
    assert [(r.responses, r.groups) for r in rows["sdpo"]] == [
        (["blue", "green"], [0, 1]), (["two", "three", "four"], [0, 1, 1]), (["blue", "grey"], [0, 1])]
    for name in ("dpo", "misp_dpo"):  # MISP-DPO starts from the SeVa pairs (its hook adds the images)
        assert [(r.responses, r.groups) for r in rows[name]] == [
            (["blue", "green"], [0, 1]), (["two", "four"], [0, 1]), (["blue", "grey"], [0, 1])]
        assert all(r.image is p.image for r, p in zip(rows[name], [prompts[0], prompts[1], prompts[3]]))
    assert rows["gold_listwise"] == prompts  # the labelled ranking: the upper bound

    rates = selfpref_demo.gold_rates(round_)
    assert rates["greedy, clean"] == 3 / 4 and rates["greedy, diffusion@500"] == 3 / 4
    assert rates["greedy, diffusion@950"] == 2 / 4
    assert rates["kept: positive group"] == 3 / 4 and rates["kept: negative groups"] == 0.0
    assert rates["SeVa chosen"] == 2 / 3 and rates["SeVa rejected"] == 0.0
    by_task = selfpref_demo.contrast_by_task(round_)
    assert sum(v[0] for v in by_task.values()) == 4 and sum(v[1] for v in by_task.values()) == 3
    section = selfpref_demo.report_section(round_)
    assert "3/4 prompts have a negative group" in section and "6.00 answers generated per prompt" in section


def test_rows_aggregate_over_seeds_with_paired_differences_and_plain_verdicts():
    methods = [m for m in demo.DEMO_METHODS if m.name in ("dpo", "smpro", "listwise")]
    accuracy = {"dpo": [0.40, 0.50, 0.45], "smpro": [0.50, 0.60, 0.55], "listwise": [0.45, 0.45, 0.50]}
    results = {(name, seed): {"accuracy": acc, "per_task": {"color": acc}, "malformed": 0.0, "train_prompts": 7,
                              "extra_generated": 0, "wall_seconds": 1.0}
               for name, values in accuracy.items() for seed, acc in zip((0, 1, 2), values)}
    base_row = {"accuracy": (0.45, 0.06), "accuracies": [0.40, 0.52, 0.43]}  # one base per seed
    rows = {row["name"]: row for row in demo.aggregate_rows(methods, (0, 1, 2), results, base_row)}
    assert rows["smpro"]["accuracy"] == (pytest.approx(0.55), pytest.approx(0.05))
    assert rows["smpro"]["vs_paired"] == (pytest.approx(0.10), pytest.approx(0.0, abs=1e-12))  # +0.10 every seed
    assert rows["listwise"]["vs_paired"][0] == pytest.approx(0.05 / 3)
    assert rows["listwise"]["per_task"]["color"][0] == pytest.approx(1.4 / 3)
    assert rows["listwise"]["per_task"]["count"][0] != rows["listwise"]["per_task"]["count"][0]  # NaN: no data
    assert rows["smpro"]["vs_base"] == (pytest.approx(0.10), pytest.approx(0.02))  # paired: its seed's base
    text = demo.observations(base_row, list(rows.values()), 3, num_eval=256)  # SE ≈ 3.1 points
    smpro_line = next(line for line in text.splitlines() if line.startswith("- SMPRO"))
    listwise_line = next(line for line in text.splitlines() if line.startswith("- listwise"))
    assert "vs its base seed by seed +10.0 ± 2.0 points, which exceeds both" in smpro_line
    assert "vs its base seed by seed +1.7 ± 7.6 points, which does NOT exceed" in listwise_line
    assert "+10.0 ± 0.0 points, which exceeds both the seed spread and the held-out sampling error" in smpro_line
    assert "+1.7 ± 5.8 points, which does NOT exceed the seed spread" in listwise_line
    rows["listwise"]["vs_paired"] = (0.02, 0.005)
    text = demo.observations(base_row, list(rows.values()), 3, num_eval=256)
    assert "+2.0 ± 0.5 points, which exceeds the seed spread but not the held-out sampling error (±3.1" in text


def test_base_must_hold_one_sft_run_per_seed(tmp_path):
    (tmp_path / "sft" / "seed0").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"base=.* one run per seed .*missing: \['seed1'\]"):
        demo.run_demo(replace(demo.DemoSettings(out=str(tmp_path / "out"), base=str(tmp_path / "sft")), **demo.QUICK))
    assert not (tmp_path / "out").exists()  # nothing written


def test_workers_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--workers", "0"])
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="workers must be >= 1"):
        demo.run_parallel([], 0, on_done=None)
