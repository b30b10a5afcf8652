"""Resume a ZeRO-3 checkpoint on another number of ranks: a lost node costs a restart, not the run.

What is resharded, and how (`load`, called by the Trainer when the checkpoint's world size is
not this run's):
  engine     model, optimizer (fp32 master weights, Adam moments, step) and LR scheduler through
             DeepSpeed's universal checkpoint: the checkpoint is converted once into
             CKPT/universal/ (`convert`, DeepSpeed's ds_to_universal; also run ahead of the
             job by tools/reshard_checkpoint.py) and loaded with DeepSpeed's `load_universal`.
  frozen     parameters that do not train (DeepSpeed's universal loader leaves them as built):
             each rank's new ZeRO-3 partition is cut from the saved ranks' fragments.
  teacher    the frozen / EMA teacher's per-rank partitions: concatenated over the saved ranks
             and cut again for this rank (`teachers.reshard_state`), bit for bit.
  data       every saved reader slot's rest of the epoch, dealt to the new readers
             (trainer.data.loader.resize_state): the same samples, not the same order.
  loop       step, samples and tokens seen, non-finite steps (global, from rank 0); each rank's
             RNG state is the saved rank's of the same number, or seeded from (seed, step,
             rank) for a rank the saved run did not have.

The global batch (micro-batch x grad_accum x ranks) is kept by default: `plan_batch` sets
--grad_accum to what keeps it and refuses, naming the numbers, when no whole number does;
--allow_batch_change accepts another. The LR schedule counts optimizer steps, so its position
carries over unchanged.

Verified as any checkpoint: the source's manifest first (resolve_resume), then the converted
folder carries its own manifest (COMPLETE, naming the source manifest's CRC-32) written last,
after a conversion into a temporary folder; a folder that does not verify is converted again,
and every rank checks it before DeepSpeed opens a file. Every .pt file is loaded weights-only.
"""

import argparse
import dataclasses
import glob
import json
import os
import random
import shutil
import threading
import time
import zlib

import numpy as np
import torch

from trainer import checkpoint, dist
from trainer.config import Config, ConfigError
from trainer.distill.teachers import reshard_flat

UNIVERSAL = "universal"


def saved_world_size(path: str) -> int:
    """How many ranks wrote the checkpoint (one trainer state file each)."""
    found = glob.glob(os.path.join(path, "trainer_state_rank*.pt"))
    if not found:
        raise checkpoint.CheckpointError(f"{path} has no trainer_state_rank*.pt files")
    return len(found)


def _saved_config(path: str) -> dict:
    with open(os.path.join(path, "run_config.json")) as f:
        return json.load(f)


def plan_batch(c: Config, path: str, saved_world: int, world: int) -> Config:
    """The config to resume the checkpoint at `path` (written by `saved_world` ranks) on `world`
    ranks: --grad_accum set so the optimizer step's global batch stays the saved one, or a
    ConfigError naming the numbers (unless --allow_batch_change)."""
    saved = _saved_config(path)
    by_tokens = bool(c.optim.max_tokens_per_micro_batch)
    if by_tokens != bool(saved.get("max_tokens_per_micro_batch")):
        raise ConfigError(f"{path} was written with --max_tokens_per_micro_batch "
                          f"{saved.get('max_tokens_per_micro_batch', 0)}, this run has "
                          f"{c.optim.max_tokens_per_micro_batch}: resume with the checkpoint's batching")
    unit = "micro-batches" if by_tokens else "samples"
    micro = 1 if by_tokens else c.optim.micro_batch_size
    saved_micro = 1 if by_tokens else saved["micro_batch_size"]
    target = saved_micro * saved["grad_accum"] * saved_world
    mine = micro * c.optim.grad_accum * world
    if mine == target or c.checkpoint.allow_batch_change:
        if mine != target:
            dist.print0(f"resize: global batch {target} -> {mine} {unit} per optimizer step (--allow_batch_change)")
        return c
    grad_accum, left = divmod(target, micro * world)
    if left or grad_accum < 1:
        raise ConfigError(
            f"{path} was written by {saved_world} ranks x {saved_micro} x --grad_accum {saved['grad_accum']} = "
            f"{target} {unit} per optimizer step; on {world} ranks x {micro} no whole --grad_accum gives {target}. "
            "Resume on a world size that divides it, change --micro_batch_size, or pass --allow_batch_change true to "
            "accept another global batch")
    dist.print0(f"resize: {saved_world} -> {world} ranks, --grad_accum {c.optim.grad_accum} -> {grad_accum} keeps "
                f"the global batch of {target} {unit}")
    return dataclasses.replace(c, optim=dataclasses.replace(c.optim, grad_accum=grad_accum))


