"""The trainer's one entry to a model, `build_model`: a named preset (--model tiny, toy, a
synthetic or tiny native preset), a saved directory (an export or a native checkpoint, through
serialize.load_omni) or a new composition of pretrained parts (--vlm + --audio_encoder); then
which parts train, ZeRO-3 leaf modules and gradient checkpointing. It sits above build.py (the
constructors) and serialize.py (save and load), which never import it.

    model, processor = build_model(config.model)                                   # one process
    model, processor = build_model(config.model, init_ctx=deepspeed.zero.Init(config_dict_or_path=ds),
                                   ds_config=ds)                                    # ZeRO-3
"""

import contextlib
import os

import torch

from trainer.errors import ConfigError
from trainer.models import native
from trainer.models.build import (build_from_configs, build_native, build_tiny, compose, enable_gradient_checkpointing,
                                  set_trainable)
from trainer.models.omni import OmniModel
from trainer.models.lora import apply_lora, lora_spec
from trainer.models.presets import OVERHEAD, PRESETS, preset_processor, vlm_config, whisper_large_v3_config
from trainer.models.processing import OmniProcessor
from trainer.models.serialize import load_omni
from trainer.models.tiny import (TOY_MAX_PIXELS, build_tiny_internvl_processor, build_tiny_processor,
                                 build_tiny_qwen3vl_processor)

# preset -> the composed VLM
COMPOSED_TINY = {"tiny": "qwen2_vl", "toy": "qwen2_vl", "tiny-qwen3vl": "qwen3_vl", "tiny-internvl": "internvl"}
NAMED_MODELS = (*COMPOSED_TINY, *PRESETS, *native.PRESETS)  # --model values that build without a directory


def build_model(cfg, *, dtype=torch.float32, init_ctx=contextlib.nullcontext, ds_config: dict | None = None,
                seed: int = 0):
    """The trainer's entry: `cfg` has model, vlm, audio_encoder, audio_stack, projector,
    trainable, attn_impl, gradient_checkpointing and lora_* (trainer.config.ModelConfig); `seed`
    draws the LoRA adapters' initial values (the same on every rank).
    Under ZeRO-3 pass init_ctx=deepspeed.zero.Init(config_dict_or_path=ds_config) AND the
    filled `ds_config` dict: Hugging Face builds/loads its modules partitioned only while a
    transformers HfDeepSpeedConfig is alive, so one is created here and kept on the model
    (`model.hf_deepspeed_config`) for the rest of the run. -> (model, processor)."""
    hf_deepspeed_config = _hf_zero3_config(init_ctx, ds_config)
    if cfg.model not in (None, *NAMED_MODELS) and not os.path.isdir(cfg.model):
        raise FileNotFoundError(f"--model: {cfg.model} is neither one of {NAMED_MODELS} nor an existing directory")
    if cfg.model in COMPOSED_TINY:
        toy, vlm = cfg.model == "toy", COMPOSED_TINY[cfg.model]
        if vlm == "qwen3_vl":
            processor = build_tiny_qwen3vl_processor(audio_stack=cfg.audio_stack)
        elif vlm == "internvl":
            processor = build_tiny_internvl_processor(audio_stack=cfg.audio_stack)
        else:
            processor = build_tiny_processor(audio_stack=cfg.audio_stack, **({"max_pixels": TOY_MAX_PIXELS} if toy else {}))
        model = build_tiny(processor, projector=cfg.projector, dtype=dtype, attn_impl=cfg.attn_impl, init_ctx=init_ctx,
                           toy=toy, vlm=vlm)
    elif cfg.model in PRESETS:
        processor = preset_processor(cfg.audio_stack, cfg.model)
        model = build_from_configs(vlm_config(cfg.model), whisper_large_v3_config(small=cfg.model in OVERHEAD),
                                   processor, projector=cfg.projector,
                                   dtype=dtype, attn_impl=cfg.attn_impl, init_ctx=init_ctx)
    elif cfg.model in native.TINY:
        processor = native.tiny_processor(native.TINY[cfg.model])
        torch.manual_seed(0)
        model = build_native(native.tiny_config(processor.family, processor), processor, dtype=dtype,
                             attn_impl=cfg.attn_impl, init_ctx=init_ctx)
    elif cfg.model in native.SYNTHETIC:
        processor = native.tiny_processor(native.SYNTHETIC[cfg.model], max_pixels=448 * 448, num_mel_bins=128,
                                          chunk_seconds=30)
        model = build_native(native.synthetic_config(cfg.model, processor), processor, dtype=dtype,
                             attn_impl=cfg.attn_impl, init_ctx=init_ctx)
    elif cfg.model is not None:
        model, processor = load_omni(cfg.model, dtype=dtype, attn_impl=cfg.attn_impl, init_ctx=init_ctx)
    else:
        processor = OmniProcessor.compose(cfg.vlm, cfg.audio_encoder, cfg.audio_stack)
        model = compose(cfg.vlm, cfg.audio_encoder, processor, projector=cfg.projector, dtype=dtype,
                        attn_impl=cfg.attn_impl, init_ctx=init_ctx)
    model.hf_deepspeed_config = hf_deepspeed_config
    if not model.native and getattr(cfg, "whisper_input", "auto") != "auto":
        model.whisper_input = cfg.whisper_input  # the flag over the new model's default or the saved setting
    if model.adapter.z3_leaf_classes:  # gathered whole by ZeRO-3 (a flag on the modules; no effect otherwise)
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, list(model.adapter.z3_leaf_classes))
    if getattr(cfg, "lora_r", 0):
        names = apply_lora(model, lora_spec(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets), seed=seed)
        if dist_rank() == 0:
            kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
            unmatched = sorted(set(cfg.lora_targets) - set(kinds))
            print(f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha:g} on {len(names)} Linear layers of the LLM "
                  f"({', '.join(kinds)}; e.g. {names[0]})"
                  + (f"; targets naming no layer of this model: {', '.join(unmatched)}" if unmatched else ""), flush=True)
    set_trainable(model, cfg.trainable)
    _check_leaf_modules_frozen(model, init_ctx)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, processor


def dist_rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _check_leaf_modules_frozen(model: OmniModel, init_ctx) -> None:
    """Under ZeRO-3 a leaf module (gathered whole: Phi-4's image embedding) must not train:
    DeepSpeed 0.19 re-partitions its parameters before their gradients are accumulated
    (seen as "size of tensor a (0) must match ..." in backward). Refused up front."""
    if type(init_ctx).__name__ != "Init":
        return
    leaf = tuple(model.adapter.z3_leaf_classes)
    training = sorted({type(m).__name__ for m in model.modules() if leaf and isinstance(m, leaf)
                       and any(p.requires_grad for p in m.parameters())})
    if training:
        raise ConfigError(f"--trainable: {', '.join(training)} would train under ZeRO-3 as a leaf module, which "
                          f"DeepSpeed 0.19 does not support; leave the {model.adapter.family} vision part frozen "
                          f"(--trainable without vision), or use ZeRO stage 2 (ds_configs/zero2.json)")


def _hf_zero3_config(init_ctx, ds_config):
    """An HfDeepSpeedConfig for a zero.Init build unless one is already alive (needs the
    `accelerate` package, as all of transformers' DeepSpeed integration does)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if type(init_ctx).__name__ != "Init" or is_deepspeed_zero3_enabled():
        return None
    if ds_config is None:
        raise RuntimeError("build_model under deepspeed.zero.Init needs ds_config=<the filled DeepSpeed config dict>")
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)
