"""Build WebDataset shards for the Self-KD trainer.

LLaVA instruction data, questions spoken with TTS (eSpeak NG built in, or any engine):
    python tools/make_shards.py llava --json llava_v1_5_mix665k.json --image_root data/images \
        --out shards/selfkd --limit 50000 --seed 0 --samples_per_shard 1000 --workers 8
    python tools/make_shards.py llava ... --tts_cmd 'piper --model en_US-lessac-medium.onnx --output_file {out} < {text_file}'
ASR manifest (one {"audio": path, "text": ...} per line; paths relative to the manifest):
    python tools/make_shards.py asr --manifest librispeech.jsonl --out shards/asr

Re-running the same command skips complete shards. Writes OUT/index.json (shards, samples
per shard and in all, hours of audio, skipped inputs by reason). From Python:
make_llava_shards / make_asr_shards.
"""

import argparse
import json
import logging

from datagen.writer import make_asr_shards, make_llava_shards

__all__ = ["make_asr_shards", "make_llava_shards", "main"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    llava = modes.add_parser("llava", help="LLaVA conversation JSON + images -> spoken-question shards")
    llava.add_argument("--json", required=True, help="LLaVA conversation JSON (a list of records)")
    llava.add_argument("--image_root", required=True, help="directory the records' 'image' paths are relative to")
    llava.add_argument("--voices", default=None, help="comma-separated eSpeak NG voices, e.g. en-us,en+f3")
    llava.add_argument("--tts_cmd", default=None,
                       help="external TTS command template with {out} and {text_file} (or {text}); no shell")
    asr = modes.add_parser("asr", help="JSONL manifest of audio + transcript -> ASR shards")
    asr.add_argument("--manifest", required=True, help='JSONL file, one {"audio": path, "text": ...} per line')
    for sub in (llava, asr):
        sub.add_argument("--out", required=True, help="output directory")
        sub.add_argument("--limit", type=int, default=None, help="keep N samples of the seeded shuffle")
        sub.add_argument("--seed", type=int, default=0, help="shuffle / subset / voice seed")
        sub.add_argument("--samples_per_shard", type=int, default=1000)
        sub.add_argument("--workers", type=int, default=1, help="processes for TTS / audio work")
        sub.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    common = dict(limit=args.limit, seed=args.seed, samples_per_shard=args.samples_per_shard, workers=args.workers,
                  progress=not args.no_progress)
    if args.mode == "llava":
        voices = [v.strip() for v in args.voices.split(",") if v.strip()] if args.voices else None
        index = make_llava_shards(args.json, args.image_root, args.out, voices=voices, tts_cmd=args.tts_cmd, **common)
    else:
        index = make_asr_shards(args.manifest, args.out, **common)
    print(json.dumps(index, indent=2))
    return index


if __name__ == "__main__":
    main()
