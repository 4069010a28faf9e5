"""Preference records: the embedded synthetic visual-QA task and a JSONL loader for user data.

A record is one (image, question) with K candidate responses and their preference levels (`groups` as in
DESIGN.md: 0 = most preferred, equal levels tie, -1 = padding). Optional `negative_images` (with
`negative_log_q`, the log proposal probability of each) feed MISP-DPO's image-side term.
"""

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, UnidentifiedImageError

IMAGE_SIZE = 32
BACKGROUND = (24, 24, 24)
COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = ("one", "two", "three", "four")
POSITIONS = ("left", "right", "top", "bottom")
TASKS = {
    "color": (("What color is the shape?", "Which color is the object?"), tuple(COLORS)),
    "shape": (("What shape is shown?", "Which shape is in the picture?"), SHAPES),
    "count": (("How many shapes are there?", "Count the shapes."), COUNT_WORDS),
    "position": (("Where is the shape?", "On which side is the object?"), POSITIONS),
}


@dataclass
class PreferenceRecord:
    image: Image.Image
    question: str
    responses: list[str]
    groups: list[int]
    answer: str | None = None  # the exact-match target for evaluation (synthetic data always has one)
    negative_images: list[Image.Image] = field(default_factory=list)
    negative_log_q: list[float] | None = None
    source: str | None = None  # "file:line" of a record loaded from JSONL: every later error names it

    @property
    def target(self):
        """The evaluation target: `answer`, else the first most-preferred response."""
        if self.answer is not None:
            return self.answer
        best = min(g for g in self.groups if g >= 0)
        return self.responses[self.groups.index(best)]


def _draw_shape(draw, shape, center, size, color):
    x, y = center
    half = size / 2
    if shape == "circle":
        draw.ellipse([x - half, y - half, x + half, y + half], fill=color)
    elif shape == "square":
        draw.rectangle([x - half, y - half, x + half, y + half], fill=color)
    else:
        draw.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=color)


def render_scene(shape, color, centers, size):
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for center in centers:
        _draw_shape(draw, shape, center, size, COLORS[color])
    return image


def _position_center(rng, position):
    near, far, middle = rng.uniform(6, 9), rng.uniform(23, 26), rng.uniform(12, 20)
    centers = {"left": (near, middle), "right": (far, middle), "top": (middle, near), "bottom": (middle, far)}
    return centers[position]


def _count_centers(rng, count):
    cells = rng.sample([(col, row) for row in range(3) for col in range(3)], count)
    centers = []
    for col, row in cells:
        centers.append((5.5 + 10.5 * col + rng.uniform(-1, 1), 5.5 + 10.5 * row + rng.uniform(-1, 1)))
    return centers


def synthetic_example(rng):
    """One random scene, question and answer set: the gold answer at level 0, every other answer of the same
    kind (same task) at level 1."""
    task = rng.choice(tuple(TASKS))
    templates, answers = TASKS[task]
    shape, color = rng.choice(SHAPES), rng.choice(tuple(COLORS))
    count, position = 1, None
    if task == "count":
        count = rng.randint(1, len(COUNT_WORDS))
        centers, size = _count_centers(rng, count), 7
    elif task == "position":
        position = rng.choice(POSITIONS)
        centers, size = [_position_center(rng, position)], 9
    else:
        centers, size = [(rng.uniform(12, 20), rng.uniform(12, 20))], rng.uniform(12, 16)
    gold = {"color": color, "shape": shape, "count": COUNT_WORDS[count - 1], "position": position}[task]
    others = [a for a in answers if a != gold]
    return PreferenceRecord(image=render_scene(shape, color, centers, size), question=rng.choice(templates),
                            responses=[gold, *others], groups=[0] + [1] * len(others), answer=gold)


def synthetic_dataset(num_examples, seed, num_negatives=0):
    """`num_examples` records from `random.Random(seed)`: the same seed gives the same data on every machine;
    use different seeds for the train and held-out splits. `num_negatives` > 0 attaches that many images of
    OTHER records as MISP-DPO negatives, drawn uniformly (`negative_log_q` stays None = uniform proposal)."""
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    rng = random.Random(seed)
    records = [synthetic_example(rng) for _ in range(num_examples)]
    if num_negatives:
        if num_negatives >= num_examples:
            raise ValueError(f"num_negatives={num_negatives} needs more than that many examples")
        for index, record in enumerate(records):
            others = rng.sample([i for i in range(num_examples) if i != index], num_negatives)
            record.negative_images = [records[i].image for i in others]
    return records


def export_jsonl(records, path, *, image_dir="images"):
    """Write records as JSONL + PNG files; image paths are relative to the JSONL's folder (its data root)."""
    path = Path(path)
    (path.parent / image_dir).mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for index, record in enumerate(records):
            image_path = f"{image_dir}/{path.stem}_{index:06d}.png"
            record.image.save(path.parent / image_path)
            line = {"image": image_path, "question": record.question, "responses": record.responses,
                    "groups": record.groups}
            if record.answer is not None:
                line["answer"] = record.answer
            if record.negative_images:
                negative_paths = []
                for k, negative in enumerate(record.negative_images):
                    negative_paths.append(f"{image_dir}/{path.stem}_{index:06d}_neg{k}.png")
                    negative.save(path.parent / negative_paths[-1])
                line["negative_images"] = negative_paths
                if record.negative_log_q is not None:
                    line["negative_log_q"] = record.negative_log_q
            handle.write(json.dumps(line) + "\n")


