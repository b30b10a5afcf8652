"""MMAlign: ARO's VG-Relation and VG-Attribution turned into two-option questions, typed
and spoken, as evaluation shards.

Each ARO record gives an image, a box and two captions: the true one and its perturbed
twin (relation: subject and object swapped; attribution: attributes swapped). An item is
the image cropped to the box (as ARO crops it) and
    "Which caption describes the image?\nA. <caption>\nB. <caption>\nAnswer with the option letter."
with the two captions in a seeded random order; the answer is the true caption's letter
(task "choice", source "vg_relation" / "vg_attribution").

Input: ARO's annotation files and images, laid out as ARO downloads them:
    ARO_DIR/visual_genome_relation.json, ARO_DIR/visual_genome_attribution.json,
    ARO_DIR/images/<image_path>     (absolute image_path values are used as they are)
Run:
    python tools/build_mmalign.py --aro_dir data/aro --out data/mmalign --limit 300 --seed 0 --workers 4
    python tools/evaluate.py --model DIR --out runs/mmalign/report.json --shards \
        "data/mmalign/shards/vg_relation/shard-{000000..000000}.tar data/mmalign/shards/vg_attribution/shard-{000000..000000}.tar"
(OUT/index.json's "shard_spec" holds that --shards value; "shard_specs" one per source.)
Writes OUT/mmalign.json (LLaVA records), OUT/images/, and, unless --no_shards, spoken-question
shards per source in OUT/shards/vg_relation/ and OUT/shards/vg_attribution/ (the project's
TTS and shard writer, tools/make_shards.py) plus OUT/index.json with one shard spec over both.
--limit N keeps N seeded-random items per source (the paper's MMAlign scores are multiples of
1/3, consistent with 300 items per source; the paper does not say how it sampled them).
"""

import argparse
import json
import os
import random

from PIL import Image


SOURCES = {"vg_relation": "visual_genome_relation.json", "vg_attribution": "visual_genome_attribution.json"}
QUESTION = "Which caption describes the image?"
_REQUIRED_FIELDS = ("image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption")


def resolve_image(aro_dir: str, image_path: str) -> str:
    """ARO stores image names relative to ARO_DIR/images; absolute paths stay as they are."""
    if os.path.isabs(image_path):
        return image_path
    return os.path.join(aro_dir, "images", image_path)