# --- the engine state: DeepSpeed's universal checkpoint ------------------------------------------
def _source_crc(path: str) -> str:
    with open(os.path.join(path, checkpoint.COMPLETE), "rb") as f:
        return f"{zlib.crc32(f.read()):08x}"


def universal_problem(path: str) -> str | None:
    """None when CKPT/universal is a complete conversion of this checkpoint, else why not."""
    folder = os.path.join(path, UNIVERSAL)
    if not os.path.isfile(os.path.join(folder, checkpoint.COMPLETE)):
        return f"{folder} is not a complete conversion (no {checkpoint.COMPLETE})"
    problem = checkpoint.verify(folder)
    if problem:
        return problem
    manifest = checkpoint.read_manifest(folder)
    if manifest is None or manifest.get("source") != _source_crc(path):
        return f"{folder} was converted from another version of {path}"
    return None


def convert(path: str, workers: int = 1) -> str:
    """Convert the checkpoint's engine state into CKPT/universal (DeepSpeed's ds_to_universal),
    unless a verified conversion is there. Written into a temporary folder, manifest last, then
    renamed: a crash leaves no folder that looks complete. Not collective."""
    from deepspeed.checkpoint import ds_to_universal

    folder = os.path.join(path, UNIVERSAL)
    if universal_problem(path) is None:
        return folder
    source = checkpoint.read_manifest(path)
    if source is None:
        raise checkpoint.CheckpointError(f"{path} was written before checkpoints had a file manifest: resume it on the "
                                         "world size that wrote it")
    optim = glob.glob(os.path.join(path, "*_optim_states.pt"))
    if not optim:
        raise checkpoint.CheckpointError(f"{path} holds no DeepSpeed optimizer states (*_optim_states.pt) to reshard")
    checkpoint.check_safe(checkpoint.torch_files(path))
    with checkpoint.safe_loading():
        stage = torch.load(optim[0], map_location="cpu", weights_only=True, mmap=True)["optimizer_state_dict"]
        stage = int(stage.get("zero_stage", 0))
    if stage != 3:
        raise checkpoint.CheckpointError(
            f"{path} was written under ZeRO stage {stage}: resuming on another world size is supported for ZeRO-3 "
            "checkpoints (ds_configs/zero3*.json); resume it on the world size that wrote it")
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    args = argparse.Namespace(input_folder=path, output_folder=tmp, num_extract_workers=workers,
                              num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                              inject_missing_state=False)
    with checkpoint.safe_loading():
        ds_to_universal.main(args)
    manifest = checkpoint.build_manifest(tmp, source["step"])
    manifest["source"] = _source_crc(path)
    checkpoint._fsync_tree(tmp)
    with open(os.path.join(tmp, checkpoint.COMPLETE), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder)
    stale = os.path.join(path, "latest_universal")  # ds_to_universal's pointer, to the temporary name
    if os.path.isfile(stale):
        os.remove(stale)
    return folder


HEARTBEAT_S = 30.0  # rank 0 touches CKPT/universal.heartbeat this often while it converts
STALE_S = 300.0  # a heartbeat older than this: rank 0 stopped (killed, its node lost)


