"""make_shards (real eSpeak NG speech) -> streaming loader -> collator: batch contract,
rank x worker split, shuffling, exact resume, eval loader, ASR stage, too_long rule,
inspect_shards."""

import collections
import io
import json
import os
import shutil
import sys
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from transformers import WhisperFeatureExtractor

from tools.inspect_shards import main as inspect_main
from trainer.data import DataQualityError, build_eval_loader, build_train_loader
from trainer.data.loader import resize_state
from trainer.data.batch import IGNORE_INDEX
from datagen import writer
from datagen.writer import make_asr_shards, make_llava_shards
from trainer.models.processing import AUDIO_PAD
from trainer.models.tiny import build_tiny_processor

NUM_RECORDS = 9  # with an image, x 2 turn pairs = 18 samples
NUM_SAMPLES = 2 * NUM_RECORDS + 1  # + the text-only record's one turn pair
TEXT_ONLY_KEY = "textonly_t0"
SAMPLES_PER_SHARD = 3


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def write_llava(root, num_records=NUM_RECORDS):
    """A LLaVA JSON with generated images: two turn pairs per record, plus a text-only record
    (no "image" key, no task/source, like LLaVA-1.5-mix's ShareGPT part) and one whose image
    file is missing."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(num_records):
        size = (40 + 16 * i, 56 + 8 * (i % 3))
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(image_dir / f"img{i}.jpg")
        records.append({"id": f"rec{i}", "image": f"img{i}.jpg", "task": "open", "source": "test",
                        "conversations": [
                            {"from": "human", "value": f"<image>\nHow many shapes are in picture {i}?"},
                            {"from": "gpt", "value": f"There are {i + 1} shapes."},
                            {"from": "human", "value": "Which is larger?\nA) the circle\nB) the square"},
                            {"from": "gpt", "value": "A" if i % 2 else "B"}]})
    records.append({"id": "textonly", "conversations": [
        {"from": "human", "value": "Write a two word greeting for a friend."}, {"from": "gpt", "value": "Hello friend!"}]})
    records.append({"id": "lost", "image": "missing.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]})
    json_path = root / "llava.json"
    json_path.write_text(json.dumps(records))
    return json_path, image_dir


@pytest.fixture(scope="module")
def llava_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    json_path, image_dir = write_llava(root)
    out = root / "shards"
    with pytest.MonkeyPatch.context() as patch:  # the worker pool, on a split far too small to need it
        patch.setattr(writer, "MIN_SAMPLES_PER_WORKER", 1)
        index = make_llava_shards(str(json_path), str(image_dir), str(out), seed=3, samples_per_shard=SAMPLES_PER_SHARD,
                                  workers=2, progress=False)
    return {"root": root, "json": json_path, "images": image_dir, "out": out, "index": index,
            "spec": index["shard_spec"]}


def shard_samples(out_dir):
    """key -> {ext: bytes} read straight from the tar files (independent of the loader)."""
    samples = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(out_dir, name)) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def loader_keys(loader, limit=None):
    keys = []
    for batch in loader:
        keys.extend(batch.keys)
        if limit is not None and len(keys) >= limit:
            break
    return keys


def test_a_split_too_small_for_workers_is_written_in_process_to_the_same_bytes(llava_shards, tmp_path, monkeypatch):
    """--workers 2 on 20 samples starts no pool (MIN_SAMPLES_PER_WORKER), and the shards hold the
    pool's samples (the fixture's, written by two spawned workers): the same keys, pictures and
    texts byte for byte, speech of the same voice settings (seeded by the key) and length (eSpeak's
    waveform itself varies slightly from one synthesis to the next, in one process too)."""
    assert llava_shards["index"]["samples"] < 2 * writer.MIN_SAMPLES_PER_WORKER

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started")

    monkeypatch.setattr(writer, "ProcessPoolExecutor", no_pool)
    threads = torch.get_num_threads()
    out = tmp_path / "in_process"
    index = make_llava_shards(str(llava_shards["json"]), str(llava_shards["images"]), str(out), seed=3,
                              samples_per_shard=SAMPLES_PER_SHARD, workers=2, progress=False)
    assert index["shard_samples"] == llava_shards["index"]["shard_samples"]
    assert torch.get_num_threads() == threads, "the caller's torch threads are left as they were"
    mine, pools = shard_samples(out), shard_samples(llava_shards["out"])
    assert sorted(mine) == sorted(pools)
    for key, members in mine.items():
        assert sorted(members) == sorted(pools[key])
        for ext, data in members.items():
            if ext == "flac":
                seconds = [sf.info(io.BytesIO(blob)).duration for blob in (data, pools[key][ext])]
                assert seconds[0] == pytest.approx(seconds[1], rel=0.02), key
            else:
                assert data == pools[key][ext], (key, ext)


def test_make_shards_index(llava_shards):
    index = llava_shards["index"]
    assert index["samples"] == NUM_SAMPLES
    assert index["skipped"] == {"missing_image": 1}
    assert len(index["shards"]) == 7  # 20 planned samples / 3 per shard
    assert 0.001 < index["audio_hours"] < 0.05
    on_disk = json.loads((llava_shards["out"] / "index.json").read_text())
    assert on_disk["samples"] == index["samples"]
    per_shard = {}
    for name in on_disk["shards"]:
        with tarfile.open(llava_shards["out"] / name) as tar:
            per_shard[name] = len({member.name.split(".", 1)[0] for member in tar.getmembers()})
    assert on_disk["shard_samples"] == per_shard and sum(per_shard.values()) == NUM_SAMPLES
    samples = shard_samples(llava_shards["out"])
    assert len(samples) == NUM_SAMPLES
    text_only = json.loads(samples[TEXT_ONLY_KEY]["json"])
    assert set(samples[TEXT_ONLY_KEY]) == {"flac", "json"}
    assert text_only == {"question": "Write a two word greeting for a friend.", "answer": "Hello friend!",
                         "id": "textonly"}
    for key, members in samples.items():
        meta = json.loads(members["json"])
        assert meta["question"] and meta["answer"]
        if key != TEXT_ONLY_KEY:
            assert set(members) == {"jpg", "flac", "json"}, key
            assert meta["task"] == "open" and meta["source"] == "test"
        assert "<image>" not in meta["question"]
        audio, rate = sf.read(io.BytesIO(members["flac"]))
        assert rate == 16000 and 0.5 < len(audio) / rate < 10 and np.abs(audio).max() > 0.05


def test_make_shards_rerun_skips_complete_shards(llava_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(llava_shards["out"], out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "shard-000002.tar").unlink()  # a crash while writing shard 2 leaves only its temp file
    (out / "shard-000002.tar.tmp").write_bytes(b"partial")
    index = make_llava_shards(str(llava_shards["json"]), str(llava_shards["images"]), str(out), seed=3,
                              samples_per_shard=SAMPLES_PER_SHARD, workers=1, progress=False)
    assert index["samples"] == llava_shards["index"]["samples"]
    for path in out.glob("*.tar"):
        if path.name != "shard-000002.tar":
            assert path.stat().st_mtime_ns == mtimes[path.name], f"{path.name} was rewritten"
    assert set(shard_samples(out)) == set(shard_samples(llava_shards["out"]))
    with pytest.raises(ValueError, match="different build"):
        make_llava_shards(str(llava_shards["json"]), str(llava_shards["images"]), str(out), seed=4,
                          samples_per_shard=SAMPLES_PER_SHARD, progress=False)


def test_make_shards_limit_is_reproducible(llava_shards, tmp_path):
    keys = []
    for run in ("a", "b"):
        index = make_llava_shards(str(llava_shards["json"]), str(llava_shards["images"]), str(tmp_path / run),
                                  limit=5, seed=11, samples_per_shard=2, progress=False, voices=["en-us"])
        keys.append(sorted(shard_samples(tmp_path / run)))
        # the 5 drawn inputs either became samples or were skipped (the missing image may be drawn)
        assert index["samples"] + index["skipped"].get("missing_image", 0) == 5
    assert keys[0] == keys[1] and len(keys[0]) == index["samples"]


def test_make_shards_refuses_unknown_voice(llava_shards, tmp_path):
    with pytest.raises(ValueError, match="no voice"):
        make_llava_shards(str(llava_shards["json"]), str(llava_shards["images"]), str(tmp_path / "out"),
                          voices=["en-us", "xx-nope"], progress=False)


def test_batch_contract(llava_shards, processor):
    raw = shard_samples(llava_shards["out"])
    loader = build_train_loader(llava_shards["spec"], processor, stage="selfkd", micro_batch_size=4, max_seq_len=1024,
                                rank=0, world_size=1, num_workers=0, seed=0, epochs=1)
    seen = []
    for batch in loader:
        B = len(batch.keys)
        seen.extend(batch.keys)
        assert batch.student_input_ids.shape == batch.student_labels.shape == batch.student_attention_mask.shape
        assert batch.teacher_input_ids.shape[0] == B and batch.input_features.shape == (B, 80, 1000)
        image_keys = [k for k in batch.keys if "jpg" in raw[k]]
        assert batch.image_grid_thw.shape == (len(image_keys), 3)
        assert batch.pixel_values.shape[0] == int(batch.image_grid_thw.prod(dim=1).sum())
        for row, key in enumerate(batch.keys):
            meta = json.loads(raw[key]["json"])
            teacher_answer = batch.teacher_labels[row][batch.teacher_labels[row] != IGNORE_INDEX]
            student_answer = batch.student_labels[row][batch.student_labels[row] != IGNORE_INDEX]
            assert torch.equal(teacher_answer, student_answer)
            assert processor.tokenizer.decode(student_answer) == meta["answer"] + "<|im_end|>"
            teacher_text = processor.tokenizer.decode(batch.teacher_input_ids[row][batch.teacher_attention_mask[row] == 1])
            assert meta["question"] in teacher_text and AUDIO_PAD not in teacher_text
            student_ids = batch.student_input_ids[row]
            audio, _ = sf.read(io.BytesIO(raw[key]["flac"]), dtype="float32")
            assert int((student_ids == processor.audio_pad_id).sum()) == batch.audio_token_counts[row] \
                == processor.audio_token_count(len(audio))
            # grid rows follow the samples that have an image, in sample order
            image_tokens = processor.image_token_count(batch.image_grid_thw[image_keys.index(key)]) \
                if key in image_keys else 0
            assert int((student_ids == processor.image_pad_id).sum()) == image_tokens
            assert int((batch.teacher_input_ids[row] == processor.image_pad_id).sum()) == image_tokens
            reference = WhisperFeatureExtractor(feature_size=80, chunk_length=10)(
                audio, sampling_rate=16000, return_tensors="np")["input_features"][0]
            np.testing.assert_allclose(batch.input_features[row].numpy(), reference, atol=1e-4)
            length = int(batch.student_attention_mask[row].sum())
            assert batch.student_attention_mask[row][:length].all(), "right padding"
            assert bool((batch.student_input_ids[row][length:] == processor.pad_id).all())
            assert bool((batch.student_labels[row][length:] == IGNORE_INDEX).all())
    assert sorted(seen) == sorted(raw)


@pytest.mark.slow
@pytest.mark.parametrize("num_shards", [7, 2])  # shard-level split, then sample-level (2 shards < 4 slots)
def test_two_ranks_two_workers_see_each_sample_once(llava_shards, processor, num_shards):
    spec = [os.path.join(llava_shards["out"], name) for name in llava_shards["index"]["shards"][:num_shards]]
    expected = sorted(k for name in llava_shards["index"]["shards"][:num_shards]
                      for k in _tar_keys(os.path.join(llava_shards["out"], name)))
    keys = []
    for rank in (0, 1):
        loader = build_train_loader(spec, processor, stage="selfkd", micro_batch_size=2, max_seq_len=1024, rank=rank,
                                    world_size=2, num_workers=2, seed=5, epochs=1)
        rank_keys = loader_keys(loader)
        assert rank_keys, f"rank {rank} got no samples"
        keys.extend(rank_keys)
    assert sorted(keys) == expected


def _tar_keys(path):
    with tarfile.open(path) as tar:
        return sorted({m.name.split(".", 1)[0] for m in tar.getmembers()})


def test_shuffle_is_seeded_and_changes_per_epoch(llava_shards, processor):
    def keys(seed):
        loader = build_train_loader(llava_shards["spec"], processor, stage="selfkd", micro_batch_size=3,
                                    max_seq_len=1024, rank=0, world_size=1, num_workers=0, seed=seed, epochs=2)
        return loader_keys(loader)

    first = keys(1)
    assert first == keys(1)
    assert first != keys(2)
    epoch0, epoch1 = first[:NUM_SAMPLES], first[NUM_SAMPLES:]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def _take(loader, num_batches):
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == num_batches:
            break
    return batches


@pytest.mark.parametrize("num_workers,world_size,rank", [
    (0, 1, 0), pytest.param(2, 1, 0, marks=pytest.mark.slow), pytest.param(2, 2, 1, marks=pytest.mark.slow)])
def test_exact_resume(llava_shards, processor, num_workers, world_size, rank):
    """Stop after k batches, restart from the JSON state: same batches as one run; crosses epochs."""
    args = dict(stage="selfkd", micro_batch_size=2, max_seq_len=1024, rank=rank, world_size=world_size,
                num_workers=num_workers, seed=7)
    total, stop = 16, 5
    reference = _take(build_train_loader(llava_shards["spec"], processor, **args), total)
    first = build_train_loader(llava_shards["spec"], processor, **args)
    head = _take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_train_loader(llava_shards["spec"], processor, state=state, **args)
    tail = _take(resumed, total - stop)
    got = head + tail
    assert [b.keys for b in got] == [b.keys for b in reference]
    for ours, theirs in zip(got, reference):
        assert torch.equal(ours.student_input_ids, theirs.student_input_ids)
        assert torch.equal(ours.input_features, theirs.input_features)
        assert (ours.pixel_values is None and theirs.pixel_values is None) \
            or torch.equal(ours.pixel_values, theirs.pixel_values)
    assert resumed.skip_counts(include_ok=True)["ok"] == sum(len(b.keys) for b in got), \
        "counts carry over a resume"


def test_resume_does_not_decode_skipped_samples(llava_shards, processor):
    args = dict(stage="selfkd", micro_batch_size=2, max_seq_len=1024, rank=0, world_size=1, num_workers=0, seed=7)
    first = build_train_loader(llava_shards["spec"], processor, **args)
    _take(first, 4)
    resumed = build_train_loader(llava_shards["spec"], processor, state=first.state_dict(), **args)

    class CountingEncoder:
        def __init__(self, encoder):
            self.encoder, self.processor, self.calls = encoder, encoder.processor, 0

        def __call__(self, raw):
            self.calls += 1
            return self.encoder(raw)

    resumed.encoder = CountingEncoder(resumed.encoder)
    _take(resumed, 3)
    assert resumed.encoder.calls == 6


def test_resume_with_other_settings_is_refused(llava_shards, processor):
    args = dict(stage="selfkd", micro_batch_size=2, max_seq_len=1024, rank=0, world_size=1, seed=7)
    first = build_train_loader(llava_shards["spec"], processor, num_workers=0, **args)
    _take(first, 1)
    with pytest.raises(ValueError, match="num_workers"):
        build_train_loader(llava_shards["spec"], processor, num_workers=2, state=first.state_dict(), **args)


def test_eval_loader_left_padded_prompts_each_sample_once(llava_shards, processor):
    raw = shard_samples(llava_shards["out"])
    ids = []
    per_rank = []
    for rank in (0, 1):
        count = 0
        for batch in build_eval_loader(llava_shards["spec"], processor, micro_batch_size=4, max_seq_len=1024,
                                       rank=rank, world_size=2):
            assert batch.student_labels is None and batch.teacher_labels is None
            for side in ("teacher", "student"):
                input_ids, mask, _ = batch.side(side)
                assert bool(mask[:, -1].all()), "left padding: every row ends with a real token"
                assert bool((mask.cummax(dim=1).values == mask).all()), "padding only on the left"
                assert bool((input_ids[mask == 0] == processor.pad_id).all())
            for side in ("teacher", "student"):
                prompt = processor.tokenizer.decode(batch.side(side)[0][0])
                assert prompt.endswith("<|im_start|>assistant\n"), "prompt only, ready for generation"
            for row, key in enumerate(batch.keys):
                meta = json.loads(raw[key]["json"])
                assert batch.questions[row] == meta["question"] and batch.answers[row] == [meta["answer"]]
                assert batch.ids[row] == meta["id"] and batch.tasks[row] == meta.get("task")
                assert batch.sources[row] == meta.get("source")  # None for the text-only record
                assert batch.choices[row] is None
            ids.extend(batch.keys)
            count += len(batch.keys)
        per_rank.append(count)
    assert sorted(ids) == sorted(raw)
    assert abs(per_rank[0] - per_rank[1]) <= 1
    again = build_eval_loader(llava_shards["spec"], processor, micro_batch_size=4, max_seq_len=1024, rank=0,
                              world_size=1)
    assert loader_keys(again) == loader_keys(again), "each iteration is a fresh ordered pass"


def test_transcription_eval_prompts(llava_shards, processor):
    """--transcribe: the spoken side is ALIGN's prompt (speech + instruction, no image), the typed
    side its twin (the question text + the same instruction); the reference is the spoken text."""
    raw = shard_samples(llava_shards["out"])
    seen = 0
    for batch in build_eval_loader(llava_shards["spec"], processor, micro_batch_size=4, max_seq_len=1024, rank=0,
                                   world_size=1, transcribe=True):
        assert batch.pixel_values is None and batch.image_grid_thw is None
        for row, key in enumerate(batch.keys):
            question = json.loads(raw[key]["json"])["question"]
            assert batch.tasks[row] == "asr" and batch.answers[row] == [question] and batch.choices[row] is None
            spoken = processor.tokenizer.decode(batch.student_input_ids[row][batch.student_attention_mask[row] == 1])
            typed = processor.tokenizer.decode(batch.teacher_input_ids[row][batch.teacher_attention_mask[row] == 1])
            pads = spoken.count("<|audio_pad|>")
            assert pads == int(batch.audio_token_counts[row]) > 0
            expected = "<|im_start|>user\n{}\nTranscribe the audio.<|im_end|>\n<|im_start|>assistant\n"
            assert spoken.endswith(expected.format("<|audio_start|>" + "<|audio_pad|>" * pads + "<|audio_end|>"))
            assert typed.endswith(expected.format(question)) and "<|image_pad|>" not in typed
            seen += 1
    assert seen == len(raw)


def test_over_long_samples_are_dropped_not_truncated(llava_shards, processor):
    args = dict(stage="selfkd", micro_batch_size=1, rank=0, world_size=1, num_workers=0, seed=0, epochs=1,
                max_bad_fraction=1.0)
    lengths = {}
    for batch in build_train_loader(llava_shards["spec"], processor, max_seq_len=4096, **args):
        lengths[batch.keys[0]] = max(batch.student_input_ids.shape[1], batch.teacher_input_ids.shape[1])
    limit = sorted(lengths.values())[len(lengths) // 2]
    loader = build_train_loader(llava_shards["spec"], processor, max_seq_len=limit, **args)
    kept = [b.keys[0] for b in loader]
    assert sorted(kept) == sorted(k for k, n in lengths.items() if n <= limit)
    assert loader.skip_counts() == {"too_long": sum(n > limit for n in lengths.values())}
    strict = build_train_loader(llava_shards["spec"], processor, max_seq_len=limit,
                                **{**args, "max_bad_fraction": 0.01})
    with pytest.raises(DataQualityError, match="too_long"):
        loader_keys(strict)


def test_align_stage_on_asr_shards(tmp_path, processor):
    rng = np.random.default_rng(1)
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    sf.write(audio_dir / "a.wav", 0.2 * rng.standard_normal((44100, 2)).astype(np.float32), 44100)  # stereo 44.1k
    sf.write(audio_dir / "b.flac", 0.2 * rng.standard_normal(8000).astype(np.float32), 8000)
    sf.write(audio_dir / "c.wav", 0.2 * rng.standard_normal(16000 * 12).astype(np.float32), 16000)  # > 10 s window
    lines = [{"audio": "audio/a.wav", "text": "the quick brown fox"}, {"audio": "audio/b.flac", "text": "one two"},
             {"audio": "audio/c.wav", "text": "a long clip"}, {"audio": "audio/gone.wav", "text": "lost"}]
    manifest = tmp_path / "asr.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    index = make_asr_shards(str(manifest), str(tmp_path / "out"), samples_per_shard=2, progress=False)
    assert index["samples"] == 3 and index["skipped"] == {"bad_manifest_line": 1, "missing_audio": 1}
    loader = build_train_loader(index["shard_spec"], processor, stage="align", micro_batch_size=3, max_seq_len=512,
                                rank=0, world_size=1, num_workers=0, seed=0, shuffle=False, epochs=1)
    (batch,) = list(loader)
    assert not batch.has_teacher and batch.pixel_values is None and batch.image_grid_thw is None
    answers = {processor.tokenizer.decode(row[row != IGNORE_INDEX]) for row in batch.student_labels}
    assert answers == {t + "<|im_end|>" for t in ("the quick brown fox", "one two", "a long clip")}
    assert loader.skip_counts() == {"audio_clipped": 1}
    assert max(batch.audio_token_counts) == processor.audio_token_count(processor.max_audio_samples)


def test_align_sample_keeps_its_picture_only_when_its_json_asks(llava_shards, processor):
    """An ALIGN sample's image member is used only with "with_image": true (the picture, then
    the speech, then the instruction -> transcript); without it the image is never decoded, and
    the flag without an image member is a missing_key skip naming the image."""
    from trainer.data.collate import SampleEncoder
    from trainer.data.decode import SampleError

    encoder = SampleEncoder(processor, "align", 1024)
    raw = next(r for r in shard_samples(llava_shards["out"]).values() if "png" in r or "jpg" in r)
    meta = json.loads(raw["json"])
    sample = {"__key__": "k", **raw}
    plain, _ = encoder({**sample, "json": json.dumps({"transcript": meta["question"]}).encode()})
    pictured, _ = encoder({**sample, "json": json.dumps({"transcript": meta["question"], "with_image": True}).encode()})
    assert "image" not in plain and pictured["image_token_count"] > 0
    prompt = processor.tokenizer.decode(pictured["student_prompt_ids"])
    assert prompt.index("<|image_pad|>") < prompt.index("<|audio_pad|>") < prompt.index("Transcribe the audio.")
    assert pictured["student_prompt_ids"].count(processor.image_pad_id) == pictured["image_token_count"]
    assert pictured["answer_ids"] == plain["answer_ids"]
    no_image = {k: v for k, v in sample.items() if k not in ("png", "jpg")}
    with pytest.raises(SampleError) as error:
        encoder({**no_image, "json": json.dumps({"transcript": "x", "with_image": True}).encode()})
    assert error.value.reason == "missing_key" and error.value.field == "image"


def test_inspect_shards_json(llava_shards, capsys):
    report = inspect_main([llava_shards["spec"], "--json"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["ok"] == report["ok"] == NUM_SAMPLES and last["bad"] == {}
    assert last["text_only"] == 1
    assert 0.5 < last["audio_seconds"]["p50"] < 10
    assert last["student_tokens"]["max"] >= last["student_tokens"]["p50"] > 0


ENGINE = """
import sys, numpy as np, soundfile as sf
text = open(sys.argv[sys.argv.index("--text") + 1]).read()
sf.write(sys.argv[sys.argv.index("--out") + 1], np.full(160 * len(text), 0.3, np.float32), 16000)
"""


def test_make_shards_cli_with_tts_command(tmp_path):
    from tools.make_shards import main as make_main

    json_path, image_dir = write_llava(tmp_path / "data", num_records=2)
    engine = tmp_path / "engine.py"
    engine.write_text(ENGINE)
    index = make_main(["llava", "--json", str(json_path), "--image_root", str(image_dir), "--out",
                       str(tmp_path / "out"), "--tts_cmd", f"{sys.executable} {engine} --text {{text_file}} --out {{out}}",
                       "--no_progress"])
    assert index["samples"] == 5  # 2 records x 2 turn pairs + the text-only one
    for members in shard_samples(tmp_path / "out").values():
        question = json.loads(members["json"])["question"]
        audio, _ = sf.read(io.BytesIO(members["flac"]))
        from datagen.normalize import normalize_for_tts

        assert len(audio) == 160 * len(normalize_for_tts(question))


def test_data_workers_outlive_a_sigterm_until_their_rank_lets_them_go(llava_shards, processor):
    """SLURM signals every process of a job step: a data worker must not die of SIGTERM or
    SIGUSR1 while its rank finishes the step, and must still go when its rank is done."""
    import signal
    import time

    import psutil

    me = psutil.Process()
    before = {p.pid for p in me.children()}
    loader = build_train_loader(llava_shards["spec"], processor, stage="selfkd", micro_batch_size=2,
                                max_seq_len=1024, rank=0, world_size=1, num_workers=2, seed=1)
    stream = iter(loader)
    next(stream)
    workers = [p for p in me.children() if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())]
    assert len(workers) == 2
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
        worker.send_signal(signal.SIGUSR1)
    time.sleep(1.0)
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    for _ in range(6):
        next(stream)  # both workers still serve batches
    stream.close()
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive


ABANDONED_ITERATOR = """
import sys
from trainer.data import build_train_loader
from trainer.models.tiny import build_tiny_processor
loader = build_train_loader(sys.argv[1], build_tiny_processor(), stage="selfkd", micro_batch_size=2, max_seq_len=1024,
                            rank=0, world_size=1, num_workers=2, seed=1)
