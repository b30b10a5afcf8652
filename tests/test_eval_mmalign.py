"""MMAlign from a small fake ARO directory: crops, option order, answers and shards."""

import io
import json
import os
import tarfile

import pytest
from PIL import Image

from tools.build_mmalign import build_items, build_mmalign
from trainer.eval.scoring import score


def _fake_aro(root):
    os.makedirs(root / "images")
    for name, colour in (("1.jpg", (200, 0, 0)), ("2.jpg", (0, 0, 200))):
        image = Image.new("RGB", (120, 90), (255, 255, 255))
        image.paste(colour, (10, 20, 60, 70))  # the box region has its own colour
        image.save(root / "images" / name)
    box = {"bbox_x": 10, "bbox_y": 20, "bbox_w": 50, "bbox_h": 50}
    relation = [
        {"image_path": "1.jpg", **box, "true_caption": "the horse is in front of the fence",
         "false_caption": "the fence is in front of the horse", "relation_name": "in front of"},
        {"image_path": "2.jpg", **box, "true_caption": "the cat is on the table",
         "false_caption": "the table is on the cat", "relation_name": "on"},
        {"image_path": "1.jpg", **box, "true_caption": "the man is riding the horse",
         "false_caption": "the horse is riding the man", "relation_name": "riding"},
    ]
    attribution = [
        {"image_path": "2.jpg", **box, "true_caption": "the white horse and the brown fence",
         "false_caption": "the brown horse and the white fence", "attributes": ["white", "brown"]},
        {"image_path": str(root / "images" / "1.jpg"), **box, "true_caption": "the red car and the blue sky",
         "false_caption": "the blue car and the red sky", "attributes": ["red", "blue"]},
    ]
    (root / "visual_genome_relation.json").write_text(json.dumps(relation))
    (root / "visual_genome_attribution.json").write_text(json.dumps(attribution))
    return relation + attribution


def test_items_crop_and_answer(tmp_path):
    aro = tmp_path / "aro"
    records = _fake_aro(aro)
    items = build_items(str(aro), str(tmp_path / "out"), seed=0)
    assert [i["source"] for i in items] == ["vg_relation"] * 3 + ["vg_attribution"] * 2
    for item, record in zip(items, records):
        question = item["conversations"][0]["value"]
        answer = item["conversations"][1]["value"]
        assert item["task"] == "choice" and answer in ("A", "B")
        assert sorted(item["choices"]) == sorted([record["true_caption"], record["false_caption"]])
        assert item["choices"]["AB".index(answer)] == record["true_caption"]
        assert f"A. {item['choices'][0]}\nB. {item['choices'][1]}" in question
        # The scorer accepts the true caption's letter and its text, rejects the twin.
        meta = {"task": "choice", "answer": answer, "choices": item["choices"]}
        assert score(record["true_caption"], meta) == 1.0 and score(record["false_caption"], meta) == 0.0
        crop = Image.open(tmp_path / "out" / item["image"])
        assert crop.size == (50, 50)
        assert crop.convert("RGB").getpixel((25, 25)) != (255, 255, 255)  # inside the box, not the background
    # Same seed -> same order; the order is not fixed to "true first".
    again = build_items(str(aro), str(tmp_path / "again"), seed=0)
    assert [i["choices"] for i in again] == [i["choices"] for i in items]
    orders = {tuple(i["choices"]) == (r["true_caption"], r["false_caption"])
              for seed in range(6) for i, r in zip(build_items(str(aro), str(tmp_path / f"s{seed}"), seed=seed), records)}
    assert orders == {True, False}


def test_limit_and_bad_records(tmp_path):
    aro = tmp_path / "aro"
    _fake_aro(aro)
    items = build_items(str(aro), str(tmp_path / "out"), seed=1, limit=2)
    assert sum(i["source"] == "vg_relation" for i in items) == 2
    records = json.loads((aro / "visual_genome_relation.json").read_text())
    del records[1]["false_caption"]
    (aro / "visual_genome_relation.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="record 1 lacks field.*false_caption"):
        build_items(str(aro), str(tmp_path / "bad"))
    with pytest.raises(FileNotFoundError, match="neither"):
        build_items(str(tmp_path / "out"), str(tmp_path / "none"))


@pytest.mark.slow
def test_spoken_shards(tmp_path):
    aro = tmp_path / "aro"
    _fake_aro(aro)
    index = build_mmalign(str(aro), str(tmp_path / "out"), seed=0)
    assert index["items"] == {"vg_relation": 3, "vg_attribution": 2}
    assert set(index["shard_specs"]) == {"vg_relation", "vg_attribution"}
    for source, n in index["items"].items():
        shard = tmp_path / "out" / "shards" / source / "shard-000000.tar"
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            metas = [json.load(io.BytesIO(tar.extractfile(m).read())) for m in tar.getmembers() if m.name.endswith(".json")]
        assert sum(n.endswith(".flac") for n in names) == n
        assert all(m["source"] == source and m["task"] == "choice" and len(m["choices"]) == 2 for m in metas)
