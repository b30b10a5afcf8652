"""Score an exported omni model on evaluation shards, question typed (VL) and spoken (VA).

Run:
  python tools/evaluate.py --model runs/demo/export \
      --shards 'demo_out/data/shards/heldout/shard-{000000..000000}.tar' --out runs/demo/eval/report.json
  torchrun --nproc_per_node 8 tools/evaluate.py --model DIR --shards SPEC --out report.json --batch_size 16
Under a launcher (WORLD_SIZE > 1) every rank holds the whole model and answers its share
of the samples; rank 0 writes the outputs.

  python tools/evaluate.py --model DIR --transcribe --shards 'data/shards/asr_heldout/shard-{000000..000000}.tar' \
      --out eval/transcribe.json
--transcribe scores transcription instead of answers: "audio" is the speech with the ASR prompt
(the ALIGN stage's), "text" its typed twin (the transcript written in place of the audio, the
same instruction: can the LLM say the sentence at all?); report["wer"] holds the corpus word
error rate of each (all word edits over all reference words).

Writes report.json ({"vl_score", "va_score", "gap", "n", "by_task", ["by_source"], ["benchmarks"],
"settings"}, points out of 100, gap = VL - VA), report.predictions.jsonl (one line per sample and
mode) and report.png (VL vs VA per task). On shards from tools/make_eval_shards.py each benchmark
is also scored by its own rule (trainer/eval/benchmarks.py) and the paper-style table is printed:
benchmark x (VL, VA, gap) and the average.
"""

import argparse
import json
import os

import torch

from trainer import dist
from trainer.data import build_eval_loader
from trainer.eval.benchmarks import format_table
from trainer.eval.harness import evaluate
from trainer.eval.plots import plot_scores
from trainer.eval.scoring import MODES
from trainer.models.serialize import load_omni

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def output_paths(out: str) -> dict:
    """report.json -> report.predictions.jsonl and report.png beside it."""
    stem = out[: -len(".json")] if out.endswith(".json") else out
    return {"report": out, "predictions": stem + ".predictions.jsonl", "chart": stem + ".png"}


def write_outputs(report: dict, records: list[dict], out: str) -> dict:
    paths = output_paths(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(paths["report"], "w") as f:
        json.dump(report, f, indent=2)
    with open(paths["predictions"], "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    plot_scores(report, paths["chart"])
    return paths


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported omni model directory (save_omni)")
    parser.add_argument("--shards", required=True,
                        help="evaluation shards: a brace spec, or several separated by commas (one argument)")
    parser.add_argument("--out", required=True, help="report JSON path; predictions and chart go beside it")
    parser.add_argument("--modes", default="text,audio", help="text (typed question), audio (spoken) or both")
    parser.add_argument("--batch_size", type=int, default=8, help="samples per generate() call per rank")
    parser.add_argument("--transcribe", action="store_true",
                        help="score transcription (task asr, corpus WER) of the shards' speech instead of answers")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help="default 16 for answers, 64 with --transcribe")
    parser.add_argument("--max_seq_len", type=int, default=4096, help="longer prompts are skipped by the loader")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--dist_timeout_s", type=int, default=1800)
    args = parser.parse_args(argv)
    args.modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if args.max_new_tokens is None:
        args.max_new_tokens = 64 if args.transcribe else 16
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes takes a comma list of {MODES}, got {args.modes}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init(args.dist_timeout_s)
    try:
        device = dist.device()
        dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model, processor = load_omni(args.model, dtype=dtype)
        model.to(device)
        loader = build_eval_loader(args.shards, processor, micro_batch_size=args.batch_size,
                                   max_seq_len=args.max_seq_len, rank=dist.rank(), world_size=dist.world_size(),
                                   transcribe=args.transcribe)
        report, records = evaluate(model, processor, loader, modes=args.modes, max_new_tokens=args.max_new_tokens,
                                   device=device, dtype=dtype)
        report["settings"] = {"model": args.model, "shards": args.shards, "modes": list(args.modes),
                              "max_new_tokens": args.max_new_tokens, "world_size": dist.world_size(),
                              "transcribe": args.transcribe}
        if dist.is_main():
            paths = write_outputs(report, records, args.out)
            gap = "n/a" if report["gap"] is None else f"{report['gap']:.2f}"
            vl = "n/a" if report["vl_score"] is None else f"{report['vl_score']:.2f}"
            va = "n/a" if report["va_score"] is None else f"{report['va_score']:.2f}"
            if args.transcribe:
                wer = " | ".join(f"WER {mode} {100 * value:.2f}%" for mode, value in report.get("wer", {}).items()
                                 if value is not None)
                print(f"{wer} | n {report['n']} -> {', '.join(paths.values())}", flush=True)
            else:
                print(f"VL {vl} | VA {va} | gap {gap} | n {report['n']} -> {', '.join(paths.values())}", flush=True)
            if report.get("benchmarks"):
                print(format_table(report["benchmarks"]), flush=True)
    finally:
        dist.shutdown()


if __name__ == "__main__":
    main()
