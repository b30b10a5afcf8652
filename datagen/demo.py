"""Demo data: pictures of coloured shapes with questions whose answers can be read off
the drawing, written as LLaVA JSON + images and (by default) as spoken-question shards.

Each scene holds 1-4 shapes (circle, square, triangle, star) in distinct cells of a 3x3
grid, each shape type and each colour at most once, so every question below has exactly
one right answer:
  colour    "What colour is the circle?"                 -> "red"          (open)
  count     "How many shapes are there?"                 -> "3"            (open, answers ["3", "three"])
  position  "Where is the red square?"                   -> "top right"    (open)
  yesno     "Is there a blue triangle?"                  -> "yes" / "no"   (yesno, half each)
  choice    "Which shape is green?\nA. circle\nB. square\nC. star\nAnswer with the option letter."
                                                          -> "B"           (choice)

make_demo_data(out_dir, ...) writes DIR/train.json, DIR/heldout.json, DIR/images/*.png and,
unless shards=False, DIR/shards/train/shard-*.tar and DIR/shards/heldout/shard-*.tar through
datagen.writer.make_llava_shards (built-in eSpeak NG TTS). Same seed -> same files.
Command line: tools/make_demo_data.py.
"""

import json
import math
import os
import random

from PIL import Image, ImageDraw

from datagen.writer import make_llava_shards

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
    "pink": (245, 120, 190),
    "brown": (120, 70, 30),
}
ROW_NAMES = ("top", "", "bottom")
COLUMN_NAMES = ("left", "", "right")
QUESTION_TYPES = ("colour", "count", "position", "yesno", "choice")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")


def position_name(row: int, column: int) -> str:
    """'top left', 'top', ..., 'centre' for a 3x3 grid cell."""
    return " ".join(n for n in (ROW_NAMES[row], COLUMN_NAMES[column]) if n) or "centre"


def random_scene(rng: random.Random) -> dict:
    """Canvas size, background and 1-4 shapes with distinct types, colours and cells."""
    n = rng.randint(1, 4)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], n)
    shapes = [
        {"shape": s, "colour": c, "cell": cell}
        for s, c, cell in zip(rng.sample(SHAPES, n), rng.sample(sorted(COLOURS), n), cells)
    ]
    grey = rng.randint(225, 250)
    return {"size": rng.randint(224, 336), "background": (grey, grey, grey), "shapes": shapes}


