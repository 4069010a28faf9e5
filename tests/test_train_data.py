"""Synthetic data generation and the JSONL loader's validation."""

import json

import pytest
from PIL import Image

from prefrank.train.data import (
    COUNT_WORDS,
    IMAGE_SIZE,
    TASKS,
    export_jsonl,
    load_jsonl,
    synthetic_dataset,
    validate_records,
)
from prefrank.train.methods import METHODS


def _pixels(image):
    return image.tobytes()


def test_synthetic_is_deterministic_per_seed_and_splits_differ():
    first, again = synthetic_dataset(24, seed=5), synthetic_dataset(24, seed=5)
    other = synthetic_dataset(24, seed=6)
    assert [(r.question, r.responses, r.groups) for r in first] == [(r.question, r.responses, r.groups)
                                                                    for r in again]
    assert all(_pixels(a.image) == _pixels(b.image) for a, b in zip(first, again, strict=True))
    assert [_pixels(r.image) for r in first] != [_pixels(r.image) for r in other]


def test_synthetic_records_are_well_formed():
    records = synthetic_dataset(200, seed=0)
    questions = {q: answers for templates, answers in TASKS.values() for q in templates}
    seen_tasks = set()
    for record in records:
        assert record.image.size == (IMAGE_SIZE, IMAGE_SIZE) and record.image.mode == "RGB"
        answers = questions[record.question]
        seen_tasks.add(answers)
        # gold first at level 0, every other answer of the same task at level 1, no duplicates
        assert record.responses[0] == record.answer == record.target
        assert sorted(record.responses) == sorted(answers)
        assert record.groups == [0] + [1] * (len(answers) - 1)
    assert len(seen_tasks) == len(TASKS)


def test_count_answers_match_the_drawn_shapes():
    # count scenes draw shapes in distinct cells of a 3x3 grid: the number of coloured blobs is the answer
    for record in synthetic_dataset(120, seed=3):
        if record.answer not in COUNT_WORDS:
            continue
        image = record.image
        grid = [(x, y) for x in range(IMAGE_SIZE) for y in range(IMAGE_SIZE)]
        lit = {xy for xy in grid if sum(image.getpixel(xy)) > 150}
        blobs = 0
        while lit:  # flood-fill connected components
            stack = [lit.pop()]
            while stack:
                x, y = stack.pop()
                for neighbour in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                    if neighbour in lit:
                        lit.remove(neighbour)
                        stack.append(neighbour)
            blobs += 1
        assert blobs == COUNT_WORDS.index(record.answer) + 1


def test_negatives_are_other_records_images():
    records = synthetic_dataset(10, seed=1, num_negatives=3)
    for index, record in enumerate(records):
        assert len(record.negative_images) == 3
        assert all(negative is not record.image for negative in record.negative_images)
        assert all(any(negative is other.image for j, other in enumerate(records) if j != index)
                   for negative in record.negative_images)


def test_jsonl_round_trip(tmp_path):
    records = synthetic_dataset(6, seed=2, num_negatives=2)
    records[0].negative_log_q = [-0.5, -1.5]
    for record in records[1:]:
        record.negative_log_q = [-1.0, -1.0]
    export_jsonl(records, tmp_path / "train.jsonl")
    loaded = load_jsonl(tmp_path / "train.jsonl")
    assert len(loaded) == len(records)
    for original, back in zip(records, loaded, strict=True):
        assert (back.question, back.responses, back.groups, back.answer) == (
            original.question, original.responses, original.groups, original.answer)
        assert _pixels(back.image) == _pixels(original.image)  # PNG is lossless
        assert [_pixels(n) for n in back.negative_images] == [_pixels(n) for n in original.negative_images]
    assert loaded[0].negative_log_q == [-0.5, -1.5]


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


