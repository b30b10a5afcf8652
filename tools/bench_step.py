"""Cost of a Self-KD step vs an SFT step, measured on the path users run: trainer/main.py's
Trainer (the DeepSpeed engine from --ds_config, the real shard loader and collator, the
objective with its teacher and chunked loss, the loop's reductions and optimizer step).

    python tools/bench_step.py --model tiny --json                          # 1 process, CPU or GPU
    deepspeed --num_gpus 2 tools/bench_step.py --model tiny --json          # 2 ranks (DeepSpeed path only)
    python tools/bench_step.py --model synthetic-2b --micro_batch_size 8 --json
    python tools/bench_step.py --model synthetic-8b --gradient_checkpointing --engine deepspeed --json
    python tools/bench_step.py --model synthetic-2b --teacher frozen --lora_r 0,16 --engine deepspeed  # copy vs adapters-off
    python tools/bench_step.py --model overhead-2b --micro_batch_size 8 --whisper_input window,clip   # framework overhead
    python tools/bench_step.py --model tiny --engine deepspeed --on_policy_tokens 16 --json          # on-policy cost
    (launch_scripts/gpu_bench.sh runs the set docs/performance.md reports)

It writes synthetic shards (random images, noise speech, random text at a realistic shape:
448x448 images, 3-10 s of speech, 15-40-token questions and 30-120-token answers for the
synthetic-* presets; small ones for tiny) to a temporary directory, builds the Trainer on
them, and alternates SFT (no teacher pass) and Self-KD (alpha 0.75, shared teacher) on the
same engine for --rounds rounds of --warmup + --steps optimizer steps, reporting the last
round. One extra Self-KD step runs under torch.profiler for the breakdown and the host syncs.
`--engine none` is the reference beside it: the same objective and batches in a plain
PyTorch loop (no DeepSpeed, torch AdamW), single process.

One JSON line per engine. Keys: model, engine (deepspeed-zero{stage} | none), device, dtype,
world_size, micro_batch_size, gradient_checkpointing, student_tokens / teacher_tokens (per
step, all ranks; teacher tokens actually computed), sft_step_s / kd_step_s (medians),
their min and spread, ratio, sft_peak_mem_gib / kd_peak_mem_gib / mem_ratio (CUDA allocator
peak per mode; null on the CPU), tokens_per_s (student tokens of the Self-KD step per second
and GPU), mfu (trainer/perf.py's count: 6N per trained LLM token, 2N per teacher token
computed, 2N or 6N per encoder input; null where the peak is unknown), breakdown (seconds
per phase of the profiled Self-KD step: data_wait, vision, audio, teacher, student_forward,
loss_lm_head, backward, optimizer, reduce, host_blocked), host_syncs_per_step (in that step:
on a GPU the operations that made the host wait for the device, counted by
torch.cuda.set_sync_debug_mode; on the CPU the reads of tensor values, aten::_local_scalar_dense,
outside the ranges where the step reads its CPU batch on purpose: objective/host_prep, step/stats),
lora_r, teacher (the Self-KD step's: --teacher), trained_params, teacher_resident_mib (the
teacher's own weights on this rank: a frozen or EMA copy of what trains; 0 for the shared
teacher and for the frozen teacher under LoRA, the adapters-off model). `--lora_r 0,8` benches
each rank in turn in this one process, so their step times compare; whisper_input (likewise a
comma list: --whisper_input window,clip); ds_config (likewise a comma list, the plain loop's null);
overhead_s (on each DeepSpeed report when both engines ran: its Self-KD step minus the plain loop's on
the same batches, the framework's own time),
fetches_per_step (ZeRO-3: modules fetched, all-gathers issued, parameters gathered in one Self-KD
step; null under ZeRO-1/2), on_policy (with --on_policy_tokens N, DeepSpeed path: steps whose every
micro-batch is on-policy, the student sampling up to N tokens first: step_s, generate_frac, the
share of the step spent generating, gen_length and their fetches_per_step; else null). The
overhead-2b / overhead-8b presets have synthetic-2b's / -8b's module structure at tiny widths and
a 1k vocabulary, fed tiny inputs: their step time is mostly per-module overhead.
"""

import argparse
import gc
import io
import json
import os
import statistics
import tarfile
import tempfile
import time

import numpy as np
import torch

from trainer import dist
from trainer.config import load_config
from trainer.distill.loss import KDSettings
from trainer.models.synthetic import raw_sample

