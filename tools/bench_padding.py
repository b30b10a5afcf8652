"""Padding of the training micro-batches on a realistic length mix: a fixed sample count
(--micro_batch_size) against the token budget (--max_tokens_per_micro_batch), through the
trainer's own loader (decode, encode, collate) on shards written for the purpose.

    python tools/bench_padding.py --json docs/results/token_budget/padding.json
    python tools/bench_padding.py --samples 200 --budgets 8192 --buffers 32      # quick

The mix (LLaVA-1.5-665k-like; each sample one spoken question about an optional image):
  answers   40% a word or phrase (1-3 tokens; VQAv2 / GQA / OCR-VQA style), 15% a sentence
            (4-20), 35% a paragraph (30-250, log-uniform; LLaVA-Instruct conversations),
            10% a long answer (250-500; detailed descriptions, ShareGPT)
  questions 4-60 words (log-normal, median 12); its speech lasts words / 2.5 s + 0.3-1.2 s,
            kept within 1-20 s (the clip is low-level noise: only its length matters here)
  images    94% with one (ShareGPT's text-only part is 6% of the mix), 256-800 px a side,
            aspect 1:2 to 2:1 (COCO, GQA, TextVQA, VG sizes); Qwen2-VL's image processor at its
            defaults (28 px per token: 80-820 image tokens)
The processor is Qwen2-VL's image processor and a Whisper-large-v3 feature extractor (30 s
window, 128 mel bins) with the tiny tokenizer (no weights download here; its ~2 tokens per
word are corrected for when the texts are written, so the lengths above are in tokens).

Reported per arm: padding share of the sequence tokens (1 - real / computed, both sides for
Self-KD), of the audio encoder's positions (clips padded to the batch's longest, as Whisper
reads them), samples per micro-batch, and for the token budget the share of micro-batches
whose real tokens lie within 10% of the budget (the buffer's last one may not: its rest).
"""

import argparse
import io
import json
import math
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

from datagen.writer import AUDIO_RATE, flac_bytes, write_tar
from trainer.data import build_train_loader
from trainer.models.tiny import build_real_size_processor

WORDS = ("the a red blue green small large circle square left right top bottom of on in is are what which how many "
         "picture image person table street car dog window sign colour color next to behind front there it this "
         "that shows wearing holding standing sitting people building sky tree water road two three four white "
         "black yellow describe detail scene text written number man woman child room kitchen food plate").split()


def _text(rng, num_tokens: int, tokens_per_word: float) -> str:
    words = max(1, round(num_tokens / tokens_per_word))
    return " ".join(rng.choice(WORDS, size=words))


def answer_tokens(rng) -> int:
    kind = rng.random()
    if kind < 0.40:
        return int(rng.integers(1, 4))
    if kind < 0.55:
        return int(rng.integers(4, 21))
    if kind < 0.90:
        return int(round(math.exp(rng.uniform(math.log(30), math.log(250)))))
    return int(rng.integers(250, 501))


def write_mix(out_dir: str, num_samples: int, seed: int, tokens_per_word: float, per_shard: int = 100) -> str:
    """Shards of the mix above; returns their spec."""
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for start in range(0, num_samples, per_shard):
        samples = []
        for i in range(start, min(start + per_shard, num_samples)):
            words = int(np.clip(round(rng.lognormal(math.log(12), 0.6)), 4, 60))
            seconds = float(np.clip(words / 2.5 + rng.uniform(0.3, 1.2), 1.0, 20.0))
            clip = (1e-3 * rng.standard_normal(int(seconds * AUDIO_RATE))).astype(np.float32)
            meta = {"question": _text(rng, round(words * tokens_per_word), tokens_per_word),
                    "answer": _text(rng, answer_tokens(rng), tokens_per_word)}
            members = {"json": json.dumps(meta).encode(), "flac": flac_bytes(clip, AUDIO_RATE)}
            if rng.random() < 0.94:
                side = rng.uniform(256, 800)
                aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
                w, h = int(side * math.sqrt(aspect)), int(side / math.sqrt(aspect))
                small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                jpeg = io.BytesIO()
                Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(jpeg, format="JPEG")
                members["jpg"] = jpeg.getvalue()
            samples.append({"key": f"s{i:06d}", "members": members})
        paths.append(os.path.join(out_dir, f"mix-{start // per_shard:06d}.tar"))
        write_tar(paths[-1], samples)
    return ",".join(paths)


