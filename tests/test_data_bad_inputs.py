"""Untrusted shards: odd-but-valid inputs are converted, text-only samples (no image
member) are kept, broken samples are skipped and counted by reason, pickles are never
loaded, and too many bad samples stop the run."""

import io
import json
import logging
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from trainer.data import DataQualityError, build_eval_loader, build_train_loader
from trainer.data.batch import IGNORE_INDEX
from trainer.data.decode import decode_image
from trainer.data.shards import read_shard
from trainer.models.tiny import build_tiny_processor


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def image_bytes(mode="RGB", size=(64, 48), fmt="JPEG", **save_args) -> bytes:
    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def audio_bytes(seconds=1.0, rate=16000, channels=1, fmt="WAV") -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    data = np.stack([wave] * channels, axis=1) if channels > 1 else wave
    buffer = io.BytesIO()
    sf.write(buffer, data, rate, format=fmt)
    return buffer.getvalue()


def meta(question="What is shown?", answer="A square.", **extra) -> bytes:
    return json.dumps({"question": question, "answer": answer, **extra}).encode()


def good(key, **overrides):
    members = {"jpg": image_bytes(), "wav": audio_bytes(), "json": meta()}
    members.update(overrides)
    return key, members


def write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


class TouchOnUnpickle:
    """Unpickling this creates `path`: proof that something called pickle.loads."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def odd_samples():
    """Valid inputs that need conversion: all must decode."""
    transparent = Image.new("P", (40, 30))
    transparent.info["transparency"] = 0
    png_p = io.BytesIO()
    transparent.save(png_p, format="PNG", transparency=0)
    gray16 = io.BytesIO()
    Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)).save(gray16, format="PNG")
    return [
        good("gray", jpg=image_bytes("L")),
        good("rgba", jpg=b"", png=image_bytes("RGBA", fmt="PNG")),
        good("cmyk", jpg=image_bytes("CMYK")),
        good("palette", jpg=b"", png=png_p.getvalue()),
        good("gray16", jpg=b"", png=gray16.getvalue()),
        good("webp", jpg=b"", webp=image_bytes(fmt="WEBP")),
        good("huge", jpg=image_bytes(size=(4000, 3000), quality=30)),
        good("stereo8k", wav=audio_bytes(rate=8000, channels=2)),
        good("flac44k", wav=b"", flac=audio_bytes(rate=44100, fmt="FLAC")),
        good("ogg", wav=b"", ogg=audio_bytes(rate=22050, fmt="OGG")),
        good("long", wav=audio_bytes(seconds=12)),  # longer than the tiny 10 s window: clipped, kept
    ]


def drop_empty(samples):
    return [(key, {ext: data for ext, data in members.items() if data}) for key, members in samples]


def bad_samples(marker):
    jpeg = image_bytes()
    flac = audio_bytes(fmt="FLAC")
    bomb = io.BytesIO()
    Image.new("1", (8000, 7000)).save(bomb, format="PNG")  # 56 MP in a few KB
    return [
        good("truncated_image", jpg=jpeg[: len(jpeg) // 2]),
        good("garbage_image", jpg=b"this is not a jpeg"),
        good("bomb", jpg=b"", png=bomb.getvalue()),
        good("truncated_audio", wav=b"", flac=flac[: len(flac) // 2]),
        good("garbage_audio", wav=b"RIFF....WAVEnot really"),
        good("no_json", json=b""),
        good("no_audio", wav=b""),
        good("empty_answer", json=meta(answer="  ")),
        good("no_answer", json=json.dumps({"question": "Why?"}).encode()),
        good("invalid_json", json=b'{"question": "x", '),
        good("latin1_json", json='{"question": "caf\u00e9", "answer": "oui"}'.encode("latin-1")),
        good("list_json", json=b"[1, 2]"),
        good("pickled", pyd=pickle.dumps(TouchOnUnpickle(marker)), pickle=pickle.dumps(TouchOnUnpickle(marker)),
             txt=b"unknown extension"),
    ]


EXPECTED_BAD = {"bad_image": 2, "image_too_large": 1, "bad_audio": 2, "missing_key": 3, "empty_answer": 1,
                "bad_json": 3}


def run_epoch(spec, processor, **kwargs):
    args = dict(stage="selfkd", micro_batch_size=3, max_seq_len=1024, rank=0, world_size=1, num_workers=0, seed=0,
                epochs=1, max_bad_fraction=1.0)
    args.update(kwargs)
    loader = build_train_loader(spec, processor, **args)
    batches = list(loader)
    return loader, batches


def test_pickle_payload_is_real(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(TouchOnUnpickle(control)))
    assert control.exists()


def test_odd_inputs_are_converted(tmp_path, processor):
    spec = write_tar(tmp_path / "odd.tar", drop_empty(odd_samples()))
    loader, batches = run_epoch(spec, processor, max_bad_fraction=0.0)
    keys = [k for b in batches for k in b.keys]
    assert sorted(keys) == sorted(k for k, _ in odd_samples())
    assert loader.skip_counts() == {"audio_clipped": 1}
    for batch in batches:
        assert torch.isfinite(batch.pixel_values).all() and torch.isfinite(batch.input_features).all()
        # every image fits the processor's cap (112x112 px -> at most 16 image tokens)
        assert all(processor.image_token_count(g) <= 16 for g in batch.image_grid_thw)


def test_image_conversions():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red -> white
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    image, padded = decode_image(buffer.getvalue(), max_pixels=10_000)  # 10 px < 28 px: padded with white
    assert padded and image.mode == "RGB" and image.size == (28, 28) and image.getpixel((14, 14)) == (255, 255, 255)
    big, padded = decode_image(image_bytes(size=(4000, 3000), quality=30), max_pixels=112 * 112)
    assert not padded and big.mode == "RGB" and big.width * big.height <= 112 * 112 * 1.05
    assert abs(big.width / big.height - 4 / 3) < 0.05


def test_broken_samples_are_skipped_and_counted(tmp_path, processor, caplog):
    marker = tmp_path / "unpickled"
    good_spec = write_tar(tmp_path / "good.tar", [good(f"ok{i}") for i in range(4)])
    bad_spec = write_tar(tmp_path / "bad.tar", drop_empty(bad_samples(marker)))
    full = write_tar(tmp_path / "full.tar", [good(f"trunc{i}") for i in range(6)])
    with tarfile.open(full) as tar:
        cut_member = tar.getmember("trunc3.wav")  # trunc3.jpg is complete, its audio is cut mid-data
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(open(full, "rb").read()[: cut_member.offset_data + cut_member.size // 2])
    missing = str(tmp_path / "missing.tar")
    (tmp_path / "index.json").write_text(json.dumps({"shard_samples": {"truncated.tar": 6, "missing.tar": 5}}))
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        loader, batches = run_epoch([good_spec, bad_spec, str(truncated), missing], processor, shuffle=False)
    keys = [k for b in batches for k in b.keys]
    assert not marker.exists(), "a pickle member was unpickled"
    assert set(keys) >= {f"ok{i}" for i in range(4)} | {"pickled"}
    assert sorted(k for k in keys if k.startswith("trunc")) == ["trunc0", "trunc1", "trunc2"]
    # a lost shard counts as the samples index.json gives it; trunc3..5 were lost at the cut
    assert loader.skip_counts() == dict(EXPECTED_BAD, truncated_tar=3, shard_unreadable=5, ignored_member=3)
    assert loader.skip_counts(include_ok=True)["ok"] == len(keys) == 4 + 1 + 3
    line = next(r.getMessage() for r in caplog.records if "truncated_image" in r.getMessage())
    assert bad_spec in line and "field image" in line and "bad_image" in line
    assert any("json.answer" in r.getMessage() and "empty_answer" in r.getMessage() for r in caplog.records)
    assert any(missing in r.getMessage() and "shard_unreadable" in r.getMessage() for r in caplog.records)


def decoded_text(processor, ids, mask):
    return processor.tokenizer.decode(ids[mask == 1])


def test_text_only_samples_have_no_image_inputs(tmp_path, processor):
    """No image member -> text-only sample; an image member that is present but empty is broken."""
    text_only = drop_empty([good(f"text{i}", jpg=b"", json=meta(f"Say {i} words.", f"{i} words.")) for i in range(3)])
    samples = [good("empty_image", jpg=b"")] + text_only  # written as a 0-byte member
    spec = write_tar(tmp_path / "text.tar", samples)
    loader, (batch,) = run_epoch(spec, processor, shuffle=False)
    assert loader.skip_counts() == {"bad_image": 1}
    assert batch.keys == ["text0", "text1", "text2"]
    assert batch.pixel_values is None and batch.image_grid_thw is None
    for row in range(3):
        teacher = decoded_text(processor, batch.teacher_input_ids[row], batch.teacher_attention_mask[row])
        student = decoded_text(processor, batch.student_input_ids[row], batch.student_attention_mask[row])
        for prompt in (teacher, student):
            assert "<|image_pad|>" not in prompt and "<|vision_start|>" not in prompt
        assert f"Say {row} words." in teacher and "<|audio_pad|>" not in teacher
        assert int((batch.student_input_ids[row] == processor.audio_pad_id).sum()) == batch.audio_token_counts[row]
        teacher_answer = batch.teacher_labels[row][batch.teacher_labels[row] != IGNORE_INDEX]
        student_answer = batch.student_labels[row][batch.student_labels[row] != IGNORE_INDEX]
        assert torch.equal(teacher_answer, student_answer)
        assert processor.tokenizer.decode(student_answer) == f"{row} words.<|im_end|>"


def image_patches(processor, data: bytes) -> torch.Tensor:
    """Reference: the image processor run on the image alone."""
    return processor.image_processor(images=[Image.open(io.BytesIO(data)).convert("RGB")],
                                     return_tensors="pt")["pixel_values"]


def test_mixed_batch_one_image_one_text_only(tmp_path, processor):
    picture = image_bytes(size=(56, 84))
    spec = write_tar(tmp_path / "mixed.tar", drop_empty([good("with_image", jpg=picture), good("text_only", jpg=b"")]))
    _, (batch,) = run_epoch(spec, processor, micro_batch_size=2, shuffle=False, max_bad_fraction=0.0)
    assert batch.keys == ["with_image", "text_only"]
    reference = image_patches(processor, picture)
    assert batch.image_grid_thw.shape == (1, 3)
    assert batch.pixel_values.shape == reference.shape
    assert int(batch.image_grid_thw[0].prod()) == reference.shape[0]
    torch.testing.assert_close(batch.pixel_values, reference)
    image_tokens = processor.image_token_count(batch.image_grid_thw[0])
    for side in ("teacher", "student"):
        assert (batch.side(side)[0] == processor.image_pad_id).sum(dim=1).tolist() == [image_tokens, 0]
    for row in range(2):
        teacher_answer = batch.teacher_labels[row][batch.teacher_labels[row] != IGNORE_INDEX]
        student_answer = batch.student_labels[row][batch.student_labels[row] != IGNORE_INDEX]
        assert torch.equal(teacher_answer, student_answer)


def test_mixed_batch_grid_rows_follow_sample_order(tmp_path, processor):
    first, second = image_bytes(size=(112, 28)), image_bytes(size=(28, 56))
    samples = drop_empty([good("first", jpg=first), good("middle", jpg=b""), good("second", jpg=second)])
    _, (batch,) = run_epoch(write_tar(tmp_path / "order.tar", samples), processor, shuffle=False)
    assert batch.keys == ["first", "middle", "second"]
    references = [image_patches(processor, first), image_patches(processor, second)]
    assert batch.image_grid_thw.prod(dim=1).tolist() == [r.shape[0] for r in references]
    torch.testing.assert_close(batch.pixel_values, torch.cat(references))
    counts = (batch.student_input_ids == processor.image_pad_id).sum(dim=1).tolist()
    assert counts == [processor.image_token_count(batch.image_grid_thw[0]), 0,
                      processor.image_token_count(batch.image_grid_thw[1])]


def test_eval_batches_mix_text_only_and_carry_sources(tmp_path, processor):
    samples = drop_empty([good("with_image", json=meta(source="vqa")), good("text_only", jpg=b""),
                          good("text_vqa", jpg=b"", json=meta(source="sharegpt"))])
    spec = write_tar(tmp_path / "eval.tar", samples)
    batches = list(build_eval_loader(spec, processor, micro_batch_size=2, max_seq_len=512, rank=0, world_size=1))
    assert [b.keys for b in batches] == [["with_image", "text_only"], ["text_vqa"]]
    assert [b.sources for b in batches] == [["vqa", None], ["sharegpt"]]
    assert batches[0].image_grid_thw.shape == (1, 3) and batches[1].pixel_values is None
    prompt = decoded_text(processor, batches[1].teacher_input_ids[0], batches[1].teacher_attention_mask[0])
    assert "<|image_pad|>" not in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_tar_cut_inside_an_image_never_yields_a_text_only_sample(tmp_path):
    """Members in json, audio, image order: a cut inside the image must drop the sample."""
    path = write_tar(tmp_path / "order.tar", [(key, {"json": meta(), "wav": audio_bytes(), "jpg": image_bytes()})
                                              for key in ("a", "b")])
    with tarfile.open(path) as tar:
        cut_member = tar.getmember("b.jpg")
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(open(path, "rb").read()[: cut_member.offset_data + cut_member.size // 2])
    samples, _, error = read_shard(str(truncated))
    assert [s["__key__"] for s in samples] == ["a"] and error.reason == "truncated_tar"


def test_too_many_bad_samples_stop_the_run(tmp_path, processor):
    samples = [good(f"ok{i:03d}") for i in range(120)]
    for i in (5, 50, 90):
        samples[i] = good(f"bad{i}", json=b"{not json")
    spec = write_tar(tmp_path / "mostly_good.tar", samples)
    with pytest.raises(DataQualityError, match=r"3 of \d+ samples bad .*bad_json=3"):
        run_epoch(spec, processor, max_bad_fraction=0.01, shuffle=False)
    loader, batches = run_epoch(spec, processor, max_bad_fraction=0.05, shuffle=False)
    assert loader.skip_counts() == {"bad_json": 3} and sum(len(b.keys) for b in batches) == 117


def test_few_samples_are_judged_when_all_are_seen(tmp_path, processor):
    spec = write_tar(tmp_path / "small.tar", drop_empty([good("a"), good("b", json=b""), good("c")]))
    with pytest.raises(DataQualityError, match="missing_key=1"):
        run_epoch(spec, processor, max_bad_fraction=0.01)


def test_a_lost_shard_trips_max_bad_fraction(tmp_path, processor, caplog):
    """Without index.json a lost shard counts as the mean of the shards read whole so far."""
    specs = [write_tar(tmp_path / f"shard-{i}.tar", [good(f"k{i}{j}") for j in range(2 + i)]) for i in range(3)]
    missing = str(tmp_path / "shard-3.tar")
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        with pytest.raises(DataQualityError, match=r"3 of 12 samples bad .*shard_unreadable=3"):  # mean of 2, 3, 4
            run_epoch(specs + [missing], processor, shuffle=False, max_bad_fraction=0.1)
    assert any(missing in r.getMessage() and "shard_unreadable" in r.getMessage() for r in caplog.records)
    loader, _ = run_epoch([missing] + specs, processor, shuffle=False)  # nothing read yet: at least 1
    assert loader.skip_counts() == {"shard_unreadable": 1}


def test_eval_ranks_share_a_lost_shard(tmp_path, processor):
    """Sample-split mode: each rank counts the lost samples that would have been its own."""
    specs = [write_tar(tmp_path / f"e{i}.tar", [good(f"k{i}{j}") for j in range(3)]) for i in range(2)]
    missing = str(tmp_path / "e2.tar")
    (tmp_path / "index.json").write_text(json.dumps({"shard_samples": {"e0.tar": 3, "e1.tar": 3, "e2.tar": 5}}))
    lost = []
    for rank in range(2):
        loader = build_eval_loader(specs[:1] + [missing] + specs[1:], processor, micro_batch_size=2, max_seq_len=512,
                                   rank=rank, world_size=2, max_bad_fraction=1.0)
        assert sum(len(b.keys) for b in loader) == 3
        lost.append(loader.skip_counts()["shard_unreadable"])
    assert lost == [2, 3]  # lost raw samples 3..7 (after e0's 0..2) go to ranks 1, 0, 1, 0, 1


def test_all_shards_missing_is_an_error(tmp_path, processor):
    loader = build_train_loader(str(tmp_path / "nope-{0..1}.tar"), processor, stage="selfkd", micro_batch_size=2,
                                max_seq_len=512, rank=0, world_size=1, num_workers=0, seed=0)
    with pytest.raises(DataQualityError, match="shard_unreadable=2"):
        next(iter(loader))


def test_shard_spec_forms(tmp_path, processor):
    for i in range(3):
        write_tar(tmp_path / f"part-{i:02d}.tar", [good(f"s{i}")])
    brace = str(tmp_path / "part-{00..02}.tar")
    listed = [str(tmp_path / "part-00.tar"), str(tmp_path / "part-{01..02}.tar")]
    piped = [f"pipe:cat {tmp_path / f'part-{i:02d}.tar'}" for i in range(3)]
    for spec in (brace, listed, piped):
        _, batches = run_epoch(spec, processor, shuffle=False, max_bad_fraction=0.0)
        assert sorted(k for b in batches for k in b.keys) == ["s0", "s1", "s2"]


@pytest.mark.slow
def test_data_quality_error_reaches_the_trainer_from_workers(tmp_path, processor):
    specs = [write_tar(tmp_path / f"s{i}.tar", [good(f"k{i}{j}") for j in range(3)] + [good(f"bad{i}", json=b"{")])
             for i in range(2)]
    loader = build_train_loader(specs, processor, stage="selfkd", micro_batch_size=2, max_seq_len=512, rank=0,
                                world_size=1, num_workers=2, seed=0)
    with pytest.raises(DataQualityError, match="bad_json=1"):
        for _ in loader:
            pass


class FailingOn:
    """Wraps a processor part; raises `error` when `trigger(args)` is true, else delegates."""

    def __init__(self, inner, trigger, error):
        self.inner, self.trigger, self.error = inner, trigger, error

    def __call__(self, *args, **kwargs):
        if self.trigger(args, kwargs):
            raise self.error
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_every_bad_sample_class_is_a_counted_skip(tmp_path, caplog):
    """Whatever one sample makes a decoder, the image processor or the tokenizer raise is a
    skip counted by reason, logged with shard, key and field; adjusted-but-usable samples
    are kept and noted."""
    processor = build_tiny_processor()
    processor.image_processor = FailingOn(
        processor.image_processor, lambda a, k: k["images"][0].size == (77, 77), ValueError("processor says no"))
    processor.tokenizer = FailingOn(
        processor.tokenizer, lambda a, k: bool(a) and "BOOM" in str(a[0]), RuntimeError("tokenizer crashed"))
    nested = "[" * 200_000 + "]" * 200_000
    samples = [
        good("deep_json", json=nested.encode()),
        good("deep_field", json=('{"question": ' + "[" * 50 + "]" * 50 + ', "answer": "x"}').encode()),
        good("huge_json", json=meta(question="x" * (2 << 20))),
        good("processor_error", jpg=image_bytes(size=(77, 77))),
        good("tokenizer_error", json=meta(question="BOOM")),
        good("rate_too_low", wav=audio_bytes(rate=4001)),
        good("too_many_channels", wav=audio_bytes(seconds=0.1, channels=100)),
        good("thin_image", jpg=b"", png=image_bytes(size=(3000, 1), fmt="PNG")),
        good("tall_image", jpg=image_bytes(size=(20, 4000))),
        good("one_pixel", jpg=b"", png=image_bytes(size=(1, 1), fmt="PNG")),
        good("odd_rate", wav=audio_bytes(rate=44101)),
        good("fine"),
    ]
    spec = write_tar(tmp_path / "hostile.tar", drop_empty(samples))
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        loader, batches = run_epoch(spec, processor, shuffle=False, micro_batch_size=1)
    assert [b.keys[0] for b in batches] == ["thin_image", "tall_image", "one_pixel", "odd_rate", "fine"]
    assert loader.skip_counts() == {"bad_json": 3, "bad_image": 1, "bad_text": 1, "bad_audio": 2,
                                    "image_padded": 3, "audio_rate_snapped": 1}
    for key, field in [("deep_json", "json"), ("deep_field", "json"), ("processor_error", "image"),
                       ("tokenizer_error", "text"), ("rate_too_low", "audio")]:
        line = next(r.getMessage() for r in caplog.records if f"key {key} " in r.getMessage())
        assert spec in line and f"field {field}" in line, line
    assert any("processor says no" in r.getMessage() for r in caplog.records)
    for batch in batches:
        assert torch.isfinite(batch.pixel_values).all()


def test_padding_keeps_the_image_centred():
    from trainer.data.decode import MAX_ASPECT_RATIO, MIN_IMAGE_SIDE, pad_to_shape_limits

    strip = Image.new("RGB", (1000, 2), (255, 0, 0))
    padded, changed = pad_to_shape_limits(strip)
    assert changed and padded.size == (1000, max(MIN_IMAGE_SIDE, 1000 // MAX_ASPECT_RATIO))
    middle = padded.size[1] // 2
    assert padded.getpixel((500, middle - 1)) == (255, 0, 0) and padded.getpixel((500, 0)) == (255, 255, 255)
    square = Image.new("RGB", (40, 40))
    assert pad_to_shape_limits(square) == (square, False)


def test_json_depth_ignores_brackets_in_strings():
    from trainer.data.decode import json_depth

    assert json_depth('{"a": "[[[[{{{{", "b": [1, [2]]}') == 3
    assert json_depth('{"a": "quote \\" [[[", "b": 1}') == 1
    assert json_depth("[]") == 1 and json_depth('"x"') == 0


MEMORY_PROBE = r"""
import io, json, resource, sys
import numpy as np, soundfile as sf
from trainer.data.decode import decode_audio, SampleError

