"""Hardware figures for throughput reporting (the trainer's perf/mfu and tools/bench_step.py)."""

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
