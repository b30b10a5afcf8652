"""Export a training checkpoint (ZeRO partitions) as a self-contained omni model directory.

    python tools/export_hf.py --checkpoint runs/demo/ckpt/step_00001000 --out exported/demo
    python tools/export_hf.py --checkpoint runs/demo/ckpt --out exported/demo   # newest checkpoint that verifies
    python trainer/main.py --model exported/demo ...        # train on from it
    (single process, CPU is enough: it only reads files)

`--checkpoint` is one checkpoint directory written by the trainer (trainer/checkpoint.py), or
the save directory holding them: then the newest one whose files match its COMPLETE manifest
(as `--resume auto` picks it; a corrupt newer one is skipped with a warning naming the file).
Every .pt file is unpickled with the weights-only loader first; a file holding anything but
tensors and plain data is refused, naming it, and nothing from it runs. A checkpoint directory:
`SAVE_DIR/TAG/` holding DeepSpeed's per-rank partition files from
`engine.save_checkpoint(SAVE_DIR, tag=TAG)`, plus `omni_spec.json` (the architecture,
`trainer.models.omni.omni_spec` of the trained model) and `processor/`
(OmniProcessor.save_pretrained). The checkpoint alone is enough: nothing the run was started
from (`--model DIR`, `--vlm` / `--audio_encoder` hub ids) is read again. The partitions are
consolidated into fp32 with DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint(SAVE_DIR,
tag=TAG)` (fp32 master weights, so nothing is lost to bf16), loaded into a model built from
omni_spec.json without pretrained weights, and written with `save_omni`: omni_config.json,
model.safetensors and the processor -- what `load_omni` / `--model DIR` read. A composed model's
export is also a transformers model (config.json, the self-contained modeling_selfkd_omni.py and
processing_selfkd_omni.py): AutoModelForCausalLM / AutoProcessor.from_pretrained(OUT,
trust_remote_code=True) load it without this project (docs/training.md).

A LoRA run (omni_spec.json has "lora"): by default each adapter is folded into its base weight
(peft's delta, W + scale * B @ A) and the merged model is written in the standard layout above,
which knows nothing of peft. `--adapter_only` writes a peft adapter directory instead, for the
start model as base: `PeftModel.from_pretrained(base, OUT)` with base = the start's thinker
(a native family, its own class) or the start's OmniModel (`load_omni`, a composed model);
parts trained in full beside the adapters (projector, audio encoder) are in it as peft's
`modules_to_save`.
"""

import argparse
import json
import os
import sys

import torch

from trainer import checkpoint
from trainer.models import lora
from trainer.models.build import build_from_spec
from trainer.models.serialize import OMNI_SPEC, load_weights, save_omni
from trainer.distill.objective import MODEL_PREFIX
from trainer.models.processing import OmniProcessor


def pick_checkpoint(path: str) -> str:
    """A checkpoint directory as given (verified), or the newest verified one in a save directory."""
    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, checkpoint.COMPLETE)):
        problem = checkpoint.verify(path)
        if problem:
            raise checkpoint.CheckpointError(f"{path}: {problem}")
        return path
    found = checkpoint.complete_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint nor a save directory holding one")
    for candidate in reversed(found):
        problem = checkpoint.verify(candidate)
        if problem is None:
            return candidate
        print(f"WARNING: skipping {candidate}: {problem}; trying the previous complete checkpoint", file=sys.stderr)
    raise checkpoint.CheckpointError(f"no checkpoint in {path} matches its manifest")


def export(checkpoint_dir: str, out_dir: str, adapter_only: bool = False) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = pick_checkpoint(checkpoint_dir)
    spec_path = os.path.join(checkpoint_dir, OMNI_SPEC)
    processor_dir = os.path.join(checkpoint_dir, "processor")
    for needed in (spec_path, processor_dir):
        if not os.path.exists(needed):
            raise FileNotFoundError(
                f"{needed} not found: --checkpoint must be a trainer checkpoint directory (SAVE_DIR/TAG) "
                f"holding {OMNI_SPEC} and processor/"
            )
    with open(spec_path) as f:
        spec = json.load(f)
    processor = OmniProcessor.from_pretrained(processor_dir)
    save_dir, tag = os.path.split(checkpoint_dir)
    checkpoint.check_safe(checkpoint.torch_files(checkpoint_dir))
    with checkpoint.safe_loading():  # zero_to_fp32 itself asks for weights_only=False
        state_dict = get_fp32_state_dict_from_zero_checkpoint(save_dir, tag=tag)
    # The engine wraps the Self-KD objective: its parameters are the model's under "model.".
    # (Checkpoints written before the objective existed hold the model's names as they are.)
    if all(name.startswith(MODEL_PREFIX) for name in state_dict):
        state_dict = {name[len(MODEL_PREFIX):]: tensor for name, tensor in state_dict.items()}
    model = build_from_spec(spec, processor, attn_impl="eager").float()
    load_weights(model, state_dict, source=checkpoint_dir)
    del state_dict  # the model holds the weights now (one fp32 copy less at an 8B model's peak)
    if spec.get("lora"):  # a LoRA run: merged into the base (the standard layout), or the adapter alone
        base = build_from_spec(lora.without_lora(spec), processor, attn_impl="eager").float()
        if adapter_only:  # `base` only gives peft the structure: every saved value is the trained model's
            with open(os.path.join(checkpoint_dir, "run_config.json")) as f:  # which parts trained in full
                model.trainable_parts = frozenset(json.load(f)["trainable"])
            lora.save_adapter(model, base.vlm if model.native else base, out_dir)
            processor.save_pretrained(out_dir)
            print(f"exported the LoRA adapter of {checkpoint_dir} -> {out_dir} (PeftModel.from_pretrained(base, "
                  f"{out_dir}) with base = the start's {'thinker' if model.native else 'OmniModel (load_omni)'})")
            return
        load_weights(base, lora.merged_state_dict(model), source=checkpoint_dir)
        model = base
    elif adapter_only:
        raise ValueError(f"--adapter_only: {checkpoint_dir} is not a LoRA run (its omni_spec.json has no 'lora')")
    save_omni(model, processor, out_dir)
    print(f"exported {checkpoint_dir} -> {out_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory SAVE_DIR/TAG written by the trainer, or SAVE_DIR (newest that verifies)")
    parser.add_argument("--out", required=True, help="directory to write the exported model into")
    parser.add_argument("--adapter_only", action="store_true",
                        help="a LoRA run: write its peft adapter directory (adapter_config.json, adapter_model.safetensors; "
                             "parts trained in full as modules_to_save) instead of the merged model")
    args = parser.parse_args(argv)
    try:
        with torch.no_grad():
            export(args.checkpoint, args.out, adapter_only=args.adapter_only)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as exc:
        sys.exit(f"export_hf: {exc}")


if __name__ == "__main__":
    main()
