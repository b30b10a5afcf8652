"""Held-out benchmarks as spoken-question shards: MME, POPE, TextVQA, HallusionBench and
ScienceQA-IMG, from their lmms-eval Parquet copies (lmms-lab/* on the HF hub) or their
original release files. Used by tools/make_eval_shards.py.

convert_benchmark writes OUT/images/ (each distinct image once, its original bytes),
OUT/<benchmark>.json (LLaVA records) and OUT/shards/ through make_llava_shards, which speaks
the typed question. A record holds id, image ("images/<file>"; absent when text-only),
conversations (human "<image>\\n" + question, gpt answer), task, source (the benchmark),
bench (the fields the scorer groups by) and, where the task has them, choices / answers.
Questions follow lmms-eval's default prompts:
  mme             question less " Please answer yes or no." + SHORT_ANSWER; yesno; bench:
                  category, image_id (the question_id an image's two questions share);
                  id mme-<image_id>-<0|1>
  pope            question + SHORT_ANSWER; yesno; bench: category (adversarial/popular/
                  random); id pope-<category>-<question_id>
  textvqa         question.capitalize() + SHORT_ANSWER; open: the most common of the 10 answers, all 10
                  in answers; id textvqa-<question_id>; rows without answers (the test
                  split) are refused
  hallusionbench  the question as given; yesno (gt_answer "1" is yes); bench: category,
                  subcategory, set_id, figure_id, question_id, visual_input; id
                  hallusionbench-<category>_<subcategory>_<set_id>_<figure_id>_<question_id>;
                  visual_input "0" (the non_image split) gives a text-only record
  scienceqa       ["Context: <hint>\\n"] question, lettered options + CHOICE_ANSWER; choice:
                  the right letter; bench: subject, grade, category; id scienceqa-<row
                  index over the files read | pid>; items with an image only

src: a .parquet file, or a folder searched for *.parquet where `split` keeps one split's
files: a path component named so, or a file name starting with it and "-" or ".parquet"
(data/validation-00000-of-00001.parquet; "image" does not take non_image-*.parquet; for
ScienceQA give the ScienceQA-IMG folder, since ScienceQA-FULL's files match "test" too).
Else the release layout:
  mme             MME_Benchmark_release_version/: <category>/images/<stem>.jpg|png with
                  questions_answers_YN/<stem>.txt, or <stem>.jpg|png beside <stem>.txt
  pope            coco_pope_<category>.json (JSON Lines) or the folder holding them;
                  image_root: COCO val2014
  textvqa         TextVQA_0.5.1_val.json; image_root: the folder of <image_id>.jpg
  hallusionbench  HallusionBench.json; image_root (default: its folder) is where its
                  "filename" paths start
  scienceqa       problems.json (or its folder) beside pid_splits.json; split a key of
                  pid_splits.json (default test); image_root default <folder>/images
A missing column or field raises ValueError naming the file (and row); a row whose image
is missing or unreadable is skipped with a warning naming it and counted in index.json's
"skipped", beside the writer's own counts.
"""

import collections
import hashlib
import io
import itertools
import json
import logging
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from datagen.writer import _atomic_write_json, _safe_key, make_llava_shards

log = logging.getLogger(__name__)

BENCHMARKS = ("mme", "pope", "textvqa", "hallusionbench", "scienceqa")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
CHOICE_ANSWER = "\nAnswer with the option's letter from the given choices directly."
MME_YES_NO = " Please answer yes or no."
LETTERS = "ABCDE"
# The columns each lmms-eval export must have; the others are not read.
PARQUET_COLUMNS = {
    "mme": ("question_id", "image", "question", "answer", "category"),
    "pope": ("question_id", "image", "question", "answer", "category"),
    "textvqa": ("question_id", "image", "question", "answers"),
    "hallusionbench": ("category", "subcategory", "visual_input", "set_id", "figure_id", "question_id", "question",
                       "gt_answer", "image"),
    "scienceqa": ("image", "question", "choices", "answer", "hint", "grade", "subject", "category"),
}
PARQUET_SPLITS = {"mme": "test", "pope": "test", "textvqa": "validation", "hallusionbench": None, "scienceqa": "test"}
PARQUET_BATCH_ROWS = 32  # rows decoded at once: each carries its image's bytes
HALLUSION_ID_FIELDS = ("category", "subcategory", "set_id", "figure_id", "question_id")
POPE_FILE = re.compile(r"pope_(adversarial|popular|random)\.json$")


