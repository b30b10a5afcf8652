"""Cost of a Self-KD step vs an SFT step, on the same synthetic batches, in one process.

    python tools/bench_step.py --model tiny --steps 8 --json                # CPU, fp32
    python tools/bench_step.py --model synthetic-1.5b --steps 10 --json     # one CUDA GPU, bf16

Runs `--steps` timed optimizer steps (after `--warmup` untimed ones) of SFT (kd alpha 0: no
teacher pass) and of Self-KD (alpha 0.75, shared teacher), each from the same initial
weights with a fresh torch AdamW, and prints one JSON line: median step times and their
ratio (plus minimum times and their ratio, the figure to trust on a busy shared CPU),
peak memory per mode (CUDA allocator peak, with the initial-weights copy kept on the CPU;
null on CPU, where the process's peak RSS only grows and cannot be split by mode), student
tokens per second of the KD step and, on a known GPU, model FLOPs utilisation. No weights are
downloaded: `tiny` is the test preset; `synthetic-1.5b` is a random-init Qwen2-VL with
Qwen2-VL-2B's dimensions (Qwen2-1.5B text model, 675M ViT) plus a whisper-small-sized
encoder (30 s window), with images of 336x336 px (144 tokens) and 4-10 s of audio.
Batches come from trainer.models.synthetic: raw samples through the trainer's own sample
encoder and collator (no shards needed); each step runs the trainer's SelfKDObjective.

Single process, no DeepSpeed: under ZeRO-3 the teacher pass also all-gathers every layer's
parameters once more (and frozen/EMA teachers swap partitions), which this does not measure.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import Qwen2VLConfig, WhisperConfig, WhisperFeatureExtractor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from trainer.distill.loss import KDSettings
from trainer.distill.objective import SelfKDObjective
from trainer.models.build import build_from_configs, build_tiny, enable_gradient_checkpointing
from trainer.models.processing import OmniProcessor
from trainer.models.synthetic import make_batch
from trainer.perf import peak_bf16_flops
from trainer.models.tiny import QWEN2VL_SPECIAL_TOKENS, build_tiny_processor, build_tiny_tokenizer


def synthetic_15b(attn_impl: str, dtype: torch.dtype):
    """Qwen2-VL-2B-shaped VLM + whisper-small-shaped encoder, random weights."""
    processor = OmniProcessor(
        build_tiny_tokenizer(),
        Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=336 * 336),
        WhisperFeatureExtractor(feature_size=80, chunk_length=30),
        audio_stack=4,
    )
    special = {name: QWEN2VL_SPECIAL_TOKENS.index(name) for name in QWEN2VL_SPECIAL_TOKENS}
    vlm_config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1e6,
            tie_word_embeddings=True, eos_token_id=special["<|im_end|>"], pad_token_id=special["<|endoftext|>"],
        ),
        vision_config=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    whisper_config = WhisperConfig(
        num_mel_bins=80, d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072,
        decoder_layers=1, decoder_attention_heads=12, decoder_ffn_dim=3072, max_source_positions=1500,
        vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
    )
    model = build_from_configs(vlm_config, whisper_config, processor, dtype=dtype, attn_impl=attn_impl)
    batch_kwargs = dict(image_size=(336, 336), audio_seconds=(4.0, 10.0))
    return model, processor, batch_kwargs


def peak_memory_gib(device) -> float | None:
    """CUDA allocator peak since the last reset; None on CPU (ru_maxrss never resets)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def run_mode(model, initial_state, batches, kd, chunk_size, warmup, device):
    """Timed optimizer steps of one mode from the initial weights -> (step times, peak)."""
    model.load_state_dict(initial_state)
    objective = SelfKDObjective(model, kd, chunk_size=chunk_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        out = objective(batch, normalizer=float(batch.answer_tokens()))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = peak_memory_gib(device)
    del optimizer
    return times, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "synthetic-1.5b"])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode before timing")
    parser.add_argument("--rounds", type=int, default=2, help="SFT/KD rounds; the last one is reported")
    parser.add_argument("--batch_size", type=int, default=2, help="samples per micro-batch")
    parser.add_argument("--chunk_size", type=int, default=1024, help="answer tokens per LM-head chunk")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="checkpoint the LLM's layers")
    parser.add_argument("--attn_impl", default="auto")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with device:  # random init directly on the device
        if args.model == "tiny":
            processor = build_tiny_processor()
            model = build_tiny(processor, dtype=dtype, attn_impl=args.attn_impl)
            batch_kwargs = {}
        else:
            model, processor, batch_kwargs = synthetic_15b(args.attn_impl, dtype)
    model.to(device).train()
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    # On the CPU: a GPU copy would sit in both modes' peak memory and pull mem_ratio towards 1.
    initial_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    batches = [
        make_batch(processor, args.batch_size, seed=i, **batch_kwargs).to(device, dtype)
        for i in range(args.warmup + args.steps)
    ]

    sft = KDSettings(alpha=0.0)
    kd = KDSettings(alpha=0.75, temperature=1.0, divergence="fkl")
    # Alternate the modes for --rounds rounds and keep the last: the first round also pays
    # for clock ramp-up, kernel autotuning and allocator growth.
    for _ in range(args.rounds):
        sft_times, sft_peak = run_mode(model, initial_state, batches, sft, args.chunk_size, args.warmup, device)
        kd_times, kd_peak = run_mode(model, initial_state, batches, kd, args.chunk_size, args.warmup, device)

    timed = batches[args.warmup:]
    student_tokens = statistics.mean(float(b.student_attention_mask.sum()) for b in timed)
    teacher_tokens = statistics.mean(float(b.teacher_attention_mask.sum()) for b in timed)
    sft_s, kd_s = statistics.median(sft_times), statistics.median(kd_times)
    llm_params = sum(p.numel() for p in model.adapter.language_model.parameters())
    peak = peak_bf16_flops(device)
    # LLM FLOPs only (6N per trained token, 2N per teacher token; encoders and attention ignored).
    kd_flops = llm_params * (6 * student_tokens + 2 * teacher_tokens)
    result = dict(
        model=args.model,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        dtype=str(dtype).replace("torch.", ""),
        attn_impl=model.vlm.config.text_config._attn_implementation,
        gradient_checkpointing=args.gradient_checkpointing,
        batch_size=args.batch_size,
        student_tokens=student_tokens,
        teacher_tokens=teacher_tokens,
        sft_step_s=round(sft_s, 4),
        kd_step_s=round(kd_s, 4),
        ratio=round(kd_s / sft_s, 3),
        # Minimum step times: robust to other processes stealing a shared CPU.
        sft_step_min_s=round(min(sft_times), 4),
        kd_step_min_s=round(min(kd_times), 4),
        ratio_min=round(min(kd_times) / min(sft_times), 3),
        sft_peak_mem_gib=round(sft_peak, 3) if sft_peak is not None else None,
        kd_peak_mem_gib=round(kd_peak, 3) if kd_peak is not None else None,
        mem_ratio=round(kd_peak / sft_peak, 3) if sft_peak is not None else None,
        tokens_per_s=round(student_tokens / kd_s, 1),
        mfu=round(kd_flops / kd_s / peak, 4) if peak else None,
    )
    if not args.json:
        print(f"SFT steps (s): {[round(t, 4) for t in sft_times]}\nKD steps (s): {[round(t, 4) for t in kd_times]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