def silent(seconds, rate, channels, fmt, subtype="PCM_16"):
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", samplerate=rate, channels=channels, format=fmt, subtype=subtype) as f:
        block = np.zeros((rate * 10, channels), dtype=np.int16)
        for _ in range(int(seconds // 10)):
            f.write(block)
    return buffer.getvalue()

kind = sys.argv[1]
data = {"two_hour_flac": lambda: silent(7200, 16000, 1, "FLAC"),
        "twenty_minute_stereo_48k": lambda: silent(1200, 48000, 2, "FLAC"),
        "odd_rate_wav": lambda: silent(10, 8001, 1, "WAV"),
        "odd_rate_wav_44101": lambda: silent(10, 44101, 1, "WAV")}[kind]()
decode_audio(silent(10, 22050, 2, "FLAC"), 16000, 30.0)  # first resampling call's set-up, outside the measure
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
audio, notes = decode_audio(data, 16000, 30.0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"bytes": len(data), "samples": len(audio), "notes": sorted(notes), "grown_mib": (after - before) / 1024}))
"""


@pytest.mark.parametrize("kind,notes", [("two_hour_flac", ["audio_clipped"]),
                                        ("twenty_minute_stereo_48k", ["audio_clipped"]),
                                        ("odd_rate_wav", ["audio_rate_snapped"]),
                                        ("odd_rate_wav_44101", ["audio_rate_snapped"])])
def test_audio_memory_is_bounded_by_the_window(kind, notes):
    """Peak memory of decoding one long or odd-rate file is bounded by the 30 s window (the
    largest buffer is the resampling convolution's, ~45 MiB for 48 kHz), whatever the file's
    length, channels or rate. Decoding whole files cost +549 MiB, +1.7 GiB and +2 GiB here."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, kind], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["notes"] == notes
    if notes == ["audio_clipped"]:
        assert probe["samples"] == 16000 * 30 and probe["bytes"] < 2_000_000  # a small file holding hours
    else:  # 10 s read as the nearest multiple of 100 Hz: under 0.7% longer or shorter
        assert abs(probe["samples"] - 160000) < 0.007 * 160000
    assert probe["grown_mib"] < 128, f"{kind}: decoding grew the peak RSS by {probe['grown_mib']:.0f} MiB"
