"""The alignment data of datagen/sentences.py: held-out sentences never occur in training, the
described-scene questions are answered by their description (checked by a solver of its own),
and the align stage reads a spoken question on a typed text as context + speech -> answer."""

import json
import re

import pytest
import torch

from datagen.sentences import (
    ASR_INSTRUCTION,
    DESCRIBED_TASKS,
    described_qa_records,
    make_sentence_data,
    pictured_described_records,
    repeat_records,
    sentence_records,
    sentences,
    split_of,
)
from datagen.writer import make_llava_shards
from trainer.data import build_train_loader
from trainer.data.batch import IGNORE_INDEX
from trainer.models.tiny import build_tiny_processor


def test_heldout_sentences_never_occur_in_training():
    train, heldout = set(sentences("train", 4000, seed=0)), set(sentences("heldout", 400, seed=0))
    assert train and heldout and not train & heldout
    assert not heldout & set(sentences("train", 4000, seed=7)), "the split is the sentence's, not the seed's"
    assert all(split_of(s) == "heldout" for s in heldout)
    typed = {r["conversations"][1]["value"] for r in repeat_records("train", 2000, seed=0)}
    assert not typed & heldout
    assert 0.08 < len(heldout) / (len(heldout) + len(train)) < 0.25


def test_records_are_what_the_stages_read():
    (spoken,) = sentence_records("heldout", 1, seed=0)
    assert spoken["conversations"][0]["value"] == spoken["conversations"][1]["value"] and "image" not in spoken
    (typed,) = repeat_records("train", 1, seed=0)
    question, answer = typed["conversations"][0]["value"], typed["conversations"][1]["value"]
    assert question == answer + ASR_INSTRUCTION == answer + "\nTranscribe the audio."


def _solve(question: str, description: str) -> str:
    """The answer read off the description with this test's own parsing."""
    items = re.findall(r"a (\w+) (\w+) at the ([\w ]+?)(?:,|\.$)", description.removeprefix("In the picture: "))
    shapes = {shape: (colour, place) for colour, shape, place in items}
    first, *rest = question.split("\n")
    options = [line[3:] for line in rest if re.match(r"[ABC]\. ", line)]
    if options:
        if m := re.search(r"shapes is (\w+)\?", first):
            right = next(shape for shape, (colour, _) in shapes.items() if colour == m.group(1))
        else:
            right = shapes[re.search(r"does the (\w+) have", first).group(1)][0]
        return "ABC"[options.index(right)]
    if "many" in first or "Count" in first:
        return str(len(items))
    if m := re.search(r"(?:see a|see the|picture is the) (\w+) (\w+)\?", first):
        colour, shape = m.groups()
        if first.startswith(("Can", "Do")):
            return "yes" if shapes.get(shape, (None,))[0] == colour else "no"
        return shapes[shape][1]
    shape = re.search(r"(?:the|of the) (\w+)(?: have\?|\.|\?)$", first).group(1)
    return shapes[shape][0]


@pytest.mark.parametrize("spoken", [True, False])
def test_described_questions_are_answered_by_their_description(spoken):
    records = described_qa_records(200, seed=0, spoken=spoken)
    demo_forms = ("What colour is the", "How many shapes are there", "Where is the", "Is there a", "Which shape is")
    for record in records:
        question, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
        if spoken:
            description = record["context"]
        else:
            description, _, question = question.partition("\n")
        assert description.startswith("In the picture: ")
        assert not question.startswith(demo_forms), "other words than the demo's own questions"
        assert _solve(question, description) == answer, record
    assert {r["task"] for r in records} == {"open", "yesno", "choice"}
    yesno = [r["conversations"][1]["value"] for r in records if r["task"] == "yesno"]
    assert yesno.count("yes") == yesno.count("no")


def test_described_questions_never_speak_a_heldout_sentence(tmp_path):
    """The transcription test's sentences are held out of everything spoken in the alignment data,
    the described-scene questions included (their other wordings overlap the grammar's templates)."""
    records = described_qa_records(3000, seed=0, spoken=True)
    extra = described_qa_records(400, seed=0, spoken=True, tasks=("colour", "count"), tag="extra")
    spoken = [r["conversations"][0]["value"] for r in records + extra]
    assert all(split_of(text) == "train" for text in spoken)
    # the grammar does hold some of these wordings out: the filter is not vacuous
    assert split_of("Can you see a blue circle?") == "heldout"
    assert [r["source"] for r in extra[:4]] == ["described_demo_colour", "described_demo_count"] * 2
    assert {r["id"] for r in extra}.isdisjoint(r["id"] for r in records)
    assert extra[0]["conversations"] != records[0]["conversations"]
    three = described_qa_records(6, seed=0, spoken=True, tasks=("colour", "position", "count"), tag="extra-3")
    assert [r["source"] for r in three] == [f"described_demo_{t}" for t in ("colour", "position", "count")] * 2
    with pytest.raises(ValueError, match="described_extra_tasks"):  # refused before anything is written
        make_sentence_data(str(tmp_path), str(tmp_path / "absent.json"), num_train=1, num_heldout=1,
                           described_extra_tasks=("colour", "size"))


