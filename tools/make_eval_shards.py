"""Convert a downloaded benchmark into held-out shards whose questions are asked typed and
spoken (TTS as in tools/make_shards.py): MME, POPE, TextVQA, HallusionBench, ScienceQA-IMG.

From the lmms-eval Parquet copies on the HF hub (a file, or a folder searched for *.parquet;
--split keeps one split's files, default test / validation for TextVQA / all for
HallusionBench):
    python tools/make_eval_shards.py --benchmark mme --src hf/lmms-lab/MME --out eval/mme
    python tools/make_eval_shards.py --benchmark textvqa --src hf/lmms-lab/textvqa --out eval/textvqa
    python tools/make_eval_shards.py --benchmark scienceqa --src hf/lmms-lab/ScienceQA/ScienceQA-IMG --out eval/sqa
From the original releases (--image_root where the images are not beside the questions):
    python tools/make_eval_shards.py --benchmark mme --src MME_Benchmark_release_version --out eval/mme
    python tools/make_eval_shards.py --benchmark pope --src POPE/output/coco --image_root coco/val2014 --out eval/pope
    python tools/make_eval_shards.py --benchmark textvqa --src TextVQA_0.5.1_val.json --image_root train_images \
        --out eval/textvqa
    python tools/make_eval_shards.py --benchmark hallusionbench --src HallusionBench/HallusionBench.json --out eval/hb
    python tools/make_eval_shards.py --benchmark scienceqa --src ScienceQA/data/scienceqa --split test --out eval/sqa
Options as in make_shards: --limit 500 --seed 0 --workers 8 --voices en-us,en+f3 --tts_cmd '...'.

Writes OUT/images/, OUT/<benchmark>.json (LLaVA records; datagen/benchmarks.py says what
each holds) and OUT/shards/shard-*.tar with OUT/shards/index.json, which it prints; its
shard_spec is what tools/evaluate.py --shards takes. Re-running the same command skips
complete shards. From Python: datagen.benchmarks.convert_benchmark.
"""

import argparse
import json
import logging

from datagen.benchmarks import BENCHMARKS, convert_benchmark


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    parser.add_argument("--src", required=True, help="a .parquet file, a folder of them, or the release's file/folder")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--split", default=None,
                        help="Parquet split to keep in a folder (test, validation, image, ...) or ScienceQA's "
                             "pid_splits.json key; default: the benchmark's evaluation split")
    parser.add_argument("--image_root", default=None,
                        help="release layouts: COCO val2014 (POPE), TextVQA's image folder, where HallusionBench's "
                             "filename paths start (default: its JSON's folder), ScienceQA's images/ folder")
    parser.add_argument("--limit", type=int, default=None, help="keep N samples of the seeded shuffle")
    parser.add_argument("--seed", type=int, default=0, help="shuffle / subset / voice seed")
    parser.add_argument("--samples_per_shard", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=1, help="processes for TTS")
    parser.add_argument("--voices", default=None, help="comma-separated eSpeak NG voices, e.g. en-us,en+f3")
    parser.add_argument("--tts_cmd", default=None,
                        help="external TTS command template with {out} and {text_file} (or {text}); no shell")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    voices = [v.strip() for v in args.voices.split(",") if v.strip()] if args.voices else None
    index = convert_benchmark(args.benchmark, args.src, args.out, split=args.split, image_root=args.image_root,
                              limit=args.limit, seed=args.seed, samples_per_shard=args.samples_per_shard,
                              workers=args.workers, voices=voices, tts_cmd=args.tts_cmd, progress=not args.no_progress)
    print(json.dumps(index, indent=2))
    return index


if __name__ == "__main__":
    main()