def _touch(path: str) -> None:
    with open(path, "a"):
        os.utime(path)


def wait_for_conversion(path: str, kick=lambda: None, poll_s: float = 2.0, stale_s: float = STALE_S) -> None:
    """A rank other than 0: wait until rank 0's conversion is complete or has failed, calling
    `kick` while rank 0's heartbeat is fresh; a heartbeat older than `stale_s` raises (rank 0
    died mid-conversion: waiting on would hang, as the watchdog is kicked here)."""
    done = os.path.join(path, UNIVERSAL, checkpoint.COMPLETE)
    failure, heartbeat = (os.path.join(path, UNIVERSAL + suffix) for suffix in (".failed", ".heartbeat"))
    while not (os.path.exists(done) or os.path.exists(failure)):
        try:
            age = time.time() - os.path.getmtime(heartbeat)
        except OSError:
            age = float("inf")
        if age > stale_s:
            raise checkpoint.CheckpointError(
                f"rank 0 stopped converting {path} ({heartbeat} is {age:.0f} s old, or missing): run "
                "tools/reshard_checkpoint.py on it, then resume")
        kick()
        time.sleep(poll_s)


def prepare(path: str, kick=lambda: None, poll_s: float = 2.0) -> str:
    """Collective: rank 0 converts (or reuses a verified conversion) while the other ranks wait
    on the file system, not in a collective (a conversion can outlast --dist_timeout_s): every
    rank calls `kick` (the hang watchdog's) meanwhile, the others only while rank 0's heartbeat
    file is fresh. Then every rank verifies the folder; any failure is raised on every rank."""
    failure, heartbeat = (os.path.join(path, UNIVERSAL + suffix) for suffix in (".failed", ".heartbeat"))
    if dist.is_main():
        if os.path.exists(failure):
            os.remove(failure)  # a previous attempt's
        _touch(heartbeat)
    dist.barrier()
    error = None
    if dist.is_main():
        stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_S):
                _touch(heartbeat)
                kick()

        beating = threading.Thread(target=beat, daemon=True)
        beating.start()
        try:
            convert(path)
        except Exception as exc:  # noqa: BLE001 - told to every rank through the marker, then raised
            error = exc
            with open(failure, "w") as f:
                f.write(f"{type(exc).__name__}: {exc}")
        finally:
            stop.set()
            beating.join()
    else:
        wait_for_conversion(path, kick, poll_s)
    kick()
    problem = None
    try:
        problem = universal_problem(path) if error is None else f"{type(error).__name__}: {error}"
    except OSError as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem is None and os.path.exists(failure):
        with open(failure) as f:
            problem = f"the conversion failed on rank 0: {f.read()}"
    failed = dist.all_reduce_max(torch.tensor([float(problem is not None)])).item() > 0
    if error is not None:
        raise error
    if failed:
        raise checkpoint.CheckpointError(f"cannot reshard {path}: {problem or 'it does not verify on another rank'}")
    return os.path.join(path, UNIVERSAL)


# --- loading -------------------------------------------------------------------------------------
def _load_frozen(engine, path: str, saved_world: int) -> int:
    """Cut every non-trained parameter's partition for this rank from the saved ranks'
    fragments; returns how many parameters were restored."""
    from deepspeed.checkpoint.constants import FROZEN_PARAM_FRAGMENTS

    files = [os.path.join(path, f"zero_pp_rank_{r}_mp_rank_00_model_states.pt") for r in range(saved_world)]
    with checkpoint.safe_loading():
        fragments = [torch.load(f, map_location="cpu", weights_only=True, mmap=True).get(FROZEN_PARAM_FRAGMENTS) or {}
                     for f in files]
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    restored = 0
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            if param.requires_grad or not hasattr(param, "ds_tensor") or name not in fragments[0]:
                continue
            parts = [f[name] for f in fragments]
            local = param.ds_tensor
            local.data.copy_(reshard_flat(parts, param.ds_numel, local, dist.rank()).to(local.device))
            if param.ds_status == ZeroParamStatus.AVAILABLE:  # persistent: the whole tensor stays gathered
                whole = torch.cat([p.reshape(-1) for p in parts])[:param.ds_numel]
                param.data.copy_(whole.view(param.ds_shape).to(param.device, param.dtype))
            restored += 1
    return restored