def test_make_demo_data_refuses_an_unknown_extra_kind_before_any_work(tmp_path, capsys):
    from tools import make_demo_data

    with pytest.raises(SystemExit):
        make_demo_data.main(["--out", str(tmp_path / "data"), "--sentences_train", "4", "--described_extra", "2",
                             "--described_extra_tasks", "colour, size"])
    assert "--described_extra_tasks 'colour, size': each one of colour, count" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def align_batch(tmp_path, records: list[dict]):
    """(the one align-stage batch of `records`, written as shards under tmp_path, the processor)."""
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    index = make_llava_shards(str(path), str(tmp_path), str(tmp_path / "shards"), seed=0, progress=False)
    processor = build_tiny_processor()
    (batch,) = build_train_loader(index["shard_spec"], processor, stage="align", micro_batch_size=len(records),
                                  max_seq_len=512, rank=0, world_size=1, num_workers=0, seed=0, shuffle=False, epochs=1)
    return batch, processor


def test_align_stage_reads_a_spoken_question_on_a_typed_text(tmp_path):
    records = described_qa_records(4, seed=0, spoken=True) + sentence_records("train", 2, seed=0)
    batch, processor = align_batch(tmp_path, records)
    by_id = {r["id"]: r for r in records}
    seen = set()
    for row, key in enumerate(batch.keys):
        record = by_id[key.rsplit("_t", 1)[0]]
        ids = batch.student_input_ids[row][batch.student_attention_mask[row] == 1]
        labels = batch.student_labels[row]
        prompt = processor.tokenizer.decode(ids[labels[: len(ids)] == IGNORE_INDEX])
        target = processor.tokenizer.decode(labels[labels != IGNORE_INDEX])
        spoken = record["conversations"][0]["value"]
        assert "<|audio_pad|>" in prompt and spoken not in prompt, "the question is heard, not read"
        if "context" in record:
            assert prompt.endswith(record["context"] + "\n<|audio_start|>" + "<|audio_pad|>" * prompt.count("<|audio_pad|>")
                                   + "<|audio_end|><|im_end|>\n<|im_start|>assistant\n")
            assert target == record["conversations"][1]["value"] + "<|im_end|>"
        else:
            assert prompt.endswith("<|audio_end|>" + ASR_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")
            assert target == spoken + "<|im_end|>"
        seen.add(record["id"])
    assert seen == set(by_id)


def test_pictured_described_questions_put_the_picture_and_its_description_before_the_speech(tmp_path):
    """pictured_described_records: a training scene's picture, its description, then the spoken
    question (never a held-out sentence), the five kinds in turn; the align stage encodes the
    picture's tokens, the description and the speech, and trains on the answer."""
    from datagen.demo import make_split

    vqa = make_split(str(tmp_path), "train", 40, seed=0)
    records = pictured_described_records(vqa, 5, seed=0)
    assert [r["source"] for r in records] == [f"pictured_demo_{t}" for t in DESCRIBED_TASKS]
    assert all(split_of(r["conversations"][0]["value"].removeprefix("<image>\n")) == "train"
               for r in pictured_described_records(vqa, 20, seed=0))
    with pytest.raises(ValueError, match="only"):  # a shortfall is loud
        pictured_described_records(vqa, 41, seed=0)
    batch, processor = align_batch(tmp_path, records)
    by_id = {r["id"]: r for r in records}
    assert len(batch.keys) == 5 and int(batch.image_token_counts.min()) > 0
    for row, key in enumerate(batch.keys):
        record = by_id[key.rsplit("_t", 1)[0]]
        ids = batch.student_input_ids[row][batch.student_attention_mask[row] == 1]
        labels = batch.student_labels[row]
        prompt = processor.tokenizer.decode(ids[labels[: len(ids)] == IGNORE_INDEX])
        assert prompt.count(processor.image_pad) == int(batch.image_token_counts[row])
        picture_end = prompt.rindex(processor.image_pad)
        assert prompt.index(record["context"] + "\n<|audio_start|>") > picture_end
        assert processor.tokenizer.decode(labels[labels != IGNORE_INDEX]) == record["conversations"][1]["value"] + \
            "<|im_end|>"


def test_mixed_stage_batches_hearing_and_reading_samples_together(tmp_path):
    """--stage mixed: each sample encoded as its JSON "stage" says (an untagged one is a counted
    bad_json skip), one batch holding both kinds, and the composed model's summed CE over it
    equals the sum of each kind's CE in batches of its own stage (the zero audio of a typed
    sample, and the dummy image of a spoken one, change nothing)."""
    from trainer.distill.objective import SelfKDObjective
    from trainer.models.build import build_tiny

    spoken = [{**r, "stage": "align"} for r in described_qa_records(2, seed=0, spoken=True)]
    typed = [{**r, "stage": "vl"} for r in repeat_records("train", 2, seed=0)]
    untagged = sentence_records("train", 1, seed=3)
    processor = build_tiny_processor()

    def batch(name, records, stage):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(records))
        index = make_llava_shards(str(path), str(tmp_path), str(tmp_path / name), seed=0, progress=False)
        loader = build_train_loader(index["shard_spec"], processor, stage=stage, micro_batch_size=8,
                                    max_seq_len=512, rank=0, world_size=1, num_workers=0, seed=0, shuffle=False,
                                    epochs=1, max_bad_fraction=1.0)
        (only,) = list(loader)
        return only, loader.skip_counts()

    mixed, skips = batch("mixed", spoken + typed + untagged, "mixed")
    assert skips == {"bad_json": 1} and len(mixed) == 4
    for row, key in enumerate(mixed.keys):
        if key.startswith("repeat"):
            assert int(mixed.audio_token_counts[row]) == 0 and int(mixed.audio_frames[row]) == 0
            assert not mixed.input_features[row].any()
        else:
            assert int(mixed.audio_token_counts[row]) > 0
    model = build_tiny(processor, attn_impl="sdpa", seed=0).eval()
    objective = SelfKDObjective(model, None)
    with torch.no_grad():
        together = objective(mixed, normalizer=1.0).loss
        apart = objective(batch("spoken", spoken, "align")[0], normalizer=1.0).loss + \
            objective(batch("typed", typed, "vl")[0], normalizer=1.0).loss
    # fp32 sums of about 200 nats over other batch shapes: seen 1.8e-5 apart in one run of the suite
    assert together.item() == pytest.approx(apart.item(), rel=1e-4)