def measure(spec: str, processor, *, micro_batch_size: int, max_tokens: int, buffer_size: int, with_teacher: bool,
            max_seq_len: int) -> dict:
    """One epoch of the loader; padding shares and micro-batch sizes."""
    loader = build_train_loader(spec, processor, stage="selfkd", micro_batch_size=micro_batch_size,
                                max_seq_len=max_seq_len, rank=0, world_size=1, num_workers=0, seed=0, epochs=1,
                                max_tokens=max_tokens, buffer_size=buffer_size, with_teacher=with_teacher,
                                max_bad_fraction=0.5)
    real = computed = audio_real = audio_computed = 0
    sizes, fills = [], []
    for batch in loader:
        sides = [batch.student_attention_mask] + ([batch.teacher_attention_mask] if with_teacher else [])
        batch_real = sum(int(m.sum()) for m in sides)
        real += batch_real
        computed += sum(m.numel() for m in sides)
        frames = batch.audio_frames.tolist()
        audio_real += sum(frames)
        audio_computed += len(frames) * max(frames)
        sizes.append(len(batch))
        fills.append(batch_real / max_tokens if max_tokens else None)
    result = {"micro_batches": len(sizes), "samples": sum(sizes), "skipped": loader.skip_counts(),
              "token_padding_share": round(1 - real / computed, 4),
              "audio_padding_share": round(1 - audio_real / audio_computed, 4),
              "samples_per_micro_batch": {"mean": round(float(np.mean(sizes)), 2), "min": min(sizes),
                                          "max": max(sizes)},
              "real_tokens_per_micro_batch": round(real / len(sizes), 1)}
    if max_tokens:
        result["buffers"] = math.ceil(sum(sizes) / buffer_size)
        result["within_10pct_of_budget"] = round(sum(f >= 0.9 for f in fills) / len(fills), 4)
        result["below_90pct_of_budget"] = sum(f < 0.9 for f in fills)
        result["fill_of_budget"] = {"mean": round(float(np.mean(fills)), 4), "min": round(min(fills), 4)}
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--micro_batch_size", type=int, default=8, help="the fixed-count arm")
    parser.add_argument("--budgets", default="8192,16384", help="comma list of --max_tokens_per_micro_batch")
    parser.add_argument("--buffers", default="32,128,512", help="comma list of --token_budget_buffer")
    parser.add_argument("--max_seq_len", type=int, default=2048)
    parser.add_argument("--sft", action="store_true", help="no teacher pass: only the student side counts")
    parser.add_argument("--shards", help="measure these shards instead of writing the mix")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    processor = build_real_size_processor()
    sample_words = " ".join(WORDS)
    tokens_per_word = len(processor.tokenizer(sample_words, add_special_tokens=False)["input_ids"]) / len(WORDS)
    with_teacher = not args.sft
    given = sys.argv[1:] if argv is None else argv
    results = {"command": " ".join(["python tools/bench_padding.py", *given]), "samples": args.samples,
               "seed": args.seed, "with_teacher": with_teacher, "max_seq_len": args.max_seq_len, "arms": []}
    with tempfile.TemporaryDirectory(prefix="bench_padding_") as tmp:
        spec = args.shards or write_mix(os.path.join(tmp, "mix"), args.samples, args.seed, tokens_per_word)
        arms = [{"micro_batch_size": args.micro_batch_size, "max_tokens": 0, "buffer_size": 0}]
        arms += [{"micro_batch_size": 1, "max_tokens": int(n), "buffer_size": int(b)}
                 for n in args.budgets.split(",") for b in args.buffers.split(",")]
        for arm in arms:
            row = {**arm, **measure(spec, processor, with_teacher=with_teacher, max_seq_len=args.max_seq_len, **arm)}
            results["arms"].append(row)
            name = (f"micro_batch_size {arm['micro_batch_size']}" if not arm["max_tokens"] else
                    f"max_tokens {arm['max_tokens']}, buffer {arm['buffer_size']}")
            extra = (f", within 10% of the budget {row['within_10pct_of_budget']:.0%} "
                     f"({row['below_90pct_of_budget']} below, {row['buffers']} buffers)" if arm["max_tokens"] else "")
            print(f"{name}: padding {row['token_padding_share']:.1%} of tokens, {row['audio_padding_share']:.1%} of "
                  f"audio positions; {row['samples_per_micro_batch']['mean']} samples per micro-batch{extra}",
                  flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