# --- one benchmark row -> question, answer, scoring fields -----------------------------------
# Each takes a row with the Parquet export's field names, `where` (file and row, for
# messages) and `seen` (questions per MME image so far) and returns {id, question, answer,
# task, bench, [choices], [answers]}.

def _field(row: dict, name: str, where: str):
    value = row.get(name)
    if value is None:
        raise ValueError(f"{where}: missing field {name!r}")
    return value


def _yes_no(row: dict, name: str, where: str) -> str:
    answer = str(_field(row, name, where)).strip().lower()
    if answer not in ("yes", "no"):
        raise ValueError(f"{where}: {name} is {row[name]!r}, expected yes or no")
    return answer


def _mme_item(row: dict, where: str, seen: collections.Counter) -> dict:
    image_id = str(_field(row, "question_id", where))
    ordinal = seen[image_id]
    seen[image_id] += 1
    question = str(_field(row, "question", where)).strip().replace(MME_YES_NO, "")
    return {"id": f"mme-{image_id}-{ordinal}", "question": question + SHORT_ANSWER,
            "answer": _yes_no(row, "answer", where), "task": "yesno",
            "bench": {"benchmark": "mme", "category": str(_field(row, "category", where)), "image_id": image_id}}


def _pope_item(row: dict, where: str, seen: collections.Counter) -> dict:
    category = str(_field(row, "category", where))
    return {"id": f"pope-{category}-{_field(row, 'question_id', where)}",
            "question": str(_field(row, "question", where)).strip() + SHORT_ANSWER,
            "answer": _yes_no(row, "answer", where), "task": "yesno",
            "bench": {"benchmark": "pope", "category": category}}


def _textvqa_item(row: dict, where: str, seen: collections.Counter) -> dict:
    if not row.get("answers"):
        raise ValueError(f"{where}: no answers (TextVQA's test split has none); convert the validation split")
    answers = [str(a) for a in row["answers"]]
    return {"id": f"textvqa-{_field(row, 'question_id', where)}",
            "question": str(_field(row, "question", where)).capitalize() + SHORT_ANSWER,  # as lmms-eval asks it
            "answer": collections.Counter(answers).most_common(1)[0][0],  # a tie goes to the first given
            "answers": answers, "task": "open", "bench": {"benchmark": "textvqa"}}


def _hallusionbench_item(row: dict, where: str, seen: collections.Counter) -> dict:
    bench = {"benchmark": "hallusionbench",
             **{name: str(_field(row, name, where)) for name in HALLUSION_ID_FIELDS + ("visual_input",)}}
    gt_answer = str(_field(row, "gt_answer", where))
    if gt_answer not in ("0", "1"):
        raise ValueError(f"{where}: gt_answer is {gt_answer!r}, expected '1' or '0'")
    return {"id": "hallusionbench-" + "_".join(bench[name] for name in HALLUSION_ID_FIELDS),
            "question": str(_field(row, "question", where)), "answer": "yes" if gt_answer == "1" else "no",
            "task": "yesno", "bench": bench}


def _scienceqa_item(row: dict, where: str, seen: collections.Counter) -> dict:
    choices = [str(c) for c in _field(row, "choices", where)]
    answer = _field(row, "answer", where)
    if not 1 <= len(choices) <= len(LETTERS):
        raise ValueError(f"{where}: {len(choices)} choices, expected 1 to {len(LETTERS)}")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: answer {answer!r} is not an index into its {len(choices)} choices")
    hint = row.get("hint")
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices))
    question = (f"Context: {hint}\n" if hint else "") + f"{_field(row, 'question', where)}\n{options}{CHOICE_ANSWER}"
    bench = {"benchmark": "scienceqa",
             **{name: str(_field(row, name, where)) for name in ("subject", "grade", "category")}}
    return {"id": f"scienceqa-{row['pid']}", "question": question, "answer": LETTERS[answer], "choices": choices,
            "task": "choice", "bench": bench}


