"""tools/make_eval_shards.py on tiny fixtures of each benchmark, built here with the real
column names (lmms-eval Parquet exports) and file layouts (original releases): read back
through the evaluation loader, the shards hold the typed questions, references, tasks,
choices and ids the scorer expects, spoken audio for every sample and an image where the
item has one; the shards' JSON holds the "bench" fields."""

import io
import json
import os
import re
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from datagen.benchmarks import convert_benchmark
from tools import make_eval_shards
from trainer.data import build_eval_loader
from trainer.models.tiny import build_tiny_processor

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def image_bytes(colour: str, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def write_parquet(path, columns: dict) -> None:
    """columns: name -> values; "image" values are (bytes, path) pairs or None."""
    arrays = {name: pa.array([None if v is None else {"bytes": v[0], "path": v[1]} for v in values], IMAGE)
              if name == "image" else pa.array(values) for name, values in columns.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path)


def write_file(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))


def convert(out, processor, benchmark, src, *flags):
    """Run the CLI; return (index, {id: what the loader gives}, {id: the shard JSON's bench})."""
    index = make_eval_shards.main(["--benchmark", benchmark, "--src", str(src), "--out", str(out), "--no_progress",
                                   *flags])
    loader = build_eval_loader(index["shard_spec"], processor, micro_batch_size=1, max_seq_len=4096, rank=0,
                               world_size=1)
    samples = {}
    for batch in loader:
        samples[batch.ids[0]] = {
            "question": batch.questions[0], "answers": batch.answers[0], "task": batch.tasks[0],
            "choices": batch.choices[0], "source": batch.sources[0],
            "audio": batch.input_features is not None and int(batch.audio_token_counts[0]) > 0,
            "image": batch.pixel_values is not None,
        }
    bench = {}
    for shard in index["shards"]:
        with tarfile.open(out / "shards" / shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    bench[meta["id"]] = meta["bench"]
    return index, samples, bench


def expect(source, question, answer, task, bench, *, image=True, choices=None, answers=None) -> tuple[dict, dict]:
    return ({"question": question, "answers": answers or [answer], "task": task, "choices": choices,
             "source": source, "audio": True, "image": image}, bench)


def check(result, expected: dict, skipped: dict | None = None) -> None:
    index, samples, bench = result
    assert index["samples"] == len(expected) and index["skipped"] == (skipped or {})
    assert samples == {key: sample for key, (sample, _) in expected.items()}
    assert bench == {key: fields for key, (_, fields) in expected.items()}


# --- MME ----------------------------------------------------------------------------------------

def mme_expected(first: str, second: str) -> dict:
    def mme(image_id, category, question, answer):
        return expect("mme", question + SHORT, answer, "yesno",
                      {"benchmark": "mme", "category": category, "image_id": image_id})

    return {
        f"mme-{first}-0": mme(first, first.split("/")[0], "Is the output 5?", "yes"),
        f"mme-{first}-1": mme(first, first.split("/")[0], "Is the output 6?", "no"),
        f"mme-{second}-0": mme(second, "artwork", "Is this artwork created by Monet?", "no"),
        f"mme-{second}-1": mme(second, "artwork", "Is this artwork created by Renoir?", "yes"),
    }


def test_mme_parquet(tmp_path, processor):
    code, art = image_bytes("red"), image_bytes("blue", "JPEG")
    write_parquet(tmp_path / "MME" / "data" / "test-00000-of-00004.parquet", {
        "question_id": ["code_reasoning/0020.png", "code_reasoning/0020.png", "artwork/10002.jpg",
                        "artwork/10002.jpg", "color/000000012345.jpg"],
        "image": [(code, "0020.png"), (code, "0020.png"), (art, "10002.jpg"), (art, "10002.jpg"),
                  (b"not an image", "000000012345.jpg")],
        "question": ["Is the output 5? Please answer yes or no.", "Is the output 6? Please answer yes or no.",
                     "Is this artwork created by Monet? Please answer yes or no.",
                     "Is this artwork created by Renoir? Please answer yes or no.",
                     "Is there a red car? Please answer yes or no."],
        "answer": ["Yes", "No", "No", "Yes", "Yes"],
        "category": ["code_reasoning", "code_reasoning", "artwork", "artwork", "color"],
    })
    out = tmp_path / "out"
    check(convert(out, processor, "mme", tmp_path / "MME"),
          mme_expected("code_reasoning/0020.png", "artwork/10002.jpg"), {"bad_image": 1})
    assert len(os.listdir(out / "images")) == 2  # one file per image, not per question


def test_mme_release(tmp_path, processor):
    root = tmp_path / "MME_Benchmark_release_version"
    write_file(root / "code_reasoning" / "0020.png", image_bytes("red"))
    write_file(root / "code_reasoning" / "0020.txt",
               "Is the output 5? Please answer yes or no.\tYes\nIs the output 6? Please answer yes or no.\tNo\n")
    write_file(root / "artwork" / "images" / "10002.jpg", image_bytes("blue", "JPEG"))
    write_file(root / "artwork" / "questions_answers_YN" / "10002.txt",
               "Is this artwork created by Monet? Please answer yes or no.\tNo\n"
               "Is this artwork created by Renoir? Please answer yes or no.\tYes\n")
    check(convert(tmp_path / "out", processor, "mme", root),
          mme_expected("code_reasoning/0020.png", "artwork/10002.jpg"))


# --- POPE ---------------------------------------------------------------------------------------

def pope_expected() -> dict:
    def pope(category, question_id, question, answer):
        return f"pope-{category}-{question_id}", expect("pope", question + SHORT, answer, "yesno",
                                                         {"benchmark": "pope", "category": category})

    return dict([pope("adversarial", 1, "Is there a snowboard in the image?", "yes"),
                 pope("popular", 1, "Is there a car in the image?", "no"),
                 pope("random", 1, "Is there a dog in the image?", "no")])


def test_pope_parquet(tmp_path, processor):
    snow, dog = image_bytes("white", "JPEG"), image_bytes("brown", "JPEG")
    write_parquet(tmp_path / "POPE" / "data" / "test-00000-of-00003.parquet", {
        "id": ["0", "3000", "6000", "6001"],
        "question_id": ["1", "1", "1", "2"],
        "question": ["Is there a snowboard in the image?", " Is there a car in the image? ",
                     "Is there a dog in the image?", "Is there a cat in the image?"],
        "answer": ["yes", "no", "no", "yes"],
        "image_source": ["COCO_val2014_000000310196", "COCO_val2014_000000310196", "COCO_val2014_000000210789",
                         "COCO_val2014_000000429109"],
        "image": [(snow, None), (snow, None), (dog, None), (None, "COCO_val2014_000000429109.jpg")],
        "category": ["adversarial", "popular", "random", "random"],
    })
    check(convert(tmp_path / "out", processor, "pope", tmp_path / "POPE"), pope_expected(), {"missing_image": 1})


def test_pope_release(tmp_path, processor):
    def line(question_id, image, text, label):
        return json.dumps({"question_id": question_id, "image": image, "text": text, "label": label}) + "\n"

    coco = tmp_path / "coco" / "val2014"
    write_file(coco / "COCO_val2014_000000310196.jpg", image_bytes("white", "JPEG"))
    write_file(coco / "COCO_val2014_000000210789.jpg", image_bytes("brown", "JPEG"))
    pope = tmp_path / "POPE" / "output" / "coco"
    write_file(pope / "coco_pope_adversarial.json",
               line(1, "COCO_val2014_000000310196.jpg", "Is there a snowboard in the image?", "yes"))
    write_file(pope / "coco_pope_popular.json",
               line(1, "COCO_val2014_000000310196.jpg", "Is there a car in the image?", "no"))
    write_file(pope / "coco_pope_random.json",
               line(1, "COCO_val2014_000000210789.jpg", "Is there a dog in the image?", "no")
               + line(2, "COCO_val2014_000000429109.jpg", "Is there a cat in the image?", "yes"))
    check(convert(tmp_path / "out", processor, "pope", pope, "--image_root", str(coco)), pope_expected(),
          {"missing_image": 1})


# --- TextVQA ------------------------------------------------------------------------------------

CAMERA = ["nous les gosses"] * 6 + ["dakota"] * 2 + ["clos culombu", "dakota digital"]
TEXT = ["copenhagen"] * 4 + ["thursday"] * 4 + ["copenhagen thursday", "cph"]  # a tie: the first given wins


def textvqa_expected() -> dict:
    return {
        "textvqa-34602": expect("textvqa", "What is the brand of this camera?" + SHORT, "nous les gosses", "open",
                                {"benchmark": "textvqa"}, answers=CAMERA),
        "textvqa-34603": expect("textvqa", "What does the small white text spell?" + SHORT, "copenhagen", "open",
                                {"benchmark": "textvqa"}, answers=TEXT),
    }


def textvqa_item(question_id, image_id, question, answers) -> dict:
    return {"image_id": image_id, "question_id": question_id, "question": question,
            "question_tokens": question.rstrip("?").split(), "image_width": 1024, "image_height": 768,
            "flickr_original_url": f"https://farm.example/{image_id}_o.jpg",
            "flickr_300k_url": f"https://farm.example/{image_id}.jpg", "answers": answers,
            "image_classes": ["Camera"], "set_name": "val"}


def test_textvqa_parquet(tmp_path, processor):
    items = [textvqa_item(34602, "003a8ae2ef43b901", "what is the brand of this camera?", CAMERA),
             textvqa_item(34603, "004e21eb2e686f40", "what does the small white text spell?", TEXT)]
    images = [(image_bytes("gray", "JPEG"), None), (image_bytes("black", "JPEG"), None)]
    columns = {name: [item[name] for item in items] for name in items[0]}
    write_parquet(tmp_path / "textvqa" / "data" / "validation-00000-of-00003.parquet",
                  {**columns, "image": images, "ocr_tokens": [["nous", "les", "gosses"], ["copenhagen"]]})
    write_parquet(tmp_path / "textvqa" / "data" / "test-00000-of-00003.parquet",  # not read: default split validation
                  {**columns, "answers": [None, None], "image": images, "ocr_tokens": [[], []]})
    check(convert(tmp_path / "out", processor, "textvqa", tmp_path / "textvqa"), textvqa_expected())
    test_file = tmp_path / "textvqa" / "data" / "test-00000-of-00003.parquet"
    with pytest.raises(ValueError, match=re.escape(f"{test_file} row 0: no answers")):
        convert_benchmark("textvqa", str(tmp_path / "textvqa"), str(tmp_path / "test_out"), split="test")


def test_textvqa_release(tmp_path, processor):
    write_file(tmp_path / "train_images" / "003a8ae2ef43b901.jpg", image_bytes("gray", "JPEG"))
    write_file(tmp_path / "train_images" / "004e21eb2e686f40.jpg", image_bytes("black", "JPEG"))
    write_file(tmp_path / "TextVQA_0.5.1_val.json", {
        "dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
        "data": [textvqa_item(34602, "003a8ae2ef43b901", "what is the brand of this camera?", CAMERA),
                 textvqa_item(34603, "004e21eb2e686f40", "what does the small white text spell?", TEXT)]})
    check(convert(tmp_path / "out", processor, "textvqa", tmp_path / "TextVQA_0.5.1_val.json", "--image_root",
                  str(tmp_path / "train_images")), textvqa_expected())


# --- HallusionBench -----------------------------------------------------------------------------

HALLUSION = [  # category, subcategory, visual_input, set_id, figure_id, question_id, question, gt_answer, filename
    ("VD", "illusion", "1", "0", "0", "0", "Is the right orange circle the same size as the left orange circle?", "1",
     "./hallusion_bench/VD/illusion/0_0.png"),
    ("VD", "illusion", "1", "0", "0", "1", "Is the right orange circle larger than the left orange circle?", "0",
     "./hallusion_bench/VD/illusion/0_0.png"),
    ("VS", "chart", "2", "1", "1", "0", "According to the chart, did sales rise in 2020?", "1",
     "./hallusion_bench/VS/chart/1_1.png"),
    ("VS", "map", "0", "2", "0", "0", "Is New York the capital of the United States?", "0", ""),
]
HALLUSION_KEYS = ("category", "subcategory", "visual_input", "set_id", "figure_id", "question_id", "question",
                  "gt_answer", "filename")


def hallusion_items() -> list[dict]:
    return [{**dict(zip(HALLUSION_KEYS, row)), "sample_note": "note", "gt_answer_details": "details"}
            for row in HALLUSION]


def hallusion_expected(rows=HALLUSION) -> dict:
    expected = {}
    for category, subcategory, visual_input, set_id, figure_id, question_id, question, gt_answer, _ in rows:
        key = f"hallusionbench-{category}_{subcategory}_{set_id}_{figure_id}_{question_id}"
        expected[key] = expect("hallusionbench", question, "yes" if gt_answer == "1" else "no", "yesno",
                               {"benchmark": "hallusionbench", "category": category, "subcategory": subcategory,
                                "set_id": set_id, "figure_id": figure_id, "question_id": question_id,
                                "visual_input": visual_input}, image=visual_input != "0")
    return expected


def test_hallusionbench_parquet(tmp_path, processor):
    images = {"./hallusion_bench/VD/illusion/0_0.png": image_bytes("orange"),
              "./hallusion_bench/VS/chart/1_1.png": image_bytes("green")}
    items = hallusion_items()
    for split, rows in (("image", items[:3]), ("non_image", items[3:])):
        write_parquet(tmp_path / "HallusionBench" / "data" / f"{split}-00000-of-00001.parquet",
                      {**{name: [row[name] for row in rows] for name in rows[0]},
                       "image": [(images[row["filename"]], None) if row["filename"] else None for row in rows]})
    check(convert(tmp_path / "all", processor, "hallusionbench", tmp_path / "HallusionBench"), hallusion_expected())
    # --split image keeps data/image-*.parquet, not data/non_image-*.parquet
    index = convert_benchmark("hallusionbench", str(tmp_path / "HallusionBench"), str(tmp_path / "image"),
                              split="image", progress=False)
    assert index["samples"] == 3


def test_hallusionbench_release(tmp_path, processor):
    root = tmp_path / "HallusionBench"
    write_file(root / "hallusion_bench" / "VD" / "illusion" / "0_0.png", image_bytes("orange"))
    write_file(root / "hallusion_bench" / "VS" / "chart" / "1_1.png", image_bytes("green"))
    write_file(root / "HallusionBench.json", hallusion_items())
    check(convert(tmp_path / "out", processor, "hallusionbench", root / "HallusionBench.json"), hallusion_expected())


# --- ScienceQA-IMG ------------------------------------------------------------------------------

SCIENCEQA = [  # question, hint, choices, answer, subject, grade, category
    ("Which of these states is farthest north?", "", ["West Virginia", "Louisiana", "Arizona", "Oklahoma"], 0,
     "social science", "grade2", "Geography"),
    ("Which animal's feet are also adapted for walking on snow?", "Snowshoe hares live in cold places.",
     ["lynx", "red-tailed hawk"], 1, "natural science", "grade4", "Adaptations"),
    ("Which month is the wettest on average in Christchurch?", "Use the graph to answer the question below.",
     ["May", "June", "July", "August", "April"], 4, "natural science", "grade5", "Weather and climate"),
]


def scienceqa_problem(question, hint, choices, answer, subject, grade, category) -> dict:
    return {"question": question, "hint": hint, "choices": choices, "answer": answer, "task": "closed choice",
            "grade": grade, "subject": subject, "topic": "geography", "category": category, "skill": "skill",
            "lecture": "lecture", "solution": "solution"}


def scienceqa_expected(ids) -> dict:
    expected = {}
    for pid, (question, hint, choices, answer, subject, grade, category) in zip(ids, SCIENCEQA):
        options = "\n".join(f"{letter}. {choice}" for letter, choice in zip("ABCDE", choices))
        typed = (f"Context: {hint}\n" if hint else "") + f"{question}\n{options}" + LETTER
        expected[f"scienceqa-{pid}"] = expect("scienceqa", typed, "ABCDE"[answer], "choice",
                                              {"benchmark": "scienceqa", "subject": subject, "grade": grade,
                                               "category": category}, choices=choices)
    return expected


def test_scienceqa_parquet(tmp_path, processor):
    for split, rows in (("test", SCIENCEQA), ("validation", SCIENCEQA[:1])):  # validation: not read
        problems = [scienceqa_problem(*row) for row in rows]
        write_parquet(tmp_path / "ScienceQA" / "ScienceQA-IMG" / f"{split}-00000-of-00001.parquet",
                      {"image": [(image_bytes(colour), None) for colour in ("red", "green", "blue")[:len(rows)]],
                       **{name: [p[name] for p in problems] for name in problems[0]}})
    check(convert(tmp_path / "out", processor, "scienceqa", tmp_path / "ScienceQA"), scienceqa_expected([0, 1, 2]))


def test_scienceqa_release(tmp_path, processor):
    root = tmp_path / "ScienceQA" / "data" / "scienceqa"
    problems = {pid: {**scienceqa_problem(*row), "image": "image.png", "split": "test"}
                for pid, row in zip(("1", "3", "7"), SCIENCEQA)}
    problems["2"] = {**scienceqa_problem(*SCIENCEQA[0]), "image": None, "split": "test"}  # text-only: not IMG
    problems["9"] = {**scienceqa_problem(*SCIENCEQA[1]), "image": "image.png", "split": "val"}
    for pid, colour in (("1", "red"), ("3", "green"), ("7", "blue"), ("9", "black")):
        write_file(root / "images" / problems[pid]["split"] / pid / "image.png", image_bytes(colour))
    write_file(root / "problems.json", problems)
    write_file(root / "pid_splits.json", {"train": [], "val": ["9"], "test": ["1", "2", "3", "7"]})
    check(convert(tmp_path / "out", processor, "scienceqa", root), scienceqa_expected(["1", "3", "7"]),
          {"no_image": 1})


# --- bad inputs -----------------------------------------------------------------------------------

def test_missing_column_names_file_and_column(tmp_path):
    path = tmp_path / "MME" / "data" / "test-00000-of-00001.parquet"
    write_parquet(path, {"question_id": ["artwork/10002.jpg"], "image": [(image_bytes("blue"), None)],
                         "question": ["Is this by Monet? Please answer yes or no."], "answer": ["No"]})
    with pytest.raises(ValueError, match=re.escape(f"{path}: no column 'category'")):
        convert_benchmark("mme", str(tmp_path / "MME"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # refused before anything is written


# --- converted shards through tools/evaluate.py -------------------------------------------------

@pytest.mark.slow
def test_evaluate_on_converted_shards_prints_the_benchmark_table(tmp_path, processor, capsys):
    """MME and POPE converted from Parquet fixtures, evaluated typed and spoken by the tiny model:
    report.json scores each benchmark by its own rule, and the printed table has a row per
    benchmark (its headline, VL, VA, gap) and the average, equal to the report's figures."""
    from tools import evaluate
    from trainer.eval.benchmarks import benchmark_report
    from trainer.models.build import build_tiny
    from trainer.models.serialize import save_omni

    test_mme_parquet(tmp_path / "mme", processor)
    test_pope_parquet(tmp_path / "pope", processor)
    specs = [json.loads((tmp_path / name / "out" / "shards" / "index.json").read_text())["shard_spec"]
             for name in ("mme", "pope")]
    save_omni(build_tiny(processor, attn_impl="sdpa", seed=0), processor, str(tmp_path / "model"))
    capsys.readouterr()
    out = tmp_path / "eval" / "report.json"
    evaluate.main(["--model", str(tmp_path / "model"), "--shards", ",".join(specs), "--out", str(out),
                   "--batch_size", "2", "--max_new_tokens", "3"])
    printed = capsys.readouterr().out.splitlines()
    report = json.loads(out.read_text())
    records = [json.loads(line) for line in (tmp_path / "eval" / "report.predictions.jsonl").read_text().splitlines()]
    assert report["n"] == 4 + 3 and len(records) == 2 * 7
    assert report["benchmarks"] == benchmark_report(records)
    mme, pope = report["benchmarks"]["mme"], report["benchmarks"]["pope"]
    assert set(mme["text"]["categories"]) == {"code_reasoning", "artwork"} and mme["text"]["n"] == 4
    assert set(pope["audio"]["categories"]) == {"adversarial", "popular", "random"} and pope["audio"]["n"] == 3
    header = next(i for i, line in enumerate(printed) if line.split()[:2] == ["benchmark", "metric"])
    rows = {line.split()[0]: line.split()[1:] for line in printed[header + 1:header + 4]}
    assert set(rows) == {"mme", "pope", "average"}
    for name, metric in (("mme", "total"), ("pope", "f1")):
        entry = report["benchmarks"][name]
        assert rows[name] == [metric, f"{entry['vl']:.2f}", f"{entry['va']:.2f}", f"{entry['gap']:.2f}"]
    average = report["benchmarks"]["average"]
    assert rows["average"] == ["percent", f"{average['vl']:.2f}", f"{average['va']:.2f}", f"{average['gap']:.2f}"]
    assert average["vl"] == pytest.approx((mme["text"]["percent"] + pope["text"]["f1"]) / 2)
