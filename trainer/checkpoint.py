"""Checkpoints that resume exactly, survive a crash at any moment, and never run code.

Layout of one checkpoint, `SAVE_DIR/step_00001000/`:
  DeepSpeed's partitioned engine state (model, optimizer, scheduler), one file per rank
  trainer_state_rank{R}.pt   loop state, this rank's data-loader position, RNG states
  run_config.json            the resolved config
  omni_spec.json             the model's architecture (what tools/export_hf.py builds from)
  processor/                 tokenizer, image processor, Whisper feature extractor
  COMPLETE                   the manifest, written last by rank 0 once every rank's files are
                             on disk (fsynced): {"step", "files": {path: {"size", "crc32"}}},
                             a CRC-32 for every file up to CRC_MAX_BYTES, sizes for all

Resume: `--resume auto` takes the newest directory with COMPLETE whose files match the
manifest; a checkpoint with a missing, truncated or altered file is skipped with a warning
naming the file, and the previous complete one is tried. An explicit `--resume DIR` that
does not match is an error. A crash while saving leaves no COMPLETE: the same fallback.

Safety: every .pt file is loaded with `weights_only=True` -- the trainer state files, and
DeepSpeed's engine files, which DeepSpeed itself would load with `weights_only=False`
(`safe_loading` forces it, with DeepSpeed's loss-scaler and ZeRO-stage classes as the only
objects allowed besides tensors and plain containers). A file holding anything else is
refused before DeepSpeed opens it, naming the file; no code from a checkpoint ever runs.
"""

import contextlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import zlib

import numpy as np
import torch

from trainer import dist

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
MANIFEST_FORMAT = 1
CRC_MAX_BYTES = 64 << 20  # files up to this size get a CRC-32 in the manifest (reading them back is cheap)
_TAG = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that must not be loaded: the message names the directory and the file."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(save_dir: str) -> list:
    """Directories with a COMPLETE marker, oldest first (not yet verified: see `verify`)."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        match = _TAG.match(name)
        if match and os.path.isfile(os.path.join(save_dir, name, COMPLETE)):
            found.append((int(match.group(1)), os.path.join(save_dir, name)))
    return [path for _, path in sorted(found)]


# --- manifest -------------------------------------------------------------------------------
def _crc32(path: str) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _files(path: str) -> list:
    """Every regular file under the checkpoint directory, relative, sorted (COMPLETE excluded)."""
    found = []
    for root, _, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), path)
            if rel not in (COMPLETE, COMPLETE + ".tmp"):
                found.append(rel)
    return sorted(found)


def build_manifest(path: str, step: int) -> dict:
    files = {}
    for rel in _files(path):
        full = os.path.join(path, rel)
        entry = {"size": os.path.getsize(full)}
        if entry["size"] <= CRC_MAX_BYTES:
            entry["crc32"] = _crc32(full)
        files[rel] = entry
    return {"format": MANIFEST_FORMAT, "step": step, "files": files}


def read_manifest(path: str) -> dict | None:
    """The COMPLETE manifest, or None for a checkpoint written before manifests existed."""
    with open(os.path.join(path, COMPLETE)) as f:
        text = f.read()
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError:
        manifest = None
    if isinstance(manifest, dict) and "files" in manifest:
        return manifest
    if text.strip().isdigit():
        return None  # a bare step number: the old format
    raise CheckpointError(f"{os.path.join(path, COMPLETE)} is not a manifest (cut short or overwritten)")


def verify(path: str) -> str | None:
    """None when every file of the manifest is present with its size (and CRC-32), else what
    is wrong, naming the first bad file."""
    try:
        manifest = read_manifest(path)
    except (OSError, CheckpointError) as exc:
        return str(exc)
    if manifest is None:
        log.warning("%s has no file manifest (written by an older version): loading it unverified", path)
        return None
    for rel, entry in manifest["files"].items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{full} is missing"
        size = os.path.getsize(full)
        if size != entry["size"]:
            return f"{full} has {size} bytes, the manifest says {entry['size']}"
        if "crc32" in entry and _crc32(full) != entry["crc32"]:
            return f"{full} does not match its CRC-32 in the manifest (altered or corrupt)"
    return None


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    for rel in _files(path):
        _fsync(os.path.join(path, rel))
    for root, dirs, _ in os.walk(path):
        for name in dirs:
            _fsync(os.path.join(root, name))
    _fsync(path)


# --- resume -----------------------------------------------------------------------------------
def resolve_resume(resume: str | None, save_dir: str | None) -> str | None:
    """The checkpoint directory to resume from, or None to start fresh (collective: every
    rank verifies, and a checkpoint is used only when it verifies on every rank)."""
    if resume is None:
        return None
    if resume != "auto":
        problem = _agreed_problem(resume if os.path.isfile(os.path.join(resume, COMPLETE)) else None)
        if problem:
            raise CheckpointError(f"--resume {resume}: {problem}")
        return resume
    for path in reversed(complete_checkpoints(save_dir)):
        problem = _agreed_problem(path)
        if problem is None:
            return path
        if dist.is_main():
            print(f"WARNING: --resume auto: skipping {path}: {problem}; trying the previous complete checkpoint",
                  flush=True)
    return None


def _agreed_problem(path: str | None) -> str | None:
    problem = f"not a complete checkpoint (no {COMPLETE} marker)" if path is None else verify(path)
    bad_anywhere = dist.all_reduce_max(torch.tensor([float(problem is not None)])).item() > 0
    if bad_anywhere and problem is None:
        problem = "its files do not verify on another rank (see that rank's log)"
    return problem if bad_anywhere else None


# --- safe loading ----------------------------------------------------------------------------
def _deepspeed_safe_globals() -> list:
    """The only non-tensor objects DeepSpeed's engine files hold (ZeRO 1-3, fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, DynamicLossScaler, ZeroStageEnum]


