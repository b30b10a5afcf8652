"""Where does the model look? Per layer, the share of attention from the question's
tokens (typed: its text tokens; spoken: its audio tokens) to the image tokens, and from
the answer tokens to the image and to the question tokens, averaged over heads and
samples, with the reference answer teacher-forced. Typed vs spoken, and with --compare
a second model (e.g. before vs after Self-KD).

Run (single process; the language model runs eager attention so the weights exist):
  python tools/attention_analysis.py --model runs/sft/export --compare runs/selfkd/export \
      --shards 'demo_out/data/shards/heldout/shard-{000000..000000}.tar' --out runs/attention --limit 100
Writes OUT/attention.json ({"models": {label: {"dir", "n", "shares": {"typed"|"spoken":
{"query->key": [per layer]}}}}}, label "model", or the two --labels with --compare) and
OUT/<query>_to_<key>.png for question->image, answer->image and answer->question.
"""

import argparse
import json
import os

import torch

from trainer import dist
from trainer.eval.attention import SHARE_PAIRS, model_attention
from trainer.eval.plots import plot_attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def plot_all(results: dict, out_dir: str) -> list[str]:
    paths = []
    for query, key in SHARE_PAIRS:
        name = f"{query}->{key}"
        curves = {}
        for label, result in results.items():
            for mode_name, shares in result["shares"].items():
                prefix = f"{label} " if len(results) > 1 else ""
                curves[f"{prefix}{mode_name}"] = shares[name]
        path = os.path.join(out_dir, f"{query}_to_{key}.png")
        plot_attention(curves, path, f"attention share {query} -> {key}")
        paths.append(path)
    return paths


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="exported omni model directory")
    parser.add_argument("--compare", default=None, help="a second exported model (e.g. after Self-KD)")
    parser.add_argument("--shards", required=True, help="evaluation shards (brace specs separated by spaces)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--limit", type=int, default=100, help="samples to average over")
    parser.add_argument("--max_seq_len", type=int, default=4096)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--labels", default="before,after", help="names of --model and --compare in plots")
    args = parser.parse_args(argv)
    device = dist.device()
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    models = [args.model] + ([args.compare] if args.compare else [])
    labels = args.labels.split(",") if args.compare else ["model"]
    if len(labels) != len(models):
        parser.error(f"--labels needs two comma-separated names with --compare, got {args.labels!r}")
    results = {label: model_attention(d, args.shards, limit=args.limit, max_seq_len=args.max_seq_len, dtype=dtype,
                              device=device) for label, d in zip(labels, models)}
    os.makedirs(args.out, exist_ok=True)
    report = {"shards": args.shards, "pairs": [f"{q}->{k}" for q, k in SHARE_PAIRS], "models": results}
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump(report, f, indent=2)
    for path in plot_all(results, args.out):
        print(path)
    return report


if __name__ == "__main__":
    main()