stream = iter(loader)
next(stream)
print("exiting with live workers", flush=True)
"""


def test_a_rank_exiting_with_live_workers_does_not_hang(llava_shards):
    """At exit multiprocessing terminates leftover workers with SIGTERM: the rank's exit lets
    them go first, so they obey it (they ignore it while the rank runs)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess_run([sys.executable, "-c", ABANDONED_ITERATOR, llava_shards["spec"]], root)
    assert out.returncode == 0 and "exiting with live workers" in out.stdout, out.stderr[-3000:]


def subprocess_run(cmd, root):
    import subprocess

    return subprocess.run(cmd, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)


def test_vl_stage_trains_the_typed_question_as_the_student(llava_shards, processor):
    """--stage vl is a mode of the sample encoder: its student side is the Self-KD teacher
    side (image + typed question + answer), with no teacher and no audio decoded."""
    args = dict(micro_batch_size=4, max_seq_len=1024, rank=0, world_size=1, num_workers=0, seed=0, shuffle=False,
                epochs=1)
    selfkd = list(build_train_loader(llava_shards["spec"], processor, stage="selfkd", **args))
    vl = list(build_train_loader(llava_shards["spec"], processor, stage="vl", **args))
    assert [b.keys for b in vl] == [b.keys for b in selfkd]
    for typed, kd in zip(vl, selfkd):
        assert not typed.has_teacher and typed.input_features is None and typed.audio_token_counts is None
        assert torch.equal(typed.student_input_ids, kd.teacher_input_ids)
        assert torch.equal(typed.student_attention_mask, kd.teacher_attention_mask)
        assert torch.equal(typed.student_labels, kd.teacher_labels)
        assert (typed.pixel_values is None and kd.pixel_values is None) or torch.equal(typed.pixel_values, kd.pixel_values)
        assert not (typed.student_input_ids == processor.audio_pad_id).any()