@contextlib.contextmanager
def safe_loading():
    """Every torch.load inside runs with weights_only=True, even where the caller (DeepSpeed's
    checkpoint engine, zero_to_fp32) asks for weights_only=False."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def check_safe(files: list) -> None:
    """Unpickle each file's metadata (tensors stay memory-mapped) with the weights-only
    unpickler; raise CheckpointError naming the first file that holds anything else."""
    with safe_loading():
        for path in files:
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as exc:
                reason = str(exc).strip().splitlines()
                detail = next((line for line in reason if "Unsupported" in line or "global" in line), reason[0])
                raise CheckpointError(f"refusing to load {path}: it holds an object that is not a tensor or plain "
                                      f"data, which could run code when loaded ({detail.strip()})") from None
            except Exception as exc:  # noqa: BLE001 - a corrupt zip, a cut file: name it
                raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None


def torch_files(path: str) -> list:
    """Every .pt file of a checkpoint (each rank's DeepSpeed loader reads all ranks' partitions)."""
    return [os.path.join(path, name) for name in sorted(os.listdir(path)) if name.endswith(".pt")]


def rng_state() -> dict:
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, save_dir: str, step: int, trainer_state: dict, run_config: dict, model_spec: dict, processor,
         keep_last: int) -> str:
    """Save on every rank (collective); returns the checkpoint directory. COMPLETE is written
    only after every rank's files are fsynced, and older checkpoints are pruned only after it."""
    tag = tag_for(step)
    path = os.path.join(save_dir, tag)
    if dist.is_main() and os.path.isdir(path):
        shutil.rmtree(path)  # an incomplete leftover of a crashed save, or a checkpoint being replaced
    dist.barrier()
    engine.save_checkpoint(save_dir, tag=tag, save_latest=False)
    torch.save(trainer_state, os.path.join(path, f"trainer_state_rank{dist.rank()}.pt"))
    if dist.is_main():
        with open(os.path.join(path, "run_config.json"), "w") as f:
            json.dump(run_config, f, indent=2)
        with open(os.path.join(path, "omni_spec.json"), "w") as f:
            json.dump(model_spec, f, indent=2)
        processor.save_pretrained(os.path.join(path, "processor"))
    dist.barrier()
    _fsync_tree(path)  # every rank: its own files reach the disk before anyone writes COMPLETE
    dist.barrier()
    if dist.is_main():
        manifest = build_manifest(path, step)
        tmp = os.path.join(path, COMPLETE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(path, COMPLETE))
        _fsync(path)
        for old in complete_checkpoints(save_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


@contextlib.contextmanager
def _model_names_prefixed(engine):
    """Checkpoints written before the engine wrapped the Self-KD objective name the model's
    parameters without MODEL_PREFIX: add it as DeepSpeed reads them, so those runs resume."""
    from deepspeed.checkpoint.constants import FROZEN_PARAM_FRAGMENTS

    from trainer.distill.objective import MODEL_PREFIX

    read = engine.checkpoint_engine.load

    def read_renamed(path, map_location=None):
        state = read(path, map_location=map_location)
        for key in ("module", FROZEN_PARAM_FRAGMENTS):
            named = state.get(key) if isinstance(state, dict) else None
            if isinstance(named, dict) and named and not any(k.startswith(MODEL_PREFIX) for k in named):
                state[key] = {MODEL_PREFIX + k: v for k, v in named.items()}
        return state

    engine.checkpoint_engine.load = read_renamed
    try:
        yield
    finally:
        engine.checkpoint_engine.load = read


def load(engine, path: str) -> dict:
    """Load engine state and return this rank's trainer state (collective)."""
    state_file = os.path.join(path, f"trainer_state_rank{dist.rank()}.pt")
    if not os.path.isfile(state_file):
        raise CheckpointError(
            f"{state_file} is missing: this checkpoint was written by a run with fewer ranks; "
            "exact resume needs the same world size"
        )
    check_safe(torch_files(path))
    save_dir, tag = os.path.split(os.path.normpath(path))
    with safe_loading(), _model_names_prefixed(engine):
        load_path, _ = engine.load_checkpoint(save_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the engine state from {path}")
        return torch.load(state_file, weights_only=True)