@pytest.fixture
def data_root(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    return tmp_path


GOOD = {"image": "ok.png", "question": "q?", "responses": ["a", "b"], "groups": [0, 1]}


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "image": "missing.png"}, "'missing.png' not found"),
    ({**GOOD, "image": "corrupt.png"}, "'corrupt.png' is not a readable image"),
    ({**GOOD, "image": "../outside.png"}, "leaves the data root"),
    ({k: v for k, v in GOOD.items() if k != "groups"}, "missing key(s) ['groups']"),
    ({**GOOD, "groups": [0]}, "'groups' has 1 entries for 2 responses"),
    ({**GOOD, "groups": [0, -2]}, "'groups' must be levels"),
    ({**GOOD, "responses": []}, "'responses' must be a non-empty list"),
    ({**GOOD, "question": 3}, "'question' must be a string"),
    ({**GOOD, "negative_images": ["ok.png"], "negative_log_q": [0.1, 0.2]}, "'negative_log_q' must be"),
    ("{not json", "invalid JSON"),
])
def test_jsonl_errors_name_the_line(data_root, bad, message):
    path = data_root / "data.jsonl"
    _write(path, [GOOD, "", bad])  # the blank line still counts: the bad record is line 3
    with pytest.raises(ValueError) as error:
        load_jsonl(path)
    assert "data.jsonl:3:" in str(error.value) and message in str(error.value)


def test_jsonl_data_root_is_used(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "ok.png")
    _write(tmp_path / "d.jsonl", [GOOD])
    with pytest.raises(ValueError, match="not found"):
        load_jsonl(tmp_path / "d.jsonl")
    assert load_jsonl(tmp_path / "d.jsonl", data_root=images)[0].responses == ["a", "b"]


# -- records are validated for the chosen method at load time (issue 13) ------------------------------------


def _trainer_config(tmp_path, method, **overrides):
    from prefrank.train.config import TrainConfig

    values = dict(method=method, out=str(tmp_path / "run"), steps=1, batch_size=2, num_eval=2, progress=False)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("method", ["dpo", "listwise", "smpro", "misp_dpo"])
def test_single_level_record_fails_at_load_naming_file_line_and_field(tmp_path, method):
    """One level in `groups` used to load fine and crash the run at the step whose batch held it, naming a
    flattened batch index (dpo: a 0-based record index) instead of file:line. Nothing is written."""
    from prefrank.train.loop import Trainer

    export_jsonl(synthetic_dataset(4, seed=3, num_negatives=2), tmp_path / "train.jsonl")
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    record = json.loads(lines[2])
    record["groups"] = [0] * len(record["groups"])
    lines[2] = json.dumps(record)
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:3: 'groups' has a single preference level") as error:
        Trainer(_trainer_config(tmp_path, method, data=str(tmp_path / "train.jsonl")))
    assert method in str(error.value)
    assert not (tmp_path / "run").exists()
    # SFT accepts the same data: one level is all it needs
    assert validate_records(load_jsonl(tmp_path / "train.jsonl"), METHODS["sft"]())


def test_eval_answer_must_be_a_string(data_root):
    """`"answer": 3` in --eval-data used to train every step and then crash the final evaluation."""
    path = data_root / "heldout.jsonl"
    _write(path, [GOOD, {**GOOD, "answer": 3}])
    with pytest.raises(ValueError, match=r"heldout\.jsonl:2: 'answer' must be a non-empty string"):
        load_jsonl(path)
    records = synthetic_dataset(1, seed=0)
    records[0].answer = 3  # in-memory eval records get the same check
    with pytest.raises(ValueError, match="eval record 0: 'answer'"):
        validate_records(records, split="eval")


def test_mixed_negative_log_q_fails_at_load(tmp_path):
    """`negative_log_q` on some records only used to fail only when a batch happened to mix them."""
    from prefrank.train.loop import Trainer

    records = synthetic_dataset(4, seed=3, num_negatives=2)
    records[0].negative_log_q = [-1.0, -2.0]
    export_jsonl(records, tmp_path / "train.jsonl")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: 'negative_log_q' is given in .*train\.jsonl:1 but "
                                         r"not in .*train\.jsonl:2"):
        Trainer(_trainer_config(tmp_path, "misp_dpo", data=str(tmp_path / "train.jsonl")))
    assert not (tmp_path / "run").exists()


def test_misp_dpo_record_without_negatives_names_its_line(tmp_path):
    records = synthetic_dataset(3, seed=3, num_negatives=2)
    records[1].negative_images = []
    export_jsonl(records, tmp_path / "train.jsonl")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: misp_dpo needs negative_images"):
        validate_records(load_jsonl(tmp_path / "train.jsonl"), METHODS["misp_dpo"]())
