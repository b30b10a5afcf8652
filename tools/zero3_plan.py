"""On paper: a Self-KD step of the synthetic presets under ZeRO-3 on N nodes x G GPUs, its
communication against its compute, per micro-batch size, flat and with ZeRO++'s hierarchical
partitioning (hpZ). An estimate to plan with, not a measurement: the figures to trust come from
`launch_scripts/gpu_bench.sh` on the cluster.

    python tools/zero3_plan.py                                   # 4 x 8 H100, the defaults below
    python tools/zero3_plan.py --nodes 4 --gpus 8 --inter_gbps 3200 --nvlink_gbs 450 --mfu 0.4 --json

The model (every number is a flag):
  parameters   the preset's counts on the meta device (trainer.perf.flops_params): LLM decoder,
               LM head, vision tower, Whisper encoder, projector; bf16 weights (2 bytes)
  per sample   bench_step's realistic shapes: 456 student tokens (system prompt, 256 image
               tokens, 3-10 s of speech at 12.5 tokens/s, the answer), 114 teacher tokens
               computed (the prefix-shared teacher), 75 answer tokens, 1,024 image patches,
               325 Whisper frames (6.5 s)
  compute      trainer.perf.step_flops per micro-batch / (peak bf16 x --mfu)
  traffic      per micro-step and GPU, ring collectives moving (W - 1) / W of the tensor: the
               trained parameters gathered for the forward, the teacher's forward and the
               backward, and their gradients reduce-scattered; frozen encoders gathered for the
               forward only (2, 3 and 1 gathers x 2 bytes, + 1 x 2 bytes of reduce-scatter)
  bandwidth    flat: every collective spans all W GPUs, bound by the inter-node links
               (--inter_gbps per node / G per GPU); hpZ: the forward and backward gathers stay
               inside the node (--nvlink_gbs per GPU), only the gradient reduce-scatter crosses
               nodes (ZeRO++ also quantizes it, not counted)
  overlap      none assumed: the step takes compute + communication at worst and the larger of
               the two at best (DeepSpeed's prefetch overlaps the gathers with compute)
A step is communication-bound at a micro-batch when its communication time exceeds its compute
time; `compute_bound_from` is the smallest micro-batch (a power of two up to 64) where it does not.
"""

import argparse
import json

PER_SAMPLE = {"student_tokens": 456, "teacher_tokens": 114, "answer_tokens": 75, "image_patches": 1024,
              "audio_frames": 325, "audio_tokens": 82}
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def preset_params(name: str) -> dict:
    """trainer.perf.flops_params of a synthetic preset, built on the meta device."""
    import torch

    from trainer.config import ModelConfig
    from trainer.models.factory import build_model
    from trainer.perf import flops_params

    with torch.device("meta"):
        model, _ = build_model(ModelConfig(model=name, attn_impl="sdpa"))
    return flops_params(model, model.trainable_parts)