KD = KDSettings(alpha=0.75, temperature=1.0, divergence="fkl")
# Phases of the breakdown: the profiler's record_function labels (trainer/loop.py, objective.py).
PHASES = {"data_wait": "step/data", "vision": "objective/vision", "audio": "objective/audio",
          "teacher": "objective/teacher", "student_forward": "objective/student", "loss_lm_head": "objective/loss",
          "backward": "step/backward", "optimizer": "step/optimizer", "reduce": "step/reduce"}
HOST_PREP = ("objective/host_prep", "step/stats")  # where the step reads its CPU batch, by design
HOST_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
SHAPES = {  # image side px, speech seconds, question tokens, answer tokens
    "tiny": dict(image=(56, 84), seconds=(1.0, 4.0), question=(5, 12), answer=(3, 10)),
    "realistic": dict(image=(448, 448), seconds=(3.0, 10.0), question=(15, 40), answer=(30, 120)),
}


def random_text(rng, tokenizer, words: list, n_tokens: int) -> str:
    """Words from the tokenizer's own corpus until the text is `n_tokens` tokens long."""
    text = []
    while len(tokenizer(" ".join(text), add_special_tokens=False)["input_ids"]) < n_tokens:
        text.append(words[int(rng.integers(len(words)))])
    return " ".join(text)


