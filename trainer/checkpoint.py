"""Checkpoints that resume exactly and never leave an unloadable "latest".

Layout of one checkpoint, `SAVE_DIR/step_00001000/`:
  DeepSpeed's partitioned engine state (model, optimizer, scheduler), one file per rank
  trainer_state_rank{R}.pt   loop state, this rank's data-loader position, RNG states
  run_config.json            the resolved config
  omni_spec.json             the model's architecture (what tools/export_hf.py builds from)
  processor/                 tokenizer, image processor, Whisper feature extractor
  COMPLETE                   written last, by rank 0, after every rank has finished

`--resume auto` takes the newest directory that has COMPLETE, so a crash while saving
falls back to the previous checkpoint. Trainer state files hold only tensors, numbers,
strings, lists and dicts, and are read with `torch.load(weights_only=True)`.
"""

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from trainer import dist

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(save_dir: str) -> list:
    """Complete checkpoint directories, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    found = []
    for name in os.listdir(save_dir):
        match = _TAG.match(name)
        if match and os.path.isfile(os.path.join(save_dir, name, COMPLETE)):
            found.append((int(match.group(1)), os.path.join(save_dir, name)))
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str, save_dir: str) -> str:
    """The checkpoint directory to resume from, or None to start fresh."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(save_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume, COMPLETE)):
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {COMPLETE} marker)")
    return resume


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
    """Save on every rank (collective); returns the checkpoint directory."""
    tag = tag_for(step)
    path = os.path.join(save_dir, tag)
    if dist.is_main() and os.path.isdir(path):
        shutil.rmtree(path)  # an incomplete leftover of a crashed save at the same step
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
    if dist.is_main():
        with open(os.path.join(path, COMPLETE), "w") as f:
            f.write(f"{step}\n")
        for old in complete_checkpoints(save_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load(engine, path: str) -> dict:
    """Load engine state and return this rank's trainer state."""
    save_dir, tag = os.path.split(os.path.normpath(path))
    load_path, _ = engine.load_checkpoint(save_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the engine state from {path}")
    state_file = os.path.join(path, f"trainer_state_rank{dist.rank()}.pt")
    if not os.path.isfile(state_file):
        raise FileNotFoundError(
            f"{state_file} is missing: this checkpoint was written by a run with fewer ranks; "
            "exact resume needs the same world size"
        )
    return torch.load(state_file, weights_only=True)
