"""Export a training checkpoint (ZeRO partitions) as a self-contained omni model directory.

    python tools/export_hf.py --checkpoint runs/demo/ckpt/step_00001000 --out exported/demo
    python trainer/main.py --model exported/demo ...        # train on from it
    (single process, CPU is enough: it only reads files)

`--checkpoint` is one checkpoint directory written by the trainer (trainer/checkpoint.py):
`SAVE_DIR/TAG/` holding DeepSpeed's per-rank partition files from
`engine.save_checkpoint(SAVE_DIR, tag=TAG)`, plus `run_config.json` (the resolved config; its
"model" section names the architecture: model = tiny | DIR, or vlm + audio_encoder) and
`processor/` (OmniProcessor.save_pretrained). The partitions are consolidated into fp32 with
DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint(SAVE_DIR, tag=TAG)` (fp32 master
weights, so nothing is lost to bf16), loaded into a model of the same architecture built
without pretrained weights, and written with `save_omni`: omni_config.json,
model.safetensors and the processor -- what `load_omni` / `--model DIR` read.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from transformers import AutoConfig, WhisperConfig  # noqa: E402

from trainer.models.omni import (  # noqa: E402
    OMNI_CONFIG,
    build_from_configs,
    build_tiny,
    configs_from_spec,
    load_weights,
    save_omni,
)
from trainer.models.processing import OmniProcessor  # noqa: E402


def model_section(run_config: dict, path: str) -> dict:
    """The model spec of a run: run_config["model"] as a section, or top-level keys."""
    section = run_config.get("model")
    section = section if isinstance(section, dict) else run_config
    if section.get("model") is None and not (section.get("vlm") and section.get("audio_encoder")):
        raise ValueError(f"{path}: model section names neither model (tiny|DIR) nor vlm + audio_encoder: {section}")
    return section


def architecture(spec: dict, processor: OmniProcessor):
    """A randomly initialised model of the run's architecture (weights come from the checkpoint)."""
    projector = spec.get("projector", "mlp")
    if spec.get("model") == "tiny":
        return build_tiny(processor, projector=projector, attn_impl="eager")
    if spec.get("model") is not None:
        with open(os.path.join(spec["model"], OMNI_CONFIG)) as f:
            exported = json.load(f)
        vlm_config, whisper_config = configs_from_spec(exported)
        return build_from_configs(vlm_config, whisper_config, processor, projector=exported["projector"], attn_impl="eager")
    return build_from_configs(
        AutoConfig.from_pretrained(spec["vlm"]),
        WhisperConfig.from_pretrained(spec["audio_encoder"]),
        processor,
        projector=projector,
        attn_impl="eager",
    )


def export(checkpoint_dir: str, out_dir: str) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = os.path.normpath(checkpoint_dir)
    config_path = os.path.join(checkpoint_dir, "run_config.json")
    processor_dir = os.path.join(checkpoint_dir, "processor")
    for needed in (config_path, processor_dir):
        if not os.path.exists(needed):
            raise FileNotFoundError(f"{needed} not found: --checkpoint must be a trainer checkpoint directory (SAVE_DIR/TAG)")
    with open(config_path) as f:
        spec = model_section(json.load(f), config_path)
    processor = OmniProcessor.from_pretrained(processor_dir)
    save_dir, tag = os.path.split(checkpoint_dir)
    state_dict = get_fp32_state_dict_from_zero_checkpoint(save_dir, tag=tag)
    model = architecture(spec, processor).float()
    load_weights(model, state_dict, source=checkpoint_dir)
    save_omni(model, processor, out_dir)
    print(f"exported {checkpoint_dir} -> {out_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory SAVE_DIR/TAG written by the trainer")
    parser.add_argument("--out", required=True, help="directory to write the exported model into")
    args = parser.parse_args(argv)
    with torch.no_grad():
        export(args.checkpoint, args.out)


if __name__ == "__main__":
    main()