def plan(params: dict, *, nodes: int, gpus: int, inter_gbps: float, nvlink_gbs: float, peak_tflops: float,
         mfu: float, micro_batch: int) -> dict:
    """One row: a micro-step of `micro_batch` samples per GPU (module docstring)."""
    from trainer.perf import step_flops

    world = nodes * gpus
    trained = params["decoder"] + params["lm_head"] + params["projector"]
    frozen = params["vision"] + params["audio"]
    ring = (world - 1) / world
    # bytes each GPU sends (= receives) per micro-step
    gathers = ring * 2 * (3 * trained + frozen)  # forward, teacher forward, backward; frozen: forward only
    reduce = ring * 2 * trained
    flops = step_flops(params, **{k: v * micro_batch for k, v in PER_SAMPLE.items()
                                  if k not in ("teacher_tokens", "answer_tokens")},
                       teacher_tokens=PER_SAMPLE["teacher_tokens"] * micro_batch,
                       answer_tokens=PER_SAMPLE["answer_tokens"] * micro_batch,
                       teacher_answer_tokens=PER_SAMPLE["answer_tokens"] * micro_batch)
    compute_s = flops / (peak_tflops * 1e12 * mfu)
    inter_per_gpu = inter_gbps / 8 / gpus * 1e9  # bytes/s
    flat_s = (gathers + reduce) / inter_per_gpu
    if nodes > 1:
        hpz_s = gathers * (gpus - 1) / gpus / ring / (nvlink_gbs * 1e9) + reduce / inter_per_gpu
    else:
        hpz_s = flat_s = (gathers + reduce) / (nvlink_gbs * 1e9)
    tokens = PER_SAMPLE["student_tokens"] * micro_batch
    row = {"micro_batch": micro_batch, "compute_s": round(compute_s, 4), "traffic_gb": round((gathers + reduce) / 1e9, 2)}
    for name, comm in (("flat", flat_s), ("hpz", hpz_s)):
        row[name] = {"comm_s": round(comm, 4), "bound": "communication" if comm > compute_s else "compute",
                     "step_s_no_overlap": round(comm + compute_s, 4), "step_s_full_overlap": round(max(comm, compute_s), 4),
                     "tokens_per_s_gpu": [round(tokens / (comm + compute_s)), round(tokens / max(comm, compute_s))]}
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="synthetic-2b,synthetic-8b")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--inter_gbps", type=float, default=3200.0, help="inter-node bandwidth per node, Gb/s "
                        "(8 x 400 Gb/s InfiniBand)")
    parser.add_argument("--nvlink_gbs", type=float, default=450.0, help="intra-node bandwidth per GPU, GB/s (H100 "
                        "NVLink 4: 900 GB/s both ways)")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM)")
    parser.add_argument("--mfu", type=float, default=0.4, help="the model-FLOPs utilisation compute reaches")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out = {"assumptions": {k: v for k, v in vars(args).items() if k not in ("presets", "json")},
           "per_sample": PER_SAMPLE, "presets": {}}
    for name in args.presets.split(","):
        params = preset_params(name)
        rows = [plan(params, nodes=args.nodes, gpus=args.gpus, inter_gbps=args.inter_gbps, nvlink_gbs=args.nvlink_gbs,
                     peak_tflops=args.peak_tflops, mfu=args.mfu, micro_batch=mb) for mb in MICRO_BATCHES]
        out["presets"][name] = {
            "params_b": {k: round(v / 1e9, 3) for k, v in params.items() if k != "trains"}, "rows": rows,
            "compute_bound_from": {mode: next((r["micro_batch"] for r in rows if r[mode]["bound"] == "compute"), None)
                                   for mode in ("flat", "hpz")}}
    if args.json:
        print(json.dumps(out))
        return out
    print(f"{args.nodes} x {args.gpus} GPUs, {args.inter_gbps:g} Gb/s between nodes per node, {args.nvlink_gbs:g} GB/s "
          f"NVLink per GPU, {args.peak_tflops:g} TFLOP/s x MFU {args.mfu:g}; per sample {PER_SAMPLE}")
    for name, result in out["presets"].items():
        print(f"\n{name}: {result['params_b']} (billions); compute-bound from micro-batch "
              f"{result['compute_bound_from']['flat']} flat, {result['compute_bound_from']['hpz']} with hpZ")
        print("| micro-batch | compute s | traffic GB/GPU | flat comm s | flat bound | hpZ comm s | hpZ bound | "
              "tokens/s/GPU flat (no / full overlap) | hpZ |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in result["rows"]:
            f, h = r["flat"], r["hpz"]
            print(f"| {r['micro_batch']} | {r['compute_s']} | {r['traffic_gb']} | {f['comm_s']} | {f['bound']} | "
                  f"{h['comm_s']} | {h['bound']} | {f['tokens_per_s_gpu'][0]}-{f['tokens_per_s_gpu'][1]} | "
                  f"{h['tokens_per_s_gpu'][0]}-{h['tokens_per_s_gpu'][1]} |")
    return out


if __name__ == "__main__":
    main()