def data_state(path: str, saved_world: int, num_workers: int) -> dict:
    """This rank's data-loader state from every saved rank's, for this run's ranks and workers."""
    from trainer.data.loader import resize_state

    files = [os.path.join(path, f"trainer_state_rank{r}.pt") for r in range(saved_world)]
    checkpoint.check_safe(files)
    saved = [torch.load(f, map_location="cpu", weights_only=True, mmap=True)["data"] for f in files]
    return resize_state(saved, rank=dist.rank(), world_size=dist.world_size(), num_workers=num_workers)


def load(engine, path: str, saved_world: int, teacher, *, seed: int, num_workers: int) -> dict:
    """Load a checkpoint written by `saved_world` ranks into this run's engine (collective;
    `prepare` first) and return this rank's trainer state, resharded."""
    from trainer.data.loader import resize_state
    from trainer.distill.teachers import reshard_state

    folder = os.path.join(path, UNIVERSAL)
    checkpoint.check_safe(sorted(glob.glob(os.path.join(folder, "**", "*.pt"), recursive=True)))
    states_files = [os.path.join(path, f"trainer_state_rank{r}.pt") for r in range(saved_world)]
    checkpoint.check_safe(states_files + checkpoint.torch_files(path))
    with checkpoint.safe_loading(), checkpoint._model_names_prefixed(engine):
        load_path, _ = engine.load_checkpoint(path, tag=UNIVERSAL, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise checkpoint.CheckpointError(f"DeepSpeed could not load the universal checkpoint {folder}")
    frozen = _load_frozen(engine, path, saved_world)
    saved = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in states_files]
    rank, world = dist.rank(), dist.world_size()
    state = {key: saved[0][key] for key in ("step", "samples_seen", "tokens_seen")}
    state["nonfinite_steps"] = saved[0].get("nonfinite_steps", 0)
    state["world_size"] = world
    state["data"] = resize_state([s["data"] for s in saved], rank=rank, world_size=world, num_workers=num_workers)
    state["teacher"] = reshard_state([s["teacher"] for s in saved], teacher, rank)
    if rank < saved_world:
        state["rng"] = saved[rank]["rng"]
    else:
        fresh = (seed * 1_000_003 + state["step"] * 1_009 + rank) % 2**31
        random.seed(fresh)
        np.random.seed(fresh)
        torch.manual_seed(fresh)
        state["rng"] = checkpoint.rng_state()
    dist.print0(f"resize: resumed {path} (written by {saved_world} ranks) on {world}: engine state through "
                f"{folder}, {frozen} frozen parameters and the {teacher.kind} teacher resharded, the data's "
                "rest of the epoch dealt to the new readers")
    return state


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Convert a checkpoint for resuming on another number of ranks (what --resume does by itself "
                    "on first use; run it ahead, with more workers, for a large model).")
    parser.add_argument("checkpoint", help="a complete checkpoint directory, such as SAVE_DIR/step_00001000")
    parser.add_argument("--workers", type=int, default=4, help="processes extracting the ZeRO partitions")
    args = parser.parse_args(argv)
    problem = checkpoint.verify(args.checkpoint) if os.path.isfile(
        os.path.join(args.checkpoint, checkpoint.COMPLETE)) else f"no {checkpoint.COMPLETE} marker"
    if problem:
        raise SystemExit(f"{args.checkpoint}: {problem}")
    print(f"converted: {convert(args.checkpoint, args.workers)}")
