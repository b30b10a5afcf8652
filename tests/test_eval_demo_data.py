"""The demo scenes' answers follow from what is drawn, and the generator is deterministic."""

import json
import os
import re

import pytest
from PIL import Image

from datagen.demo import COLOURS, QUESTION_TYPES, make_demo_data, position_name
from trainer.eval.scoring import score


def _question(record):
    assert record["conversations"][0]["value"].startswith("<image>\n")
    return record["conversations"][0]["value"][len("<image>\n"):], record["conversations"][1]["value"]


def test_answers_are_grounded_in_the_drawing(tmp_path):
    paths = make_demo_data(str(tmp_path), num_train=40, num_heldout=10, seed=3, shards=False)
    records = json.load(open(paths["train_json"]))
    assert len(records) == 40 and len(json.load(open(paths["heldout_json"]))) == 10
    yes_no = []
    for r in records:
        question, answer = _question(r)
        scene = r["scene"]
        image = Image.open(os.path.join(tmp_path, r["image"])).convert("RGB")
        assert 224 <= image.size[0] <= 336 and image.size[0] == image.size[1]
        # The pixel at each shape's cell centre has that shape's colour.
        cell = image.size[0] / 3
        for s in scene:
            row, column = s["cell"]
            assert image.getpixel((int((column + 0.5) * cell), int((row + 0.5) * cell))) == COLOURS[s["colour"]]
        assert 1 <= len(scene) <= 4
        assert len({s["shape"] for s in scene}) == len(scene) and len({s["colour"] for s in scene}) == len(scene)
        by_shape = {s["shape"]: s for s in scene}
        by_colour = {s["colour"]: s for s in scene}
        if r["source"] == "demo_count":
            assert answer == str(len(scene)) and r["answers"][0] == answer
            assert score(r["answers"][1], {"task": r["task"], "answer": answer, "answers": r["answers"]}) == 1.0
        elif r["source"] == "demo_colour":
            shape = re.fullmatch(r"What colour is the (\w+)\?", question).group(1)
            assert by_shape[shape]["colour"] == answer
        elif r["source"] == "demo_position":
            colour, shape = re.fullmatch(r"Where is the (\w+) (\w+)\?", question).groups()
            assert by_shape[shape]["colour"] == colour and position_name(*by_shape[shape]["cell"]) == answer
        elif r["source"] == "demo_yesno":
            colour, shape = re.fullmatch(r"Is there a (\w+) (\w+)\?", question).groups()
            present = shape in by_shape and by_shape[shape]["colour"] == colour
            assert answer == ("yes" if present else "no") and r["task"] == "yesno"
            yes_no.append(answer)
        else:
            assert r["source"] == "demo_choice" and r["task"] == "choice"
            chosen = r["choices"]["ABC".index(answer)]
            m = re.match(r"Which shape is (\w+)\?", question)
            if m:
                assert by_colour[m.group(1)]["shape"] == chosen
            else:
                shape = re.match(r"What colour is the (\w+)\?", question).group(1)
                assert by_shape[shape]["colour"] == chosen
            assert "\n".join(f"{l}. {o}" for l, o in zip("ABC", r["choices"])) in question
    assert {r["source"] for r in records} == {f"demo_{t}" for t in QUESTION_TYPES}
    assert yes_no.count("yes") == yes_no.count("no") == 4


def test_same_seed_same_files(tmp_path):
    a = make_demo_data(str(tmp_path / "a"), num_train=6, num_heldout=2, seed=1, shards=False)
    b = make_demo_data(str(tmp_path / "b"), num_train=6, num_heldout=2, seed=1, shards=False)
    c = make_demo_data(str(tmp_path / "c"), num_train=6, num_heldout=2, seed=2, shards=False)
    for split in ("train_json", "heldout_json"):
        assert open(a[split]).read() == open(b[split]).read()
    assert open(a["train_json"]).read() != open(c["train_json"]).read()
    for name in os.listdir(tmp_path / "a" / "images"):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()


@pytest.mark.slow
def test_spoken_shards_per_split(tmp_path):
    paths = make_demo_data(str(tmp_path), num_train=3, num_heldout=2, seed=0)
    for split, n in (("train", 3), ("heldout", 2)):
        assert paths[f"{split}_shards"] == str(tmp_path / "shards" / split / "shard-{000000..000000}.tar")
        index = json.loads((tmp_path / "shards" / split / "index.json").read_text())
        assert index["samples"] == n and index["skipped"] == {}
