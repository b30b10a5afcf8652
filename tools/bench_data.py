"""Throughput of the whole data path (tar read, image + audio decode, Whisper log-mel,
tokenisation, collation) on one CPU core, num_workers=0.

    python tools/bench_data.py                 # tiny processor and a real-size one
    python tools/bench_data.py --samples 512 --image_px 336 --audio_s 5

The real-size processor is Qwen2VLImageProcessor with its defaults and a Whisper-large-v3
feature extractor (128 mel bins, 30 s window) with the tiny tokenizer (no weights can be
downloaded; tokenising is a small share of the time).
"""

import argparse
import io
import json
import os
import tarfile
import tempfile
import time

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from trainer.data import build_train_loader
from datagen.tts import EspeakTTS
from datagen.writer import AUDIO_RATE, flac_bytes
from trainer.models.tiny import build_real_size_processor, build_tiny_processor

QUESTION = ("Looking carefully at the picture, what colour is the large circle on the left side "
            "of the table, and how many smaller shapes are next to it?")


def write_bench_shard(path: str, num_distinct: int, image_px: int, audio_s: float) -> None:
    """num_distinct samples: smooth random JPEG of image_px^2 and audio_s seconds of eSpeak speech (FLAC)."""
    rng = np.random.default_rng(0)
    tts = EspeakTTS()
    with tarfile.open(path, "w") as tar:
        for i in range(num_distinct):
            small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((image_px, image_px), Image.Resampling.BICUBIC)
            jpeg = io.BytesIO()
            image.save(jpeg, format="JPEG", quality=90)
            speech, rate = tts.synthesize(QUESTION, seed=i)
            flac = flac_bytes(speech, rate)
            audio = sf.read(io.BytesIO(flac), dtype="float32")[0]
            target = int(audio_s * AUDIO_RATE)
            audio = np.tile(audio, target // len(audio) + 1)[:target]
            members = {"jpg": jpeg.getvalue(), "flac": flac_bytes(audio, AUDIO_RATE),
                       "json": json.dumps({"question": QUESTION, "answer": "It is red; there are three."}).encode()}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"s{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def bench(shard: str, processor, samples: int, micro_batch_size: int) -> float:
    loader = build_train_loader(shard, processor, stage="selfkd", micro_batch_size=micro_batch_size,
                                max_seq_len=8192, rank=0, world_size=1, num_workers=0, seed=0)
    batches = iter(loader)
    next(batches)  # warm-up: allocator, resampler caches, first template render
    started = time.perf_counter()
    seen = 0
    while seen < samples:
        seen += len(next(batches))
    return seen / (time.perf_counter() - started)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--distinct", type=int, default=32, help="distinct samples in the bench shard")
    parser.add_argument("--image_px", type=int, default=336)
    parser.add_argument("--audio_s", type=float, default=5.0)
    parser.add_argument("--micro_batch_size", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        shard = os.path.join(tmp, "bench.tar")
        write_bench_shard(shard, args.distinct, args.image_px, args.audio_s)
        for name, processor in (("tiny", build_tiny_processor()), ("qwen2vl+whisper-large-v3", build_real_size_processor())):
            rate = bench(shard, processor, args.samples, args.micro_batch_size)
            results[name] = round(rate, 1)
            print(f"{name}: {rate:.1f} samples/s on 1 core ({args.image_px}px JPEG, {args.audio_s:g} s speech, "
                  f"{processor.num_mel_bins} mel bins, {processor.window_frames} frames)")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