ITEM_MAKERS = {"mme": _mme_item, "pope": _pope_item, "textvqa": _textvqa_item,
               "hallusionbench": _hallusionbench_item, "scienceqa": _scienceqa_item}


# --- sources -> (where, row, image) ------------------------------------------------------------
# image: the image's bytes, a file path, or None (no image).

def _find_parquet(src: str) -> list[str]:
    """*.parquet under folder `src`, as sorted paths relative to it."""
    return sorted(os.path.relpath(os.path.join(folder, name), src)
                  for folder, _, names in os.walk(src) for name in names if name.endswith(".parquet"))


def _parquet_source(benchmark: str, src: str, split: str | None):
    """Check every file's columns up front (before any image is written), then stream rows."""
    if os.path.isfile(src):
        files = [src]
    else:
        found = _find_parquet(src)
        split = PARQUET_SPLITS[benchmark] if split is None else split
        pattern = re.compile(rf"(?:^|/){re.escape(split)}(?:/|-|\.parquet$)") if split else None
        files = [os.path.join(src, f) for f in found if pattern is None or pattern.search(f.replace(os.sep, "/"))]
        if not files:
            raise ValueError(f"{src}: no Parquet file of split {split!r} among {found[:10]}"
                             f"{' ...' if len(found) > 10 else ''}; pass --split, or a file as src")
    columns = PARQUET_COLUMNS[benchmark]
    for path in files:
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{path}: not a readable Parquet file ({exc})") from None
        missing = [c for c in columns if c not in names]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))}, which {benchmark} needs "
                             f"(columns: {names})")
    return _parquet_rows(benchmark, files, columns)


def _parquet_rows(benchmark: str, files: list[str], columns: tuple):
    pids = itertools.count()  # ScienceQA's export has no id column: the row's index over all files stands in
    for path in files:
        with pq.ParquetFile(path) as parquet:
            rows = (row for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(columns))
                    for row in batch.to_pylist())
            for row_in_file, row in enumerate(rows):
                image = row.pop("image")  # struct<bytes, path>
                if benchmark == "scienceqa":
                    row["pid"] = next(pids)
                yield f"{path} row {row_in_file}", row, image.get("bytes") if isinstance(image, dict) else image


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a JSON file ({exc})") from None


def _objects(items: list, path: str):
    """(where, item) for each entry of a JSON list, refusing non-objects."""
    for index, item in enumerate(items):
        where = f"{path} item {index}"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: not a JSON object")
        yield where, item


def _mme_release(src: str):
    found = False
    for category in sorted(os.listdir(src)):
        folder = os.path.join(src, category)
        if not os.path.isdir(folder):
            continue
        text_dir, image_dir = folder, folder
        if os.path.isdir(os.path.join(folder, "questions_answers_YN")):
            text_dir, image_dir = os.path.join(folder, "questions_answers_YN"), os.path.join(folder, "images")
        for name in sorted(n for n in os.listdir(text_dir) if n.endswith(".txt")):
            found = True
            stem = name[:-len(".txt")]
            candidates = [os.path.join(image_dir, stem + ext) for ext in (".jpg", ".png")]
            image = next((p for p in candidates if os.path.isfile(p)), candidates[0])  # neither: reported missing
            text_path = os.path.join(text_dir, name)
            try:
                with open(text_path, encoding="utf-8-sig") as f:
                    lines = f.read().splitlines()
            except UnicodeDecodeError as exc:
                raise ValueError(f"{text_path}: not UTF-8 text ({exc})") from None
            for line_no, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                question, tab, answer = line.rpartition("\t")
                where = f"{text_path} line {line_no}"
                if not tab:
                    raise ValueError(f"{where}: expected 'question<TAB>Yes|No', got {line!r}")
                yield where, {"question_id": f"{category}/{os.path.basename(image)}", "question": question,
                              "answer": answer, "category": category}, image
    if not found:
        raise ValueError(f"{src}: no MME category folder with question .txt files (expected "
                         "MME_Benchmark_release_version/)")