def crop_to_box(image: Image.Image, record: dict) -> Image.Image:
    """ARO's crop: (x, y, x + w, y + h) in pixels."""
    x, y, w, h = (float(record[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
    return image.crop((int(x), int(y), int(x + w), int(y + h)))


def make_item(record: dict, source: str, index: int, image_path: str, rng: random.Random) -> dict:
    """One LLaVA record (image path relative to OUT) for an ARO record."""
    captions = [str(record["true_caption"]).strip(), str(record["false_caption"]).strip()]
    if rng.random() < 0.5:
        captions.reverse()
    letter = "AB"[captions.index(str(record["true_caption"]).strip())]
    listed = "\n".join(f"{l}. {c}" for l, c in zip("AB", captions))
    item = {
        "id": f"{source}-{index:06d}",
        "image": image_path,
        "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}\n{listed}\nAnswer with the option letter."},
                          {"from": "gpt", "value": letter}],
        "task": "choice",
        "choices": captions,
        "source": source,
    }
    for key in ("relation_name", "attributes"):
        if key in record:
            item[key] = record[key]
    return item


def build_items(aro_dir: str, out_dir: str, *, seed: int = 0, limit: int | None = None) -> list[dict]:
    """Crop the images of every present ARO subset into out_dir/images and return the items.
    Records are taken in file order (or a seeded sample of `limit` per source)."""
    found = {s: os.path.join(aro_dir, f) for s, f in SOURCES.items() if os.path.isfile(os.path.join(aro_dir, f))}
    if not found:
        raise FileNotFoundError(f"{aro_dir} holds neither of {sorted(SOURCES.values())}")
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    items = []
    for source, json_path in found.items():
        with open(json_path) as f:
            records = json.load(f)
        if not isinstance(records, list):
            raise ValueError(f"{json_path}: expected a JSON list of ARO records")
        rng = random.Random(f"mmalign-{seed}-{source}")
        indices = range(len(records))
        if limit is not None and limit < len(records):
            indices = sorted(rng.sample(indices, limit))
        for index in indices:
            record = records[index]
            missing = [k for k in _REQUIRED_FIELDS if k not in record]
            if missing:
                raise ValueError(f"{json_path}: record {index} lacks field(s) {missing}")
            if float(record["bbox_w"]) < 1 or float(record["bbox_h"]) < 1:
                raise ValueError(f"{json_path}: record {index}: empty box (fields bbox_w/bbox_h)")
            source_image = resolve_image(aro_dir, record["image_path"])
            if not os.path.isfile(source_image):
                raise FileNotFoundError(f"{json_path}: record {index}, field image_path: {source_image} not found")
            crop = crop_to_box(Image.open(source_image).convert("RGB"), record)
            image_path = f"images/{source}-{index:06d}.jpg"
            crop.save(os.path.join(out_dir, image_path), quality=95)
            items.append(make_item(record, source, index, image_path, rng))
    return items


def build_mmalign(aro_dir: str, out_dir: str, *, seed: int = 0, limit: int | None = None, shards: bool = True,
                  samples_per_shard: int = 1000, workers: int = 1, voices: list[str] | None = None,
                  tts_cmd: str | None = None) -> dict:
    """Items -> OUT/mmalign.json and (with `shards`) spoken shards per source.
    Returns {"json", "items": {source: n}, "shard_spec": all shards or None, "shard_specs": {source: spec}}."""
    items = build_items(aro_dir, out_dir, seed=seed, limit=limit)
    json_path = os.path.join(out_dir, "mmalign.json")
    with open(json_path, "w") as f:
        json.dump(items, f, indent=1)
    counts = {}
    for item in items:
        counts[item["source"]] = counts.get(item["source"], 0) + 1
    index = {"json": json_path, "items": counts, "shard_spec": None, "shard_specs": {}}
    if shards:
        from datagen.writer import make_llava_shards

        for source in counts:
            source_json = os.path.join(out_dir, f"{source}.json")
            with open(source_json, "w") as f:
                json.dump([i for i in items if i["source"] == source], f, indent=1)
            written = make_llava_shards(source_json, out_dir, os.path.join(out_dir, "shards", source), seed=seed,
                                        samples_per_shard=samples_per_shard, workers=workers, voices=voices,
                                        tts_cmd=tts_cmd, progress=False)
            index["shard_specs"][source] = written["shard_spec"]
        # The eval loader takes several brace specs separated by spaces.
        index["shard_spec"] = " ".join(index["shard_specs"].values())
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return index


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aro_dir", required=True, help="ARO annotation JSONs + images/ (see above)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="option order, --limit sample and TTS voices")
    parser.add_argument("--limit", type=int, default=None, help="items per source (default: all)")
    parser.add_argument("--no_shards", action="store_true", help="write JSON + cropped images only")
    parser.add_argument("--samples_per_shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="TTS worker processes")
    parser.add_argument("--voices", default=None, help="comma-separated eSpeak NG voices")
    parser.add_argument("--tts_cmd", default=None, help="external TTS command template (see tools/make_shards.py)")
    args = parser.parse_args(argv)
    index = build_mmalign(args.aro_dir, args.out, seed=args.seed, limit=args.limit, shards=not args.no_shards,
                          samples_per_shard=args.samples_per_shard, workers=args.workers,
                          voices=args.voices.split(",") if args.voices else None, tts_cmd=args.tts_cmd)
    print(json.dumps(index, indent=2))


if __name__ == "__main__":
    main()
