"""What a composed model's audio tokens lose or keep when Whisper reads the clip instead of the
30 s window: for each clip of some shards, its audio tokens (Whisper, then the projector) encoded
alone on the window and alone on the clip (whisper_input "window" vs "clip"), compared token by
token (relative L2 difference and cosine similarity), and how much the clip's tokens move when
it shares a batch with a longer clip.

    python tools/whisper_features.py --model docs/results/selfkd_vs_sft/start \\
        --shards 'data/shards/heldout/shard-{000000..000000}.tar' --limit 64 --json
"""

import argparse
import json
import statistics

import torch

from trainer.data import build_eval_loader
from trainer.models.serialize import load_omni


@torch.no_grad()
def tokens(model, batch, mode: str) -> list[torch.Tensor]:
    """Each sample's audio tokens (count_i, H) with Whisper reading `mode`."""
    model.whisper_input = mode
    flat, _ = model.encode_audio(batch)
    return list(flat.split(batch.audio_token_counts.tolist()))


def compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(relative L2 difference ||a - b|| / ||a||, mean cosine similarity per token)."""
    rel = float((a - b).norm() / a.norm().clamp_min(1e-12))
    cos = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
    return rel, cos


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"mean": round(statistics.fmean(values), 4), "p50": round(ordered[len(ordered) // 2], 4),
            "max": round(ordered[-1], 4)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a composed export (tools/export_hf.py)")
    parser.add_argument("--shards", required=True)
    parser.add_argument("--limit", type=int, default=64, help="clips compared")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    model, processor = load_omni(args.model)
    if model.native:
        parser.error("--model: a native family encodes its clips' valid frames already")
    model.eval()
    rows = {"window_vs_clip_rel": [], "window_vs_clip_cos": [], "batched_vs_alone_rel": [], "seconds": []}
    alone_batches = build_eval_loader(args.shards, processor, micro_batch_size=1, max_seq_len=4096, rank=0,
                                      world_size=1)
    clips = []
    for batch in alone_batches:
        window, clip = tokens(model, batch, "window")[0], tokens(model, batch, "clip")[0]
        rel, cos = compare(window, clip)
        rows["window_vs_clip_rel"].append(rel)
        rows["window_vs_clip_cos"].append(cos)
        rows["seconds"].append(float(batch.audio_frames[0]) / 100)
        clips.append((batch, clip))
        if len(clips) == args.limit:
            break
    # The same clips in pairs: the shorter one is encoded up to the longer one's length.
    paired = build_eval_loader(args.shards, processor, micro_batch_size=2, max_seq_len=4096, rank=0, world_size=1)
    seen = 0
    alone = {b.keys[0]: t for b, t in clips}
    for batch in paired:
        for key, together in zip(batch.keys, tokens(model, batch, "clip")):
            if key in alone:
                rows["batched_vs_alone_rel"].append(compare(alone[key], together)[0])
        seen += len(batch.keys)
        if seen >= len(clips):
            break
    report = {"model": args.model, "clips": len(clips), "seconds": summary(rows["seconds"]),
              "window_vs_clip_rel": summary(rows["window_vs_clip_rel"]),
              "window_vs_clip_cos": summary(rows["window_vs_clip_cos"]),
              "batched_vs_alone_rel": summary(rows["batched_vs_alone_rel"])}
    print(json.dumps(report) if args.json else json.dumps(report, indent=2), flush=True)
    return report


if __name__ == "__main__":
    main()