def _pope_release(src: str, image_root: str):
    if os.path.isfile(src):
        paths = [src]
    else:
        paths = sorted(os.path.join(src, n) for n in os.listdir(src) if re.fullmatch(r"coco_pope_\w+\.json", n))
        if not paths:
            raise ValueError(f"{src}: no coco_pope_*.json files")
    for path in paths:
        match = POPE_FILE.search(os.path.basename(path))
        if not match:
            raise ValueError(f"{path}: no POPE category in the file name (expected coco_pope_<adversarial|popular|"
                             "random>.json)")
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path} line {line_no}"
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not JSON ({exc})") from None
                if not isinstance(item, dict):
                    raise ValueError(f"{where}: not a JSON object")
                row = {"question_id": _field(item, "question_id", where), "question": _field(item, "text", where),
                       "answer": _field(item, "label", where), "category": match.group(1)}
                yield where, row, os.path.join(image_root, str(_field(item, "image", where)))


def _textvqa_release(src: str, image_root: str):
    document = _load_json(src)
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise ValueError(f"{src}: expected {{\"data\": [...]}}, as in TextVQA_0.5.1_val.json")
    for where, item in _objects(document["data"], src):
        yield where, item, os.path.join(image_root, f"{_field(item, 'image_id', where)}.jpg")


def _hallusionbench_release(src: str, image_root: str):
    items = _load_json(src)
    if not isinstance(items, list):
        raise ValueError(f"{src}: expected a JSON list, as in HallusionBench.json")
    for where, item in _objects(items, src):
        filename = item.get("filename")
        yield where, item, os.path.normpath(os.path.join(image_root, filename)) if filename else None


def _scienceqa_release(src: str, image_root: str | None, split: str):
    folder = src if os.path.isdir(src) else os.path.dirname(src)
    problems_path = os.path.join(folder, "problems.json") if os.path.isdir(src) else src
    splits_path = os.path.join(folder, "pid_splits.json")
    problems, splits = _load_json(problems_path), _load_json(splits_path)
    if not isinstance(problems, dict) or not isinstance(splits, dict):
        raise ValueError(f"{problems_path}, {splits_path}: expected JSON objects (pid -> problem, split -> pids)")
    if split not in splits:
        raise ValueError(f"{splits_path}: no split {split!r} (has {sorted(splits)})")
    image_root = os.path.join(folder, "images") if image_root is None else image_root
    for pid in map(str, splits[split]):
        where = f"{problems_path} pid {pid}"
        item = problems.get(pid)
        if not isinstance(item, dict):
            raise ValueError(f"{where}: {'absent' if item is None else 'not a JSON object'}, though {splits_path} "
                             f"lists it in {split!r}")
        image = None
        if item.get("image"):
            image = os.path.join(image_root, str(_field(item, "split", where)), pid, str(item["image"]))
        yield where, {**item, "pid": pid}, image


def _read_source(benchmark: str, src: str, split: str | None, image_root: str | None):
    """(where, row, image) of `src`, Parquet or release layout; arguments are checked here,
    before any row is read."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {BENCHMARKS}")
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such file or folder")
    if src.endswith(".parquet") or (os.path.isdir(src) and _find_parquet(src)):
        if image_root is not None:
            raise ValueError(f"{src}: Parquet rows hold their images; image_root is for the release layouts")
        return _parquet_source(benchmark, src, split)
    if split is not None and benchmark != "scienceqa":
        raise ValueError(f"{src}: split selects Parquet files or a ScienceQA pid split; the {benchmark} release "
                         "layout has none")
    if benchmark == "mme":
        if image_root is not None:
            raise ValueError(f"{src}: MME's images are in its category folders; image_root is not used")
        return _mme_release(src)
    if benchmark in ("pope", "textvqa") and image_root is None:
        needed = "the COCO val2014 folder" if benchmark == "pope" else "the folder of <image_id>.jpg"
        raise ValueError(f"{src}: the {benchmark} release layout needs image_root ({needed})")
    if benchmark == "pope":
        return _pope_release(src, image_root)
    if benchmark == "textvqa":
        return _textvqa_release(src, image_root)
    if benchmark == "hallusionbench":
        return _hallusionbench_release(src, os.path.dirname(src) if image_root is None else image_root)
    return _scienceqa_release(src, image_root, "test" if split is None else split)


# --- records and shards ---------------------------------------------------------------------

def _image_data(image) -> bytes:
    """The bytes of a row's image (bytes or a file path); FileNotFoundError if it has none."""
    if isinstance(image, str):
        with open(image, "rb") as f:
            return f.read()
    if not image:
        raise FileNotFoundError("the row has no image bytes")
    return image