def write_shards(out_dir: str, processor, shape: dict, num_samples: int, seed: int = 0) -> str:
    """Synthetic samples in two WebDataset shards; returns the shard spec."""
    from trainer.models.tiny import _CORPUS

    rng = np.random.default_rng(seed)
    words = [w for w in _CORPUS.split() if w.isalpha()]
    paths = []
    for shard in range(2):
        path = os.path.join(out_dir, f"bench-{shard}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(shard, num_samples, 2):
                question = random_text(rng, processor.tokenizer, words, int(rng.integers(*shape["question"])))
                answer = random_text(rng, processor.tokenizer, words, int(rng.integers(*shape["answer"])))
                sample = raw_sample(f"bench{i:05d}", question, answer, rng, image_size=shape["image"],
                                    audio_seconds=float(rng.uniform(*shape["seconds"])),
                                    sampling_rate=processor.sampling_rate)
                for ext, data in sample.items():
                    if ext.startswith("__"):
                        continue
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return ",".join(paths)


def _summary(times: list) -> dict:
    return dict(median=statistics.median(times), min=min(times), spread=max(times) - min(times))


def _peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def profile_step(step_fn, device) -> tuple[dict, int]:
    """(seconds per phase, host syncs) of one step under torch.profiler. A phase's time is the
    device time of the kernels launched inside its label on a GPU, its wall time on the CPU.
    Host syncs: on a GPU the operations that made the host wait for the device
    (torch.cuda.set_sync_debug_mode's count); on the CPU the reads of tensor values
    (aten::_local_scalar_dense: .item(), int(t), float(t), bool(t)) outside HOST_PREP."""
    import warnings

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with warnings.catch_warnings(record=True) as caught, profile(activities=activities) as prof:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("warn")
        try:
            step_fn()
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize(device)
    # One entry per label: the CPU-side range (on a GPU its device_time_total sums its kernels).
    events = {e.key: e for e in prof.key_averages() if e.device_type == DeviceType.CPU}

    def seconds(label):
        event = events.get(label)
        if event is None:
            return 0.0
        on_device = device.type == "cuda" and label != PHASES["data_wait"]
        return (event.device_time_total if on_device else event.cpu_time_total) / 1e6

    breakdown = {phase: round(seconds(label), 5) for phase, label in PHASES.items()}
    breakdown["host_blocked"] = round(sum(e.cpu_time_total for e in events.values() if e.key.startswith(HOST_WAITS))
                                      / 1e6, 5)
    if device.type == "cuda":
        syncs = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    else:  # reads of the CPU batch made on purpose (HOST_PREP labels) are not device reads on a GPU
        syncs = sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense" and not _inside(e, HOST_PREP))
    return breakdown, syncs


def _inside(event, labels) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in labels:
            return True
        parent = parent.cpu_parent
    return False


def bench_deepspeed(args, spec: str, lora_r: int) -> dict:
    from trainer.loop import Trainer

    flags = ["--model", args.model, "--train_shards", spec, "--ds_config", args.ds,
             "--teacher", args.teacher, "--lora_r", str(lora_r), "--lora_alpha", str(2 * max(lora_r, 1)),
             "--whisper_input", args.whisper,
             "--micro_batch_size", str(args.micro_batch_size), "--grad_accum", "1", "--num_workers", str(args.num_workers),
             "--max_seq_len", "8192", "--max_steps", "1000000", "--warmup_steps", "0", "--lr", "1e-5",
             "--kd_alpha", "0.75", "--gradient_checkpointing", str(args.gradient_checkpointing).lower(),
             "--attn_impl", args.attn_impl, "--dist_timeout_s", "3600"]
    trainer = Trainer(load_config(flags))
    device = trainer.device
    results = {}
    for _ in range(args.rounds):
        for mode, kd in (("sft", None), ("kd", KD)):
            trainer.objective.kd = kd
            for _ in range(args.warmup):
                trainer.train_step()
            _reset_peak(device)
            metrics = [trainer.train_step() for _ in range(args.steps)]
            results[mode] = dict(times=[m["perf/step_s"] for m in metrics], peak=_peak_gib(device), metrics=metrics)
    trainer.objective.kd = KD
    breakdown, syncs = profile_step(trainer.train_step, device)
    fetches = count_fetches(trainer.train_step) if trainer.zero_stage == 3 else None
    on_policy = bench_on_policy(args, trainer) if args.on_policy_tokens else None
    kd_metrics = results["kd"]["metrics"]
    student = statistics.mean(m["perf/student_tokens"] for m in kd_metrics)
    teacher = statistics.mean(m["perf/teacher_tokens_computed"] for m in kd_metrics)
    mfus = [m["perf/mfu"] for m in kd_metrics if "perf/mfu" in m]
    report = _report(args, f"deepspeed-zero{trainer.zero_stage}", device, trainer.dtype, dist.world_size(), results,
                     student, teacher, mfu=statistics.median(mfus) if mfus else None)
    report.update(breakdown=breakdown, host_syncs_per_step=syncs, fetches_per_step=fetches, on_policy=on_policy,
                  **_lora_fields(trainer.model, trainer.objective.teacher, lora_r))
    trainer.close()
    # Let a plain model follow in this process: no ZeRO-3 build context left behind, memory freed.
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    del trainer
    unset_hf_deepspeed_config()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


def bench_on_policy(args, trainer) -> dict:
    """Self-KD steps whose every micro-batch is on-policy (the student samples up to
    --on_policy_tokens tokens first): their median time, the share generation takes, the mean
    answer length and, under ZeRO-3, the parameter fetches of one such step."""
    import dataclasses

    config = trainer.config
    trainer.config = dataclasses.replace(config, distill=dataclasses.replace(
        config.distill, kd_on_policy_fraction=1.0, gen_max_new_tokens=args.on_policy_tokens, gen_temperature=1.0))
    try:
        for _ in range(args.warmup):
            trainer.train_step()
        metrics = [trainer.train_step() for _ in range(args.steps)]
        fetches = count_fetches(trainer.train_step) if trainer.zero_stage == 3 else None
    finally:
        trainer.config = config
    times = _summary([m["perf/step_s"] for m in metrics])
    return dict(max_new_tokens=args.on_policy_tokens, step_s=round(times["median"], 4),
                generate_frac=round(statistics.mean(m["perf/generate_frac"] for m in metrics), 3),
                gen_length=round(statistics.mean(m["train/gen_length"] for m in metrics), 2),
                fetches_per_step=fetches)


def count_fetches(step_fn) -> dict:
    """ZeRO-3's parameter fetches in one Self-KD step: modules whose parameters it fetched
    (PartitionedParameterCoordinator.fetch_sub_module calls, forward and backward), the
    all-gathers it issued for them and the parameters those gathered."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator

    counts = {"modules": 0, "all_gathers": 0, "params_gathered": 0}
    gather_name = "_PartitionedParameterCoordinator__all_gather_params"
    fetch, gather = Coordinator.fetch_sub_module, getattr(Coordinator, gather_name)

    def counted_fetch(self, *args, **kwargs):
        counts["modules"] += 1
        return fetch(self, *args, **kwargs)

    def counted_gather(self, params, *args, **kwargs):
        if params:
            counts["all_gathers"] += 1
            counts["params_gathered"] += len(params)
        return gather(self, params, *args, **kwargs)

    Coordinator.fetch_sub_module = counted_fetch
    setattr(Coordinator, gather_name, counted_gather)
    try:
        step_fn()
    finally:
        Coordinator.fetch_sub_module = fetch
        setattr(Coordinator, gather_name, gather)
    return counts


def _lora_fields(model, teacher, lora_r: int) -> dict:
    """LoRA rank, the Self-KD step's teacher, parameters trained, and the teacher's own weights
    on this rank (a frozen copy's partition vs 0 for the adapters-off model)."""
    numel = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return dict(lora_r=lora_r, teacher=teacher.kind, trained_params=sum(n for n, grad in numel if grad),
                teacher_resident_mib=round(teacher.resident_bytes() / 2**20, 3))


def bench_plain(args, spec: str, lora_r: int) -> dict:
    """The reference: the same objective on the same batches, plain PyTorch, one process."""
    from trainer.config import ModelConfig
    from trainer.data import build_train_loader
    from trainer.distill.objective import SelfKDObjective
    from trainer.loop import batch_stats
    from trainer.models.factory import build_model
    from trainer.perf import flops_params, peak_bf16_flops, step_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:
        model, processor = build_model(ModelConfig(model=args.model, attn_impl=args.attn_impl,
                                                   gradient_checkpointing=args.gradient_checkpointing, lora_r=lora_r,
                                                   lora_alpha=2.0 * max(lora_r, 1), whisper_input=args.whisper),
                                       dtype=dtype)
    model.to(device).train()
    loader = build_train_loader(spec, processor, stage="selfkd", micro_batch_size=args.micro_batch_size,
                                max_seq_len=8192, rank=0, world_size=1, num_workers=args.num_workers, seed=0)
    batches = iter(loader)
    params = flops_params(model, model.trainable_parts)
    peak = peak_bf16_flops(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                  fused=device.type == "cuda")
    results, mfus, tokens = {}, [], {}
    from trainer.distill.teachers import make_teacher

    teacher_of_kd = make_teacher(args.teacher, model, 0.999)
    for _ in range(args.rounds):
        for mode, kd in (("sft", None), ("kd", KD)):
            objective = SelfKDObjective(model, kd)
            objective.teacher = teacher_of_kd
            times, computed = [], []
            for i in range(args.warmup + args.steps):
                if i == args.warmup:
                    _reset_peak(device)
                batch = next(batches)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                out = objective(batch.to(dtype=dtype), float(batch.answer_tokens()))
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                teacher_tokens = out.teacher_tokens
                if i >= args.warmup:
                    elapsed = time.perf_counter() - start
                    times.append(elapsed)
                    _, student_tokens, _, patches, audio_tokens, audio_frames, _ = batch_stats([batch], processor, False)
                    computed.append((student_tokens, teacher_tokens))
                    if peak and mode == "kd":
                        answers = float(batch.answer_tokens())
                        mfus.append(step_flops(params, student_tokens=student_tokens, teacher_tokens=teacher_tokens,
                                               answer_tokens=answers, teacher_answer_tokens=answers,
                                               image_patches=patches, audio_frames=audio_frames,
                                               audio_tokens=audio_tokens) / elapsed / peak)
            results[mode] = dict(times=times, peak=_peak_gib(device))
            tokens[mode] = computed
    student = statistics.mean(s for s, _ in tokens["kd"])
    teacher = statistics.mean(t for _, t in tokens["kd"])
    report = _report(args, "none", device, dtype, 1, results, student, teacher,
                     mfu=statistics.median(mfus) if mfus else None)
    report.update(_lora_fields(model, teacher_of_kd, lora_r))
    return report


def _report(args, engine, device, dtype, world_size, results, student_tokens, teacher_tokens, mfu) -> dict:
    sft, kd = _summary(results["sft"]["times"]), _summary(results["kd"]["times"])
    sft_peak, kd_peak = results["sft"]["peak"], results["kd"]["peak"]
    return dict(
        model=args.model,
        engine=engine,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        dtype=str(dtype).replace("torch.", ""),
        world_size=world_size,
        micro_batch_size=args.micro_batch_size,
        gradient_checkpointing=args.gradient_checkpointing,
        student_tokens=round(student_tokens, 1),
        teacher_tokens=round(teacher_tokens, 1),
        sft_step_s=round(sft["median"], 4),
        kd_step_s=round(kd["median"], 4),
        ratio=round(kd["median"] / sft["median"], 3),
        sft_step_min_s=round(sft["min"], 4),
        kd_step_min_s=round(kd["min"], 4),
        sft_step_spread_s=round(sft["spread"], 4),
        kd_step_spread_s=round(kd["spread"], 4),
        sft_peak_mem_gib=round(sft_peak, 3) if sft_peak is not None else None,
        kd_peak_mem_gib=round(kd_peak, 3) if kd_peak is not None else None,
        mem_ratio=round(kd_peak / sft_peak, 3) if sft_peak else None,
        tokens_per_s=round(student_tokens / kd["median"] / world_size, 1),
        mfu=round(mfu, 4) if mfu is not None else None,
    )


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny",
                        choices=["tiny", "synthetic-2b", "synthetic-8b", "synthetic-qwen3vl-8b", "synthetic-internvl3-8b",
                                 "overhead-2b", "overhead-8b"])
    parser.add_argument("--engine", default="deepspeed,none",
                        help="comma list of deepspeed (the trainer under --ds_config) and none (plain PyTorch)")
    parser.add_argument("--ds_config", default="ds_configs/zero3.json",
                        help="comma list: each DeepSpeed config benched in turn in this one process")
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode before timing")
    parser.add_argument("--rounds", type=int, default=2, help="SFT/KD rounds; the last one is reported")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--attn_impl", default="auto")
    parser.add_argument("--num_workers", type=int, default=2, help="data workers (the real loader)")
    parser.add_argument("--samples", type=int, default=64, help="synthetic samples written (the stream repeats)")
    parser.add_argument("--teacher", default="shared", choices=["shared", "frozen", "ema"],
                        help="the Self-KD step's teacher (with LoRA, frozen = the adapters-off model)")
    parser.add_argument("--lora_r", default="0",
                        help="comma list of LoRA ranks (0 = none, lora_alpha = 2 r), each benched in this process "
                             "after the other: --teacher frozen --lora_r 0,8 sets the frozen copy beside adapters-off")
    parser.add_argument("--whisper_input", default="auto",
                        help="comma list of auto, clip, window (composed models: what Whisper reads), each benched in "
                             "this process: --whisper_input window,clip sets the 30 s window beside the clip")
    parser.add_argument("--on_policy_tokens", type=int, default=0,
                        help="also time on-policy Self-KD steps (DeepSpeed path): every micro-batch's student samples "
                             "up to this many tokens first; 0 = not")
    parser.add_argument("--json", action="store_true", help="print only the JSON lines")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    unknown = set(engines) - {"deepspeed", "none"}
    if unknown:
        parser.error(f"--engine: unknown {sorted(unknown)}")

    from trainer.models.presets import preset_processor
    from trainer.models.tiny import build_tiny_processor

    processor = build_tiny_processor() if args.model == "tiny" else preset_processor(name=args.model)
    shape = SHAPES["realistic" if args.model.startswith("synthetic") else "tiny"]  # overhead-*: tiny inputs
    reports = []
    with tempfile.TemporaryDirectory(prefix="bench_step-") as tmp:
        # Every rank writes its own copy: no shared file system assumed, no rank waits on another.
        spec = write_shards(tmp, processor, shape, args.samples)
        configs = [(lora_r, whisper) for whisper in args.whisper_input.split(",") for lora_r in
                   [int(r) for r in args.lora_r.split(",")]]
        ds_configs = [c.strip() for c in args.ds_config.split(",") if c.strip()]
        for lora_r, whisper in configs:
            args.whisper = whisper
            these = []
            for engine in engines:
                if engine == "none" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
                    if dist.is_main():
                        print("--engine none runs in a single process: skipped under the launcher", flush=True)
                    continue
                for ds_config in ds_configs if engine == "deepspeed" else [None]:
                    args.ds = ds_config
                    report = (bench_deepspeed(args, spec, lora_r) if engine == "deepspeed"
                              else bench_plain(args, spec, lora_r))
                    report.update(whisper_input=whisper, ds_config=ds_config)
                    these.append(report)
            plain = [r for r in these if r["engine"] == "none"]
            if plain:  # the DeepSpeed path's Self-KD step minus the plain loop's, same run and batches
                for report in these:
                    if report["engine"] != "none":
                        report["overhead_s"] = round(report["kd_step_s"] - plain[0]["kd_step_s"], 4)
            for report in these:
                if dist.is_main():
                    print(json.dumps(report), flush=True)
            reports.extend(these)
    if dist.is_main() and not args.json:
        for report in reports:
            print(f"{report['engine']} {report['ds_config'] or ''} lora_r {report['lora_r']}: SFT {report['sft_step_s']} s, Self-KD "
                  f"({report['teacher']} teacher, {report['teacher_resident_mib']} MiB of its own) {report['kd_step_s']} s "
                  f"(x{report['ratio']}), {report['tokens_per_s']} student tokens/s, MFU {report['mfu']}")
    dist.shutdown()
    return reports


if __name__ == "__main__":
    main()
