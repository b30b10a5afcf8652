"""Check shards with exactly the trainer's decode path (read, decode, log-mel, tokenise,
collate) and report ok / bad samples by reason, audio duration and token-length percentiles.

    python tools/inspect_shards.py 'shards/selfkd/shard-{000000..000049}.tar'
    python tools/inspect_shards.py 'shards/asr/shard-{000000..000009}.tar' --stage align --model out/export --json

Token counts, and so too_long, depend on the tokenizer and the length cap: pass --model DIR, the
model you train, and the run's --max_seq_len (the default is the trainer's, 2048) so they match.

With --json the last line of stdout is one JSON object: {"ok": int, "text_only": int (ok samples
without an image; always ok in the align stage), "bad": {reason: count}, "counted": {...},
"audio_seconds": {...}, "student_tokens": {...}, "teacher_tokens": {...}}.
"""

import argparse
import json
import logging

import numpy as np

from trainer.config import DataConfig
from trainer.data.batch import TRAINING_STAGES
from trainer.data.collate import SampleEncoder, collate_train
from trainer.data.loader import NOT_BAD_REASONS, StreamingLoader
from trainer.data.shards import expand_shard_spec

PERCENTILES = (50, 90, 99)


def load_processor(model: str):
    if model == "tiny":
        from trainer.models.tiny import build_tiny_processor

        return build_tiny_processor()
    from trainer.models.processing import OmniProcessor

    return OmniProcessor.from_pretrained(model)


def summarize(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    array = np.asarray(values, dtype=np.float64)
    out = {"count": len(values), "min": float(array.min()), "max": float(array.max()), "mean": float(array.mean())}
    out.update({f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES})
    return out


def inspect(spec, processor, stage: str = "selfkd", max_seq_len: int = DataConfig.max_seq_len) -> dict:
    """Decode every sample of `spec` once, as the trainer would; return the report dict."""
    seconds, student_lengths, teacher_lengths = [], [], []
    text_only = 0

    def recording_collate(samples, pad_id):
        nonlocal text_only
        for sample in samples:
            text_only += "image" not in sample
            if "audio_seconds" in sample:  # the vl stage decodes no audio
                seconds.append(sample["audio_seconds"])
            student_lengths.append(len(sample["student_prompt_ids"]) + len(sample["answer_ids"]))
            if "teacher_prompt_ids" in sample:
                teacher_lengths.append(len(sample["teacher_prompt_ids"]) + len(sample["answer_ids"]))
        return collate_train(samples, pad_id)

    loader = StreamingLoader(expand_shard_spec(spec), SampleEncoder(processor, stage, max_seq_len), recording_collate,
                             micro_batch_size=1, rank=0, world_size=1, num_workers=0, seed=0, shuffle=False,
                             max_bad_fraction=1.0, epochs=1, state=None)
    for _ in loader:
        pass
    counts = loader.skip_counts(include_ok=True)
    return {
        "ok": counts.get("ok", 0),
        "text_only": text_only,
        "bad": {k: v for k, v in sorted(counts.items()) if k not in NOT_BAD_REASONS},
        "counted": {k: v for k, v in sorted(counts.items()) if k in NOT_BAD_REASONS and k != "ok"},
        "audio_seconds": {**summarize(seconds), "total_hours": sum(seconds) / 3600},
        "student_tokens": summarize(student_lengths),
        "teacher_tokens": summarize(teacher_lengths),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", nargs="+", help="shard spec(s): paths, brace patterns, pipe: or URLs")
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (the test tokenizer) or a model directory: give the model you train, so token "
                             "counts and too_long match the run's")
    parser.add_argument("--stage", default="selfkd", choices=TRAINING_STAGES)
    parser.add_argument("--max_seq_len", type=int, default=DataConfig.max_seq_len,
                        help="longer samples count as too_long (default %(default)s, as in the trainer)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = inspect(args.spec, load_processor(args.model), args.stage, args.max_seq_len)
    bad_total = sum(report["bad"].values())
    print(f"ok {report['ok']} (text-only {report['text_only']})  bad {bad_total}  " + "  ".join(f"{k}={v}" for k, v in report["bad"].items()))
    for name in ("audio_seconds", "student_tokens", "teacher_tokens"):
        stats = report[name]
        if stats.get("count"):
            print(f"{name}: " + "  ".join(f"{k} {v:.4g}" for k, v in stats.items()))
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