def _budget_args(**extra):
    return {**dict(stage="selfkd", micro_batch_size=1, max_seq_len=1024, rank=0, world_size=1, num_workers=0, seed=7,
                   max_tokens=600, buffer_size=8), **extra}


def _padded(batch):
    return batch.student_input_ids.numel() + batch.teacher_input_ids.numel()


def test_token_budget_micro_batches_fit_and_cover_each_sample_once(llava_shards, processor):
    """--max_tokens_per_micro_batch: every sample once per epoch, each micro-batch's padded
    tokens (both sides) within the budget, fewer padded tokens than the same samples in batches
    of a fixed count, and a size that varies with the samples' lengths."""
    batches = list(build_train_loader(llava_shards["spec"], processor, **_budget_args(epochs=1)))
    assert sorted(k for b in batches for k in b.keys) == sorted(shard_samples(llava_shards["out"]))
    assert all(_padded(b) <= 600 for b in batches)
    assert len({len(b) for b in batches}) > 1, "the sample count follows the lengths"
    by_count = list(build_train_loader(llava_shards["spec"], processor, **{
        **_budget_args(epochs=1), "max_tokens": 0, "micro_batch_size": 3}))
    real = sum(int(b.student_attention_mask.sum() + b.teacher_attention_mask.sum()) for b in batches)
    assert real == sum(int(b.student_attention_mask.sum() + b.teacher_attention_mask.sum()) for b in by_count)
    assert sum(map(_padded, batches)) < sum(map(_padded, by_count))


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_token_budget_resumes_exactly_from_inside_a_buffer(llava_shards, processor, num_workers):
    """Stopped after any number of micro-batches (inside a buffer or at its end, across epochs),
    the resumed loader hands out the uninterrupted run's micro-batches."""
    args = _budget_args(num_workers=num_workers)
    total = 14
    reference = _take(build_train_loader(llava_shards["spec"], processor, **args), total)
    inside = 0
    for stop in range(1, total, 1 if num_workers == 0 else 4):
        first = build_train_loader(llava_shards["spec"], processor, **args)
        head = _take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))
        inside += any("buffer_start" in p for p in state["positions"].values())
        tail = _take(build_train_loader(llava_shards["spec"], processor, state=state, **args), total - stop)
        assert [b.keys for b in head + tail] == [b.keys for b in reference], stop
        for ours, theirs in zip(head + tail, reference):
            assert torch.equal(ours.student_input_ids, theirs.student_input_ids)
    assert inside, "some stop falls inside a buffer"


