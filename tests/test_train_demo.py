"""`python -m prefrank.demo --quick`: the whole demo pipeline on a few steps (table, report, plots, data)."""

from prefrank import demo


def test_demo_quick_writes_report_table_and_plots(tmp_path, capsys):
    rows = demo.main(["--quick", "--out", str(tmp_path)])
    assert [row["method"] for row in rows] == ["sft"] + [m.method for m in demo.DEMO_METHODS]
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in rows)
    report = (tmp_path / "report.md").read_text()
    assert "| base (SFT warm-up) |" in report and "| DPO (one pair / prompt) |" in report
    assert (tmp_path / "demo.png").stat().st_size > 0
    assert "held-out exact match" in capsys.readouterr().out
    pairs = (tmp_path / "data" / "dpo.jsonl").read_text().splitlines()
    assert len(pairs) == 32 and all('"groups": [0, 1]' in line for line in pairs)


def test_one_pair_uses_the_base_models_most_likely_wrong_answer(tmp_path):
    from prefrank.train.config import TrainConfig
    from prefrank.train.data import synthetic_dataset
    from prefrank.train.loop import Trainer

    records = synthetic_dataset(6, seed=4)
    base = Trainer(TrainConfig(method="sft", out=str(tmp_path), num_train=6, num_eval=2, batch_size=2,
                               progress=False), train_records=records)
    logps = demo.response_logps(base, records)
    pairs = demo.one_pair_per_prompt(base, records, None)
    for record, pair, scores in zip(records, pairs, logps, strict=True):
        assert pair.responses[0] == record.answer and pair.groups == [0, 1]
        wrong = {record.responses[j]: scores[j].item() for j in range(1, len(record.responses))}
        assert wrong[pair.responses[1]] == max(wrong.values())
        # scored in the policy's own forward: response j's log-prob under the model is finite and negative
        assert all(v < 0 for v in wrong.values())