def test_picture_transcription_records_put_the_picture_before_the_speech(tmp_path):
    """picture_asr_records: a scene's picture, its spoken question -> the question's words; the
    shard JSON carries "with_image", so the align stage keeps the picture (and only then)."""
    from PIL import Image

    from datagen.sentences import picture_asr_records

    (tmp_path / "images").mkdir()
    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "images" / "a.png")
    vqa = [{"id": f"scene-{i}", "image": "images/a.png", "task": "open", "source": "demo_colour",
            "conversations": [{"from": "human", "value": "<image>\nWhat colour is the square?"},
                              {"from": "gpt", "value": "red"}]} for i in range(3)]
    records = picture_asr_records(vqa, 2, seed=0)
    assert len(records) == 2 and all(r["with_image"] and r["stage"] == "align" for r in records)
    assert picture_asr_records(vqa, 2, seed=0) == records
    batch, processor = align_batch(tmp_path, records)
    assert batch.pixel_values is not None and len(batch.image_token_counts) == 2
    for row in range(2):
        labels = batch.student_labels[row]
        ids = batch.student_input_ids[row][batch.student_attention_mask[row] == 1]
        prompt = processor.tokenizer.decode(ids[labels[: len(ids)] == IGNORE_INDEX])
        assert prompt.index("<|image_pad|>") < prompt.index("<|audio_pad|>") < prompt.index(ASR_INSTRUCTION.strip())
        assert processor.tokenizer.decode(labels[labels != IGNORE_INDEX]) == "What colour is the square?<|im_end|>"
    spoken = picture_asr_records(vqa, 2, seed=0, source="sentences")
    assert [r["image"] for r in spoken] == [r["image"] for r in records]
    assert [r["conversations"][1]["value"] for r in spoken] == sentences("train", 2, 2)
    assert all(r["conversations"][0]["value"] == "<image>\n" + r["conversations"][1]["value"] for r in spoken)
    with pytest.raises(ValueError, match="source"):
        picture_asr_records(vqa, 2, seed=0, source="voices")