def _star_points(cx, cy, radius):
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def render_scene(scene: dict) -> Image.Image:
    size = scene["size"]
    image = Image.new("RGB", (size, size), scene["background"])
    draw = ImageDraw.Draw(image)
    cell = size / 3
    radius = cell * 0.32
    for item in scene["shapes"]:
        row, column = item["cell"]
        cx, cy = (column + 0.5) * cell, (row + 0.5) * cell
        fill = COLOURS[item["colour"]]
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if item["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif item["shape"] == "square":
            draw.rectangle(box, fill=fill)
        elif item["shape"] == "triangle":
            draw.polygon([(cx, cy - radius), (cx + radius, cy + radius * 0.8), (cx - radius, cy + radius * 0.8)], fill=fill)
        else:
            draw.polygon(_star_points(cx, cy, radius * 1.15), fill=fill)
    return image


def _options(rng: random.Random, correct: str, pool) -> tuple[list[str], str]:
    """Three options including `correct`, shuffled; returns (options, answer letter)."""
    options = [correct] + rng.sample([p for p in pool if p != correct], 2)
    rng.shuffle(options)
    return options, "ABC"[options.index(correct)]


def make_question(scene: dict, question_type: str, rng: random.Random, want_yes: bool) -> dict:
    """One grounded question about `scene`: {"question", "answer", "task", "source",
    optional "choices", "answers"}."""
    shapes = scene["shapes"]
    target = rng.choice(shapes)
    source = f"demo_{question_type}"
    if question_type == "colour":
        return {"question": f"What colour is the {target['shape']}?", "answer": target["colour"],
                "task": "open", "source": source}
    if question_type == "count":
        n = len(shapes)
        return {"question": "How many shapes are there?", "answer": str(n), "answers": [str(n), NUMBER_WORDS[n]],
                "task": "open", "source": source}
    if question_type == "position":
        return {"question": f"Where is the {target['colour']} {target['shape']}?",
                "answer": position_name(*target["cell"]), "task": "open", "source": source}
    if question_type == "yesno":
        present = {(s["colour"], s["shape"]) for s in shapes}
        if want_yes:
            colour, shape = target["colour"], target["shape"]
        else:
            # A present shape in a wrong colour half the time: "no" must need the picture.
            absent = [(c, s) for c in sorted(COLOURS) for s in SHAPES if (c, s) not in present]
            near_misses = [(c, s) for c, s in absent if s in {x[1] for x in present}]
            colour, shape = rng.choice(near_misses if near_misses and rng.random() < 0.5 else absent)
        return {"question": f"Is there a {colour} {shape}?", "answer": "yes" if want_yes else "no",
                "task": "yesno", "source": source}
    if question_type == "choice":
        if rng.random() < 0.5:
            options, letter = _options(rng, target["shape"], SHAPES)
            question = f"Which shape is {target['colour']}?"
        else:
            options, letter = _options(rng, target["colour"], sorted(COLOURS))
            question = f"What colour is the {target['shape']}?"
        # One option per line: the TTS normaliser reads a line-initial "B." as "option B".
        listed = "\n".join(f"{l}. {o}" for l, o in zip("ABC", options))
        return {"question": f"{question}\n{listed}\nAnswer with the option letter.", "answer": letter,
                "choices": options, "task": "choice", "source": source}
    raise ValueError(f"unknown question type {question_type!r}; expected one of {QUESTION_TYPES}")


def make_split(out_dir: str, split: str, num_samples: int, seed: int) -> list[dict]:
    """Render `num_samples` scenes into out_dir/images and return their LLaVA records.
    Question types rotate so each gets a fifth of the split; yes/no answers alternate."""
    rng = random.Random(f"shapes-{seed}-{split}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    records = []
    for i in range(num_samples):
        scene = random_scene(rng)
        question_type = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        want_yes = (i // len(QUESTION_TYPES)) % 2 == 0
        qa = make_question(scene, question_type, rng, want_yes)
        image_path = f"images/{split}_{i:05d}.png"
        render_scene(scene).save(os.path.join(out_dir, image_path))
        record = {
            "id": f"shapes-{split}-{i:05d}",
            "image": image_path,
            "conversations": [{"from": "human", "value": "<image>\n" + qa.pop("question")},
                              {"from": "gpt", "value": qa.pop("answer")}],
            "scene": [{"shape": s["shape"], "colour": s["colour"], "cell": list(s["cell"])} for s in scene["shapes"]],
        }
        record.update(qa)
        records.append(record)
    return records


def make_demo_data(out_dir: str, *, num_train: int = 400, num_heldout: int = 100, seed: int = 0,
                   shards: bool = True, samples_per_shard: int = 200, workers: int = 1,
                   voices: list[str] | None = None) -> dict:
    """Write train.json / heldout.json (+ images) under `out_dir`; with `shards`, also
    out_dir/shards/{train,heldout}/shard-*.tar with spoken questions. Returns the paths written:
    {"train_json", "heldout_json", "train_shards", "heldout_shards"} (shard values are
    webdataset brace specs, None without shards)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, n in (("train", num_train), ("heldout", num_heldout)):
        records = make_split(out_dir, split, n, seed)
        json_path = os.path.join(out_dir, f"{split}.json")
        with open(json_path, "w") as f:
            json.dump(records, f, indent=1)
        paths[f"{split}_json"] = json_path
        paths[f"{split}_shards"] = None
        if shards:
            paths[f"{split}_shards"] = _write_shards(json_path, out_dir, split, seed, samples_per_shard, workers, voices)
    return paths


def _write_shards(json_path, out_dir, split, seed, samples_per_shard, workers, voices) -> str:
    index = make_llava_shards(json_path, out_dir, os.path.join(out_dir, "shards", split), seed=seed,
                              samples_per_shard=samples_per_shard, workers=workers, voices=voices, progress=False)
    return index["shard_spec"]