def test_token_budget_resume_with_another_plan_is_refused(llava_shards, processor):
    first = build_train_loader(llava_shards["spec"], processor, **_budget_args())
    _take(first, 1)
    state = first.state_dict()
    assert "buffer_start" in state["positions"]["0"]
    for other in ({"max_tokens": 700}, {"buffer_size": 9}, {"with_teacher": False}, {"max_tokens": 0}):
        with pytest.raises(ValueError, match="stopped inside a buffer"):
            _take(build_train_loader(llava_shards["spec"], processor, state=state, **{**_budget_args(), **other}), 1)
    # The same plan over other samples: a lower --max_seq_len drops some of the buffer's as too_long.
    lengths = sorted(max(b.student_input_ids.shape[1], b.teacher_input_ids.shape[1])
                     for b in build_train_loader(llava_shards["spec"], processor, **{
                         **_budget_args(epochs=1), "max_tokens": 0}))
    fewer = {**_budget_args(), "max_seq_len": lengths[len(lengths) // 2], "max_bad_fraction": 1.0}
    with pytest.raises(ValueError, match="now holds other samples or lengths"):
        _take(build_train_loader(llava_shards["spec"], processor, state=state, **fewer), 1)


@pytest.mark.parametrize("with_index", [True, False])
def test_token_budget_resume_counts_shard_level_skips_once(llava_shards, processor, tmp_path, with_index):
    """A buffer that starts at a shard's first sample starts before that shard's own counts (a
    truncated shard's lost samples, ignored members): a resume there counts them once, also when
    no index.json gives the lost samples and they are estimated from the shards read before."""
    names = llava_shards["index"]["shards"]
    for name in names + (["index.json"] if with_index else []):
        shutil.copy(os.path.join(llava_shards["out"], name), tmp_path / name)
    for name in names:  # every shard counts an ignored member when its reading starts
        with tarfile.open(tmp_path / name, "a") as tar:
            info = tarfile.TarInfo(_tar_keys(str(tmp_path / name))[0] + ".xyz")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    cut = tmp_path / names[2]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    spec = [str(tmp_path / n) for n in names]
    # One sample per micro-batch, a buffer per shard of 3: buffers start at shards' first samples.
    args = {**_budget_args(max_bad_fraction=1.0), "buffer_size": SAMPLES_PER_SHARD, "max_tokens": 1}
    total = 14
    uninterrupted = build_train_loader(spec, processor, **args)
    reference = _take(uninterrupted, total)
    assert {"ignored_member", "truncated_tar"} <= set(uninterrupted.skip_counts())
    at_shard_start = 0
    for stop in range(1, total):
        first = build_train_loader(spec, processor, **args)
        head = _take(first, stop)
        state = json.loads(json.dumps(first.state_dict()))
        at_shard_start += state["positions"]["0"].get("buffer_start", {}).get("position", {}).get("cursor") == 0
        resumed = build_train_loader(spec, processor, state=state, **args)
        tail = _take(resumed, total - stop)
        assert [b.keys for b in head + tail] == [b.keys for b in reference], stop
        assert resumed.skip_counts(include_ok=True) == uninterrupted.skip_counts(include_ok=True), stop
    assert at_shard_start, "some stop lies in a buffer that starts at a shard's first sample"


# --- resume on another number of readers (trainer/data/loader.py resize_state) -----------------
def _resized_keys(spec, processor, old, new, head, epochs, **extra):
    """Each of `old` = (world_size, num_workers)'s ranks hands out `head` micro-batches; the
    states then resume on `new` ranks and run to the end of `epochs`. Returns the keys handed out
    before and after, the resized states and each new rank's keys."""
    args = dict(stage="selfkd", micro_batch_size=2, max_seq_len=1024, seed=7, epochs=epochs, **extra)
    before, states = [], []
    for rank in range(old[0]):
        loader = build_train_loader(spec, processor, rank=rank, world_size=old[0], num_workers=old[1], **args)
        before += [k for b in _take(loader, head) for k in b.keys]
        states.append(json.loads(json.dumps(loader.state_dict())))
    after, resized = [], []
    for rank in range(new[0]):
        state = resize_state(states, rank=rank, world_size=new[0], num_workers=new[1])
        resized.append(json.loads(json.dumps(state)))
        loader = build_train_loader(spec, processor, rank=rank, world_size=new[0], num_workers=new[1], state=state,
                                    **args)
        after.append([k for b in loader for k in b.keys])
    return before, after, resized


@pytest.mark.parametrize("old,new,head", [
    ((2, 0), (1, 0), 3), ((1, 0), (2, 0), 4), ((2, 0), (3, 0), 2),
    pytest.param((2, 2), (1, 2), 3, marks=pytest.mark.slow), pytest.param((1, 2), (3, 1), 5, marks=pytest.mark.slow)])
def test_resize_reads_every_sample_of_each_epoch_once(llava_shards, processor, old, new, head):
    """Stopped after `head` micro-batches per rank and resumed on another number of ranks and
    workers, then run to the end of the epoch count: every sample is read once per epoch, the
    interrupted epoch's rest included -- none repeated, none skipped (the same samples, not the
    same order)."""
    spec = [os.path.join(llava_shards["out"], name) for name in llava_shards["index"]["shards"]]
    keys = sorted(shard_samples(llava_shards["out"]))
    before, after, resized = _resized_keys(spec, processor, old, new, head, epochs=3)
    assert all(after), "every new rank reads something"
    stop = resized[0]["positions"]["0"]["own"]["epoch"]
    assert stop < 3
    assert collections.Counter(before + [k for rank in after for k in rank]) == {k: 3 for k in keys}


def test_resize_to_fewer_ranks_hands_out_the_saved_micro_batches_first(llava_shards, processor):
    """2 ranks -> 1 (no data workers): the one new reader takes the two saved readers' micro-batches
    in turn, so with --grad_accum doubled a step sees the samples the saved run's step would have."""
    spec = llava_shards["spec"]
    args = dict(stage="selfkd", micro_batch_size=2, max_seq_len=1024, seed=7, num_workers=0)
    loaders = [build_train_loader(spec, processor, rank=r, world_size=2, **args) for r in (0, 1)]
    for loader in loaders:
        _take(loader, 2)
    states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]
    uninterrupted = [[b.keys for b in _take(loader, 2)] for loader in loaders]
    state = resize_state(states, rank=0, world_size=1, num_workers=0)
    got = [b.keys for b in _take(build_train_loader(spec, processor, rank=0, world_size=1, state=state, **args), 4)]
    assert got == [uninterrupted[0][0], uninterrupted[1][0], uninterrupted[0][1], uninterrupted[1][1]]


def test_resize_to_more_ranks_shares_each_saved_reader(llava_shards, processor):
    """1 rank -> 2 (no data workers): both new readers walk the saved reader, each keeping every
    other micro-batch, so a step of the two (--grad_accum halved) sees the saved run's step."""
    spec = llava_shards["spec"]
    args = dict(stage="selfkd", micro_batch_size=2, max_seq_len=1024, seed=7, num_workers=0)
    loader = build_train_loader(spec, processor, rank=0, world_size=1, **args)
    _take(loader, 3)
    state = json.loads(json.dumps(loader.state_dict()))
    uninterrupted = [b.keys for b in _take(loader, 4)]
    got = []
    for rank in (0, 1):
        resized = resize_state([state], rank=rank, world_size=2, num_workers=0)
        got.append([b.keys for b in _take(build_train_loader(spec, processor, rank=rank, world_size=2, state=resized,
                                                             **args), 2)])
    assert [got[0][0], got[1][0], got[0][1], got[1][1]] == uninterrupted
    ok = [build_train_loader(spec, processor, rank=r, world_size=2, state=resize_state(
        [state], rank=r, world_size=2, num_workers=0), **args).skip_counts(include_ok=True).get("ok", 0) for r in (0, 1)]
    assert ok == [state["counts"]["0"]["ok"], 0], "a shared reader's counts are counted once"


def test_resized_run_resumes_exactly_and_resizes_again(llava_shards, processor):
    """A resized loader's state resumes exactly on its own size, and resizes again (2 -> 3 -> 1):
    still every sample once per epoch."""
    spec = [os.path.join(llava_shards["out"], name) for name in llava_shards["index"]["shards"]]
    args = dict(stage="selfkd", micro_batch_size=2, max_seq_len=1024, seed=7, num_workers=0, epochs=4)
    before, states = [], []
    for rank in (0, 1):
        loader = build_train_loader(spec, processor, rank=rank, world_size=2, **args)
        before += [k for b in _take(loader, 3) for k in b.keys]
        states.append(loader.state_dict())
    middle = [resize_state(states, rank=r, world_size=3, num_workers=0) for r in range(3)]
    # On its own size the resized state resumes exactly: 2 micro-batches, stop, 3 more == 5 in one go.
    reference = [b.keys for b in _take(build_train_loader(spec, processor, rank=1, world_size=3, state=middle[1],
                                                          **args), 5)]
    first = build_train_loader(spec, processor, rank=1, world_size=3, state=middle[1], **args)
    head = [b.keys for b in _take(first, 2)]
    again = json.loads(json.dumps(first.state_dict()))
    tail = [b.keys for b in _take(build_train_loader(spec, processor, rank=1, world_size=3, state=again, **args), 3)]
    assert head + tail == reference
    states = []
    for rank in range(3):
        loader = build_train_loader(spec, processor, rank=rank, world_size=3, state=middle[rank], **args)
        before += [k for b in _take(loader, 2) for k in b.keys]
        states.append(json.loads(json.dumps(loader.state_dict())))
    final = resize_state(states, rank=0, world_size=1, num_workers=0)
    last = build_train_loader(spec, processor, rank=0, world_size=1, state=final, **args)
    after = [k for b in last for k in b.keys]
    keys = sorted(shard_samples(llava_shards["out"]))
    assert collections.Counter(before + after) == {k: 4 for k in keys}
    counts = last.skip_counts(include_ok=True)
    assert counts["ok"] == len(before + after), "every sample counted once, through both resizes"


def test_resize_from_inside_a_length_buffer(llava_shards, processor):
    """Token budget: readers stopped inside a length buffer are replayed on the new size (their
    buffer planned again, the micro-batches already handed out skipped): every sample once per
    epoch. A buffer larger than a reader's share of an epoch cannot be replayed: refused."""
    spec = [os.path.join(llava_shards["out"], name) for name in llava_shards["index"]["shards"]]
    keys = sorted(shard_samples(llava_shards["out"]))
    budget = dict(max_tokens=600, buffer_size=4)
    before, after, resized = _resized_keys(spec, processor, (2, 0), (1, 0), 3, epochs=4, **budget)
    assert any("buffer_start" in item["state"] for item in resized[0]["positions"]["0"]["leftover"])
    assert collections.Counter(before + after[0]) == {k: 4 for k in keys}
    with pytest.raises(ValueError, match="runs past the epoch where the new split takes over"):
        _resized_keys(spec, processor, (2, 0), (1, 0), 1, epochs=4, max_tokens=600, buffer_size=32)


def test_a_resized_length_budget_run_resumes_exactly_after_any_micro_batch(llava_shards, processor):
    """A run resized from inside length buffers, stopped after any of its micro-batches (inside a
    replayed buffer, inside a leftover walk's last, partial buffer, in the new split) and resumed
    on its own size, hands out the micro-batches of one uninterrupted pass."""
    spec = [os.path.join(llava_shards["out"], name) for name in llava_shards["index"]["shards"]]
    args = dict(stage="selfkd", micro_batch_size=2, max_seq_len=1024, seed=7, max_tokens=600, buffer_size=4,
                num_workers=0)
    states = []
    for rank in (0, 1):
        loader = build_train_loader(spec, processor, rank=rank, world_size=2, **args)
        _take(loader, 3)
        states.append(json.loads(json.dumps(loader.state_dict())))
    resized = resize_state(states, rank=0, world_size=1, num_workers=0)
    total = 16
    reference = [b.keys for b in _take(build_train_loader(spec, processor, rank=0, world_size=1, state=resized,
                                                          **args), total)]
    for stop in range(1, total):
        first = build_train_loader(spec, processor, rank=0, world_size=1, state=resized, **args)
        head = [b.keys for b in _take(first, stop)]
        state = json.loads(json.dumps(first.state_dict()))
        tail = [b.keys for b in _take(build_train_loader(spec, processor, rank=0, world_size=1, state=state,
                                                         **args), total - stop)]
        assert head + tail == reference, stop


def test_resize_refuses_states_that_do_not_belong_together(llava_shards, processor):
    args = dict(stage="selfkd", micro_batch_size=2, max_seq_len=1024, num_workers=0)
    states = [build_train_loader(llava_shards["spec"], processor, rank=r, world_size=2, seed=s, **args).state_dict()
              for r, s in ((0, 7), (1, 8))]
    with pytest.raises(ValueError, match="disagree on seed"):
        resize_state(states, rank=0, world_size=1, num_workers=0)
    with pytest.raises(ValueError, match="written by 2 ranks but 1 were given"):
        resize_state(states[:1], rank=0, world_size=1, num_workers=0)
