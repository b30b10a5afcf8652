"""Sentences over the demo's vocabulary, for audio-text alignment: questions in many more
forms than the five the demo asks (paraphrases, other templates), descriptions of scenes and
option lists, so a model that transcribes them has learnt words, not a few memorised clips.

The sentence space is a grammar (TEMPLATES) filled with shapes, colours, grid positions and
number words. `split_of(sentence)` puts every distinct sentence in "train" or "heldout" by a
hash of its text alone, so the held-out sentences never occur in the alignment data, whatever
seed or sample count built it. The demo's own question forms are templates like the others:
each of their sentences falls on one side or the other.

    records = sentence_records("train", 6000, seed=0)   # LLaVA records: spoken sentence -> itself
    typed = repeat_records("train", 6000, seed=0)       # the typed twin: "<sentence>\nTranscribe the audio." -> sentence
    spoken_qa = described_qa_records(3000, seed=0, spoken=True)   # spoken question on a typed scene description
    typed_qa = described_qa_records(3000, seed=0, spoken=False)   # its typed twin: "question\ndescription" -> answer

Described-scene questions ask what the demo asks, in other words (QA_FORMS: none is one of the
demo's own question sentences) and about a scene given as text, not drawn: they teach a model to
follow a spoken question and answer it in the right form without ever pairing speech with a
picture, as the paper's audio-text alignment does before its vision-audio stage.
"""

import hashlib
import random
import re

import json
import os

from datagen.demo import COLOURS, NUMBER_WORDS, SHAPES, make_question, position_name, random_scene
from datagen.writer import make_llava_shards
from trainer.data.collate import ASR_INSTRUCTION  # the ALIGN stage's prompt; the typed twin repeats it

HELDOUT_PERCENT = 15
POSITIONS = tuple(position_name(r, c) for r in range(3) for c in range(3))

# {s}/{s2} shape, {c}/{c2} colour, {p} position, {n} number word, {o} a three-option list.
TEMPLATES = (
    # the demo's own question forms
    "What colour is the {s}?", "How many shapes are there?", "Where is the {c} {s}?", "Is there a {c} {s}?",
    "Which shape is {c}?",
    # paraphrases and other questions
    "Which colour does the {s} have?", "Tell me the colour of the {s}.", "What is the colour of the {s}?",
    "How many shapes can you see?", "Count the shapes in the picture.", "How many {c} shapes are there?",
    "Where can you see the {c} {s}?", "In which part of the picture is the {c} {s}?", "Where is the {s}?",
    "Can you see a {c} {s}?", "Is the {s} {c}?", "Is the {c} {s} at the {p}?", "Is there a {s} at the {p}?",
    "Which shape is at the {p}?", "What is at the {p}?", "What colour is the shape at the {p}?",
    "Are there {n} shapes?", "Is there a {c} {s} and a {c2} {s2}?",
    # descriptions
    "The {c} {s} is at the {p}.", "There is a {c} {s} at the {p}.", "There are {n} shapes.",
    "I can see a {c} {s} and a {c2} {s2}.", "The {s} is {c}.", "The picture shows {n} shapes.",
    "There is no {c} {s}.", "A {c} {s} is next to a {c2} {s2}.", "The shape at the {p} is a {c} {s}.",
    "The answer is {c}.", "The {s} is at the {p} of the picture.",
    # option lists (the demo's choice questions read them one per line)
    "Which shape is {c}?\n{o}\nAnswer with the option letter.",
    "What colour is the {s}?\n{o}\nAnswer with the option letter.",
)


# Other words for the demo's question forms (datagen/demo.py): (the demo's first line as a
# pattern, whether it has option lines, the other forms); the answers stay the demo's.
QA_FORMS = (
    (r"What colour is the (?P<s>\w+)\?", False,
     ("Which colour does the {s} have?", "Tell me the colour of the {s}.", "What colour does the {s} have?",
      "What is the colour of the {s}?", "Say the colour of the {s}.")),
    (r"How many shapes are there\?", False,
     ("How many shapes can you see?", "Count the shapes in the picture.", "How many shapes are in the picture?",
      "How many shapes does the picture have?", "How many shapes do you see?",
      "Tell me how many shapes there are.")),
    (r"Where is the (?P<c>\w+) (?P<s>\w+)\?", False,
     ("Where can you see the {c} {s}?", "In which part of the picture is the {c} {s}?")),
    (r"Is there a (?P<c>\w+) (?P<s>\w+)\?", False, ("Can you see a {c} {s}?", "Do you see a {c} {s}?")),
    (r"Which shape is (?P<c>\w+)\?", True, ("Which of these shapes is {c}?",)),
    (r"What colour is the (?P<s>\w+)\?", True, ("Which of these colours does the {s} have?",)),
)


