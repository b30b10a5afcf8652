"""The run's DeepSpeed config: ds_configs/*.json, checked against the flags that own some of
its values, with every "auto" field filled from them. DeepSpeed settings live in those files
only; the trainer never copies ZeRO settings field by field.

    ds = resolve(config, world_size, on_gpu)     # read + check + fill, ConfigError naming the flag
"""

import json
import os

from trainer.config import Config, ConfigError, DistillConfig, OptimConfig


def resolve(config: Config, world_size: int, on_gpu: bool) -> dict:
    ds = read(config.optim.ds_config)
    check(ds, config.optim, config.distill)
    return fill(ds, config.optim, world_size, on_gpu)


def read(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"--ds_config: {path} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--ds_config: {path} is not valid JSON: {e}") from None


def check(ds: dict, o: OptimConfig, k: DistillConfig) -> None:
    """Values the flags own must be "auto" in the DeepSpeed config, or equal to the flag; and
    the teacher must be possible with its offload settings."""
    if o.max_tokens_per_micro_batch and ds.get("train_micro_batch_size_per_gpu", "auto") not in ("auto", 1):
        raise ConfigError(
            f"--max_tokens_per_micro_batch {o.max_tokens_per_micro_batch}: micro-batches hold a varying number of "
            f"samples, so {o.ds_config} must leave train_micro_batch_size_per_gpu \"auto\" (the trainer sets it to 1: "
            f"DeepSpeed then counts micro-batches), not {ds['train_micro_batch_size_per_gpu']}")
    owned = [
        (ds, "train_micro_batch_size_per_gpu", "micro_batch_size"),
        (ds, "gradient_accumulation_steps", "grad_accum"),
        (ds, "gradient_clipping", "max_grad_norm"),
        (ds.get("optimizer", {}).get("params", {}), "lr", "lr"),
        (ds.get("optimizer", {}).get("params", {}), "weight_decay", "weight_decay"),
        (ds.get("scheduler", {}).get("params", {}), "total_num_steps", "max_steps"),
        (ds.get("scheduler", {}).get("params", {}), "cos_min_ratio", "min_lr_ratio"),
    ]
    for section, key, flag in owned:
        fixed = section.get(key, "auto")
        if fixed != "auto" and fixed != getattr(o, flag):
            raise ConfigError(
                f"--{flag} {getattr(o, flag)} contradicts {o.ds_config}: {key} = {fixed} "
                f"(set it to \"auto\" there, or pass --{flag} {fixed})"
            )
    if "scheduler" not in ds:
        raise ConfigError(f"{o.ds_config} has no scheduler section: --lr/--warmup_steps/--max_steps would be ignored")
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{o.ds_config}: zero_optimization.stage must be 0-3, got {stage}")
    if k.teacher != "shared" and zero.get("offload_param", {}).get("device") == "nvme":
        raise ConfigError(
            f"--teacher {k.teacher} keeps copies of each rank's parameter partitions, which NVMe parameter "
            f"offload ({o.ds_config}) swaps out from under it; use --teacher shared or CPU offload"
        )


def fill(ds: dict, o: OptimConfig, world_size: int, on_gpu: bool) -> dict:
    """Return a copy of the DeepSpeed config with every "auto" field filled from the flags."""
    ds = json.loads(json.dumps(ds))
    # Under a token budget a micro-batch's sample count varies: DeepSpeed's batch fields then
    # count micro-batches (1 per micro-step), which is all it uses them for here (the trainer
    # feeds the engine itself and normalises the loss by the step's answer tokens).
    micro = 1 if o.max_tokens_per_micro_batch else o.micro_batch_size
    fills = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": micro * o.grad_accum * world_size,
        "gradient_clipping": o.max_grad_norm,
    }
    for key, value in fills.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    # bf16 on a GPU, fp32 on the CPU (the CPU's bf16 matmuls are slow and its tests exact).
    bf16 = ds.setdefault("bf16", {"enabled": "auto"})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = on_gpu
    opt = ds.get("optimizer", {}).get("params", {})
    for key, value in (("lr", o.lr), ("weight_decay", o.weight_decay)):
        if opt.get(key) == "auto":
            opt[key] = value
    if opt.get("torch_adam") == "auto":
        # DeepSpeed's FusedAdam is a CUDA kernel; on the CPU torch's AdamW does the job.
        opt["torch_adam"] = not on_gpu
    sched = ds.get("scheduler", {}).get("params", {})
    sched_fills = {
        "total_num_steps": o.max_steps,
        "warmup_num_steps": max(1, o.warmup_steps),
        # DeepSpeed's linear warmup starts at this ratio: 1/(w+1) makes the first step use
        # lr/(w+1) instead of 0, and --warmup_steps 0 mean no warmup at all.
        "warmup_min_ratio": 1.0 / (o.warmup_steps + 1),
        "cos_min_ratio": o.min_lr_ratio,
    }
    for key, value in sched_fills.items():
        if sched.get(key) == "auto":
            sched[key] = value
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"the DeepSpeed config has \"auto\" fields the trainer cannot fill: {', '.join(leftover)}")
    return ds


def _walk(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _walk(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