def _load_image(root, relative, where):
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{where}: 'image' must be a non-empty path string, got {relative!r}")
    resolved = (root / relative).resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(f"{where}: image path {relative!r} leaves the data root {root}")
    if not resolved.is_file():
        raise ValueError(f"{where}: image {relative!r} not found under the data root {root}")
    try:
        with Image.open(resolved) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{where}: image {relative!r} is not a readable image ({error})") from error


def _check_list(value, name, kind, where):
    if not isinstance(value, list) or not value or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                           for v in value):
        raise ValueError(f"{where}: {name!r} must be a non-empty list of {kind.__name__}, got {value!r}")


def load_jsonl(path, data_root=None):
    """Load `{"image", "question", "responses", "groups"}` lines (optional "answer", "negative_images",
    "negative_log_q"). Image paths are resolved under `data_root` (default: the JSONL's folder) and opened
    eagerly, so a missing or corrupt image fails here with a ValueError naming the file and line."""
    path = Path(path)
    root = Path(data_root if data_root is not None else path.parent).resolve()
    records = []
    with open(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error})") from error
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
            missing = [key for key in ("image", "question", "responses", "groups") if key not in item]
            if missing:
                raise ValueError(f"{where}: missing key(s) {missing}")
            if not isinstance(item["question"], str):
                raise ValueError(f"{where}: 'question' must be a string")
            _check_list(item["responses"], "responses", str, where)
            _check_list(item["groups"], "groups", int, where)
            if len(item["groups"]) != len(item["responses"]):
                raise ValueError(f"{where}: 'groups' has {len(item['groups'])} entries for "
                                 f"{len(item['responses'])} responses")
            if any(g < -1 for g in item["groups"]) or max(item["groups"]) < 0:
                raise ValueError(f"{where}: 'groups' must be levels >= 0 (or -1 = padding) with at least one "
                                 f"valid entry, got {item['groups']}")
            answer = item.get("answer")
            if answer is not None and (not isinstance(answer, str) or not answer.strip()):
                raise ValueError(f"{where}: 'answer' must be a non-empty string (the exact-match target), got "
                                 f"{answer!r}")
            record = PreferenceRecord(image=_load_image(root, item["image"], where),
                                      question=item["question"], responses=item["responses"],
                                      groups=item["groups"], answer=answer, source=where)
            negatives = item.get("negative_images", [])
            if negatives:
                _check_list(negatives, "negative_images", str, where)
                record.negative_images = [_load_image(root, p, where) for p in negatives]
            if "negative_log_q" in item:
                log_q = item["negative_log_q"]
                if not isinstance(log_q, list) or len(log_q) != len(negatives) or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v <= 0
                        for v in log_q):
                    raise ValueError(f"{where}: 'negative_log_q' must be a list of {len(negatives)} finite log "
                                     f"probabilities (<= 0), one per negative image, got {log_q!r}")
                record.negative_log_q = [float(v) for v in log_q]
            records.append(record)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def validate_records(records, method=None, split="train"):
    """Check every record before training starts, so bad data fails at load time, naming the record's
    `file:line` (or `<split> record <i>` for in-memory records) and the field, instead of crashing at the step
    whose batch first holds it. Any record: an `answer` that is a non-empty string if given and a valid level
    (the evaluation target). With a training `method` (a `prefrank.train.methods.Method`): a preference
    method needs two preference levels per record, the method's own request checks pass (MISP-DPO's negative
    images, …), and a method using negatives gets `negative_log_q` for every record or for none."""
    first_log_q = None
    for index, record in enumerate(records):
        where = record.source or f"{split} record {index}"
        if record.answer is not None and (not isinstance(record.answer, str) or not record.answer.strip()):
            raise ValueError(f"{where}: 'answer' must be a non-empty string, got {record.answer!r}")
        if len(record.groups) != len(record.responses) or not any(g >= 0 for g in record.groups):
            raise ValueError(f"{where}: 'groups' needs one level per response and a valid (>= 0) level, got "
                             f"{record.groups} for {len(record.responses)} responses")
        if method is None:
            continue
        if method.needs_reference and len({g for g in record.groups if g >= 0}) < 2:
            raise ValueError(f"{where}: 'groups' has a single preference level {record.groups}; method "
                             f"{method.name!r} needs at least two levels (a preferred and a dispreferred response)")
        method.requests(record, where)
        if method.needs_negatives:
            has_log_q = record.negative_log_q is not None
            if first_log_q is None:
                first_log_q = (where, has_log_q)
            elif has_log_q != first_log_q[1]:
                given, missing = (where, first_log_q[0]) if has_log_q else (first_log_q[0], where)
                raise ValueError(f"{where}: 'negative_log_q' is given in {given} but not in {missing}: give it "
                                 f"for every record (importance weights) or for none (a uniform proposal)")
    return records