def describe(scene: dict, rng: random.Random) -> str:
    """A scene in words, its shapes in random order: "In the picture: a red circle at the top
    left, a blue square at the centre." """
    items = [f"a {x['colour']} {x['shape']} at the {position_name(*x['cell'])}" for x in scene["shapes"]]
    rng.shuffle(items)
    return "In the picture: " + ", ".join(items) + "."


def _reword(question: str, rng: random.Random) -> str | None:
    """The demo's question in other words (QA_FORMS), its option lines and last line kept; only
    forms whose whole text is a training sentence (split_of), so no held-out transcription sentence
    is ever spoken in the alignment data. None when every form of this question is held out."""
    first, _, rest = question.partition("\n")
    for pattern, has_options, forms in QA_FORMS:
        match = re.fullmatch(pattern, first)
        if match and has_options == bool(rest):
            worded = [form.format(**match.groupdict()) + ("\n" + rest if rest else "") for form in forms]
            worded = [text for text in worded if split_of(text) == "train"]
            return rng.choice(worded) if worded else None
    raise ValueError(f"no other words for the demo question {question!r}")


DESCRIBED_TASKS = ("colour", "count", "position", "yesno", "choice")


def described_qa_records(count: int, seed: int, *, spoken: bool, tasks: tuple[str, ...] = DESCRIBED_TASKS,
                         tag: str = "") -> list[dict]:
    """Questions on scenes described in words, the description where the picture would be, the
    question types cycling through `tasks`. spoken=True: the question is spoken (the record's
    question) after the typed description (the ALIGN stage reads "context"): "description\n<speech>"
    -> answer, a prompt that ends with the speech as a spoken question about a picture does;
    spoken=False: the typed twin, "description\nquestion" -> answer (VL stage). A non-empty `tag`
    draws another set (its own random stream and ids)."""
    rng = random.Random(f"described-{seed}-{spoken}{'-' + tag if tag else ''}")
    kind = ("spoken" if spoken else "typed") + (f"-{tag}" if tag else "")
    records = []
    while len(records) < count:
        i = len(records)
        scene = random_scene(rng)
        qa = make_question(scene, tasks[i % len(tasks)], rng, want_yes=i // len(tasks) % 2 == 0)
        question = _reword(qa["question"], rng)
        if question is None:  # every other wording of this question is a held-out sentence: draw again
            continue
        description = describe(scene, rng)
        record = {"id": f"described-{kind}-{i:05d}", "task": qa["task"],
                  "source": f"described_{qa['source']}", **{k: qa[k] for k in ("choices", "answers") if k in qa}}
        if spoken:
            record.update(conversations=[{"from": "human", "value": question}, {"from": "gpt", "value": qa["answer"]}],
                          context=description)
        else:
            record["conversations"] = [{"from": "human", "value": description + "\n" + question},
                                       {"from": "gpt", "value": qa["answer"]}]
        records.append(record)
    return records


def check_tasks(tasks: tuple[str, ...]) -> None:
    """ValueError unless `tasks` names one or more of DESCRIBED_TASKS and nothing else."""
    if not tasks or set(tasks) - set(DESCRIBED_TASKS):
        raise ValueError(f"described_extra_tasks {','.join(tasks)!r}: each one of {', '.join(DESCRIBED_TASKS)}")


def pictured_described_records(vqa: list[dict], count: int, seed: int,
                               tasks: tuple[str, ...] = DESCRIBED_TASKS) -> list[dict]:
    """Spoken questions on training scenes with both the picture and its description in the prompt:
    picture, "description\n", speech -> answer (stage align, "with_image": true, "context"), the
    question types cycling through `tasks`, worded as the described-scene questions are (never a
    held-out sentence). The answer can be read in the description, so these teach the answer's
    form when a spoken question follows a picture, not reading the picture under speech (the gap
    study v2 measures is left to close). `count` records (at most one per VQA record that carries its
    scene)."""
    rng = random.Random(f"pictured-described-{seed}")
    scenes = [record for record in vqa if record.get("scene")]
    records = []
    for record in rng.sample(scenes, len(scenes)):
        if len(records) == count:
            break
        i = len(records)
        scene = {"shapes": record["scene"]}
        qa = make_question(scene, tasks[i % len(tasks)], rng, want_yes=i // len(tasks) % 2 == 0)
        question = _reword(qa["question"], rng)
        if question is None:  # every other wording of this question is a held-out sentence
            continue
        records.append({"id": f"pictured-described-{i:05d}", "image": record["image"], "task": qa["task"],
                        "source": f"pictured_{qa['source']}", "stage": "align", "with_image": True,
                        "context": describe(scene, rng),
                        **{k: qa[k] for k in ("choices", "answers") if k in qa},
                        "conversations": [{"from": "human", "value": "<image>\n" + question},
                                          {"from": "gpt", "value": qa["answer"]}]})
    if len(records) < count:
        raise ValueError(f"pictured_described: {count} asked, only {len(records)} of the {len(vqa)} VQA records carry "
                         "a scene with a question that is not a held-out sentence")
    return records


def split_of(sentence: str) -> str:
    """"heldout" for about HELDOUT_PERCENT% of distinct sentences, chosen by their text alone."""
    digest = hashlib.sha256(sentence.encode("utf-8")).digest()
    return "heldout" if int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT else "train"


def random_sentence(rng: random.Random) -> str:
    template = rng.choice(TEMPLATES)
    s, s2 = rng.sample(SHAPES, 2)
    c, c2 = rng.sample(sorted(COLOURS), 2)
    pool = SHAPES if "Which shape" in template else sorted(COLOURS)
    options = rng.sample(pool, 3)
    listed = "\n".join(f"{letter}. {option}" for letter, option in zip("ABC", options))
    return template.format(s=s, s2=s2, c=c, c2=c2, p=rng.choice(POSITIONS), n=rng.choice(NUMBER_WORDS[1:]), o=listed)


def sentences(split: str, count: int, seed: int) -> list[str]:
    """`count` sentences of `split` drawn from the grammar (repeats allowed, as in speech data)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"sentences-{seed}-{split}")
    out = []
    while len(out) < count:
        sentence = random_sentence(rng)
        if split_of(sentence) == split:
            out.append(sentence)
    return out


def sentence_records(split: str, count: int, seed: int) -> list[dict]:
    """LLaVA records without an image whose question is the sentence: spoken by the shard writer,
    read back as the transcript by the ALIGN stage (task "asr" for the transcription score)."""
    return [{"id": f"sentence-{split}-{i:05d}", "conversations": [{"from": "human", "value": text},
                                                                   {"from": "gpt", "value": text}],
             "task": "asr", "source": "sentences"}
            for i, text in enumerate(sentences(split, count, seed))]


def repeat_records(split: str, count: int, seed: int) -> list[dict]:
    """The typed twin of the ASR prompt: the sentence written where the audio would be, the same
    instruction after it, the sentence as the answer. Teaches the LLM to say sentences it has
    only ever read, so an audio path that makes speech look like text can be transcribed."""
    return [{"id": f"repeat-{split}-{i:05d}",
             "conversations": [{"from": "human", "value": text + ASR_INSTRUCTION}, {"from": "gpt", "value": text}],
             "task": "asr", "source": "repeat"}
            for i, text in enumerate(sentences(split, count, seed + 1))]


PICTURE_ASR_SOURCES = ("questions", "sentences")


def picture_asr_records(vqa: list[dict], count: int, seed: int, source: str = "questions") -> list[dict]:
    """`count` VQA records (drawn without replacement) turned into transcription with a picture: the
    scene's picture, then speech -> its words ("with_image": true, stage align). The speech is the
    scene's own question (source "questions") or a training sentence of the grammar above, drawn
    apart from the alignment's (source "sentences": the picture says nothing about it, and the
    words are not the demo's question templates). Speech follows a picture, and no question about the picture is answered."""
    if source not in PICTURE_ASR_SOURCES:
        raise ValueError(f"source must be one of {PICTURE_ASR_SOURCES}, got {source!r}")
    chosen = random.Random(f"picture-asr-{seed}").sample(vqa, min(count, len(vqa)))
    texts = sentences("train", len(chosen), seed + 2) if source == "sentences" else None
    records = []
    for i, record in enumerate(chosen):
        question = record["conversations"][0]["value"].replace("<image>\n", "").replace("<image>", "").strip()
        question = texts[i] if texts else question
        prefix = "picture-sentence-" if texts else "picture-asr-"
        records.append({"id": prefix + record["id"], "image": record["image"], "task": "asr",
                        "source": "picture_asr", "stage": "align", "with_image": True,
                        "conversations": [{"from": "human", "value": "<image>\n" + question},
                                          {"from": "gpt", "value": question}]})
    return records


def make_sentence_data(out_dir: str, vqa_train_json: str, *, num_train: int, num_heldout: int, seed: int = 0,
                       samples_per_shard: int = 500, workers: int = 1, voices: list[str] | None = None,
                       picture_asr: int = 0, picture_asr_source: str = "questions", described_extra: int = 0,
                       described_extra_tasks: tuple[str, ...] = ("colour", "count"),
                       pictured_described: int = 0) -> dict:
    """Write the alignment data under out_dir (the demo data's directory, whose images the typed
    VQA records name), each as sentences/NAME.json and shards/NAME:
      align_mix    `num_train` spoken sentences (ASR) + `num_train` // 2 spoken described-scene questions,
      asr_heldout  `num_heldout` spoken held-out sentences (the transcription test),
      typed_mix    the VQA records of `vqa_train_json`, `num_train` typed-repeat records and
                   `num_train` // 2 typed described-scene questions,
      stage_mix    align_mix's records tagged "stage": "align" and typed_mix's tagged "vl", for a
                   --stage mixed run that trains the LLM to hear while it keeps reading, plus
                   `picture_asr` transcriptions with a picture in the prompt (picture_asr_records, of
                   `picture_asr_source`), plus `described_extra` more spoken described-scene questions,
                   `described_extra_tasks` in turn (default colour and count, the two kinds study v2's
                   attempt 6 answered in the wrong form; another choice draws its own set),
      pictured_described  (with `pictured_described` > 0) that many pictured_described_records, the
                   five question types in turn, on their own shards (a run adds them to stage_mix's
                   spec),
    each mix shuffled together by the shard writer. Returns {NAME + "_shards": spec}."""
    check_tasks(described_extra_tasks)
    extra_tag = "extra" if tuple(described_extra_tasks) == ("colour", "count") else "extra-" + "-".join(described_extra_tasks)
    os.makedirs(os.path.join(out_dir, "sentences"), exist_ok=True)
    with open(vqa_train_json) as f:
        vqa = json.load(f)
    jobs = {
        "align_mix": sentence_records("train", num_train, seed) + described_qa_records(num_train // 2, seed, spoken=True),
        "asr_heldout": sentence_records("heldout", num_heldout, seed),
        "typed_mix": vqa + repeat_records("train", num_train, seed)
                     + described_qa_records(num_train // 2, seed, spoken=False),
    }
    jobs["stage_mix"] = [{**r, "stage": "align"} for r in jobs["align_mix"]] + \
        [{**r, "stage": "vl"} for r in jobs["typed_mix"]] + picture_asr_records(vqa, picture_asr, seed, picture_asr_source) \
        + [{**r, "stage": "align"} for r in described_qa_records(described_extra, seed, spoken=True,
                                                                  tasks=described_extra_tasks, tag=extra_tag)]
    if pictured_described:
        jobs["pictured_described"] = pictured_described_records(vqa, pictured_described, seed)
    specs = {}
    for name, records in jobs.items():
        json_path = os.path.join(out_dir, "sentences", f"{name}.json")
        with open(json_path, "w") as f:
            json.dump(records, f, indent=1)
        index = make_llava_shards(json_path, out_dir, os.path.join(out_dir, "shards", name), seed=seed,
                                  samples_per_shard=samples_per_shard, workers=workers, voices=voices, progress=False)
        specs[f"{name}_shards"] = index["shard_spec"]
    return specs
