"""Throughput accounting, shared by the trainer's perf/mfu and tools/bench_step.py: the FLOPs a
step must do, and the hardware's peak.

Model FLOPs per step (attention's quadratic term left out, as in the usual 6N rule):
  LLM decoder   6 N per trained (student) token (4 N under LoRA: the frozen weights get no
                gradient, the adapters' own FLOPs are left out), 2 N per teacher token actually computed
  LM head       6 H V per student answer token, 2 H V per teacher answer token (the head runs on
                answer positions only)
  vision tower  2 N per image patch when frozen, 6 N when trained
  audio encoder 2 N per valid encoder frame (50 per second of speech) when frozen, 6 N when
                trained; the projector likewise per audio token
Padding (the rest of Whisper's 30 s window, padded sequence positions) is work the hardware
does but the step does not need: it counts against MFU.
"""

import torch

# Dense bf16 tensor-core peaks. Unknown devices report no MFU rather than a guess.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                   "A10G": 125e12}


def peak_bf16_flops(device=None) -> float:
    """Peak dense bf16 FLOP/s of a CUDA device, or None (CPU, unknown card)."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_params(model, trainable_parts) -> dict:
    """Parameter counts behind step_flops (whole counts under ZeRO-3), and which parts train."""
    def count(module):
        return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())

    def numel(param):
        return getattr(param, "ds_numel", param.numel())

    adapter = model.adapter
    parts = model.parts()
    projector = sum(count(m) for m in parts["projector"])
    audio = sum(count(m) for m in parts["audio"]) - (projector if model.native else 0)  # a native tower holds its projector
    return {
        "decoder": count(adapter.language_model) - numel(adapter.input_embeddings().weight),  # a lookup, no FLOPs
        "lm_head": numel(adapter.lm_head.weight),  # H x V, tied to the embeddings or not
        "vision": count(adapter.vision_tower),
        "audio": audio,
        "projector": projector,
        "trains": {"vision": "vision" in trainable_parts, "audio": "audio" in trainable_parts,
                   "projector": "projector" in trainable_parts,
                   # under LoRA the LLM's weights are frozen: no weight-gradient matmuls (adapters: negligible)
                   "llm": "llm" in trainable_parts and not getattr(model, "lora", None)},
    }


def step_flops(params: dict, *, student_tokens: float, teacher_tokens: float, answer_tokens: float,
               teacher_answer_tokens: float, image_patches: float, audio_frames: float, audio_tokens: float) -> float:
    """The FLOPs one step must do (module docstring), from counts summed over ranks."""
    def encoder(n, inputs, trains):
        return (6 if trains else 2) * n * inputs

    trains = params["trains"]
    llm = 6 if trains.get("llm", True) else 4  # frozen LLM weights (LoRA): forward + activation gradients only
    return (llm * params["decoder"] * student_tokens + 2 * params["decoder"] * teacher_tokens
            + llm * params["lm_head"] * answer_tokens + 2 * params["lm_head"] * teacher_answer_tokens
            + encoder(params["vision"], image_patches, trains["vision"])
            + encoder(params["audio"], audio_frames, trains["audio"])
            + encoder(params["projector"], audio_tokens, trains["projector"]))