def _image_ext(data: bytes) -> str:
    """The file extension of an image PIL reads; raises for anything else."""
    with Image.open(io.BytesIO(data)) as image:
        image_format = (image.format or "").lower()
        image.verify()
    return {"jpeg": "jpg", "mpo": "jpg"}.get(image_format, image_format)


class _ImageFolder:
    """OUT/images: each distinct image written once (its original bytes), named after the
    first record that shows it."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.paths, self.stems = {}, set()  # sha1 of the bytes -> "images/<file>"; stems taken
        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)

    def add(self, record_id: str, data: bytes, ext: str) -> str:
        digest = hashlib.sha1(data).hexdigest()
        if digest not in self.paths:
            stem = _safe_key(record_id)
            if stem in self.stems:  # ids that differ only in characters _safe_key replaces
                stem += "_" + digest[:8]
            self.stems.add(stem)
            self.paths[digest] = f"images/{stem}.{ext}"
            with open(os.path.join(self.out_dir, self.paths[digest]), "wb") as f:
                f.write(data)
        return self.paths[digest]


def _records(benchmark: str, rows, out_dir: str) -> tuple[list[dict], collections.Counter]:
    """LLaVA records of the rows (their images written to OUT/images) and the rows left out,
    by reason."""
    make, seen, skipped = ITEM_MAKERS[benchmark], collections.Counter(), collections.Counter()
    images = _ImageFolder(out_dir)
    records, ids = [], set()
    for where, row, image in rows:
        if benchmark == "scienceqa" and image is None:
            skipped["no_image"] += 1  # not in the IMG subset
            continue
        item = make(row, where, seen)
        record = {"id": item.pop("id")}
        if record["id"] in ids:
            log.warning("%s: id %s repeats an earlier row's; scores cannot tell them apart", where, record["id"])
        ids.add(record["id"])
        text_only = benchmark == "hallusionbench" and item["bench"]["visual_input"] == "0"
        if not text_only:
            try:
                data = _image_data(image)
                ext = _image_ext(data)
            except Exception as exc:  # noqa: BLE001 - any PIL failure: unusable image
                reason = "missing_image" if isinstance(exc, FileNotFoundError) else "bad_image"
                log.warning("%s: %s (%s); skipped", where, reason, exc)
                skipped[reason] += 1
                continue
            record["image"] = images.add(record["id"], data, ext)
        human = ("" if text_only else "<image>\n") + item.pop("question")
        record["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": item.pop("answer")}]
        records.append({**record, "source": benchmark, **item})
    return records, skipped


def convert_benchmark(benchmark: str, src: str, out_dir: str, *, split: str | None = None,
                      image_root: str | None = None, limit: int | None = None, seed: int = 0,
                      samples_per_shard: int = 1000, workers: int = 1, voices: list[str] | None = None,
                      tts_cmd: str | None = None, progress: bool = True) -> dict:
    """Benchmark files -> OUT/images, OUT/<benchmark>.json and spoken-question shards in
    OUT/shards; returns OUT/shards/index.json's content, whose "skipped" also counts the rows
    left out here. split: the Parquet files to read (default PARQUET_SPLITS) or ScienceQA's
    pid split (default test)."""
    rows = _read_source(benchmark, src, split, image_root)
    os.makedirs(out_dir, exist_ok=True)
    records, skipped = _records(benchmark, rows, out_dir)
    if not records:
        raise ValueError(f"{src}: no usable {benchmark} item (left out: {dict(skipped)})")
    json_path = os.path.join(out_dir, f"{benchmark}.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
    shard_dir = os.path.join(out_dir, "shards")
    index = make_llava_shards(json_path, out_dir, shard_dir, limit=limit, seed=seed,
                              samples_per_shard=samples_per_shard, workers=workers, voices=voices, tts_cmd=tts_cmd,
                              progress=progress)
    index["skipped"] = dict(sorted((collections.Counter(index["skipped"]) + skipped).items()))
    _atomic_write_json(os.path.join(shard_dir, "index.json"), index)
    return index
