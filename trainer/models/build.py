"""Building the omni model: the `tiny` preset, a new composition of pretrained parts, the
architecture an export or a checkpoint recorded; which parts train; gradient checkpointing;
attention kernels. The trainer's dispatch between them is `build_model`
(trainer/models/factory.py), which also loads directories through serialize.py.

  build_tiny(processor, ...)                                 random-init real classes, tiny (or toy) configs
  compose(vlm_path, audio_encoder_path, processor, ...)      from_pretrained weights + a new projector
  build_from_spec(spec, processor, ...)                      the architecture omni_spec recorded
  build_native(config, processor, ...) / load_native(dir)    a native omni thinker (trainer/models/native.py)
  load_omni(dir) (trainer/models/serialize.py)               an export or a native checkpoint, weights included
ZeRO-3: pass `init_ctx=deepspeed.zero.Init(config_dict_or_path=ds_config)` so no rank ever
holds the whole model. Hugging Face builds and loads its modules partitioned only while a
`transformers.integrations.HfDeepSpeedConfig(ds_config)` object is alive:
`factory.build_model` creates one and keeps it on the model (init_ctx then only wraps the new projector).
"""

import contextlib
import importlib.util

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, WhisperConfig

from trainer.models.adapters import adapter_for
from trainer.models.lora import adapter_params, apply_lora
from trainer.models.omni import AudioProjector, OmniModel, ZeroSafeWhisperEncoder
from trainer.models import native
from trainer.models.processing import OmniProcessor

ATTN_IMPLS = ("auto", "flash_attention_2", "sdpa", "eager")
TRAINABLE_PARTS = ("llm", "projector", "vision", "audio")
DEFAULT_TRAINABLE = ("llm", "projector")


def resolve_attn_impl(attn_impl: str) -> str:
    """auto -> flash_attention_2 when flash-attn is importable and CUDA is present, else sdpa."""
    if attn_impl == "auto":
        has_flash = importlib.util.find_spec("flash_attn") is not None
        return "flash_attention_2" if has_flash and torch.cuda.is_available() else "sdpa"
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    return attn_impl


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Create parameters directly in `dtype` (no fp32 copy first, also under zero.Init)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)



def set_trainable(model: OmniModel, parts) -> None:
    """Train exactly `parts` (subset of llm, projector, vision, audio); freeze the rest.
    "llm" = decoder + token embeddings + LM head (with LoRA adapters, trainer/models/lora.py:
    the adapters only); "projector" = what maps audio into the LLM
    width (ours in a composed model, the audio tower's output projection in a native one).
    Each family's modules: OmniModel.parts(). Frozen encoders then run under no_grad."""
    parts = frozenset(parts)
    unknown = parts - set(TRAINABLE_PARTS)
    if unknown:
        raise ValueError(f"unknown trainable part(s) {sorted(unknown)}; choose from {TRAINABLE_PARTS}")
    model.requires_grad_(False)
    modules = model.parts()
    for part in parts:
        if part == "llm" and getattr(model, "lora", None):  # LoRA: the LLM's adapters, not its weights
            for param in adapter_params(model):
                param.requires_grad_(True)
            continue
        for module in modules[part]:
            module.requires_grad_(True)
    for param in model.frozen_always():
        param.requires_grad_(False)
    model.trainable_parts = parts


def enable_gradient_checkpointing(model: OmniModel) -> None:
    """Non-reentrant checkpointing of the decoder layers (and the vision tower if trained):
    correct with the no-grad teacher pass and with ZeRO-3's parameter hooks."""
    towers = [model.adapter.language_model]
    if "vision" in model.trainable_parts:
        towers.append(model.adapter.vision_tower)
    if model.native and "audio" in model.trainable_parts:
        towers.append(model.adapter.audio_tower)
    for tower in towers:
        tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _assemble(vlm, audio_encoder, projector, processor, whisper_input: str = "clip") -> OmniModel:
    model = OmniModel(vlm, audio_encoder, projector, processor, whisper_input=whisper_input)
    set_trainable(model, DEFAULT_TRAINABLE)
    return model


def _enter(init_ctx):
    """`init_ctx` may be a context manager (a deepspeed.zero.Init instance) or a factory of
    one (contextlib.nullcontext)."""
    return init_ctx() if isinstance(init_ctx, type) or not hasattr(init_ctx, "__enter__") else init_ctx


def _configure(config: PretrainedConfig, attn_impl: str) -> PretrainedConfig:
    config._attn_implementation = resolve_attn_impl(attn_impl)
    return config


def _vocab_fits(vlm: nn.Module, processor: OmniProcessor) -> None:
    """Resize token embeddings only if the tokenizer outgrew the matrix."""
    if len(processor.tokenizer) > vlm.get_input_embeddings().num_embeddings:
        vlm.resize_token_embeddings(len(processor.tokenizer))


def build_from_configs(
    vlm_config: PretrainedConfig,
    whisper_config: WhisperConfig,
    processor: OmniProcessor,
    *,
    projector: str = "mlp",
    dtype: torch.dtype = torch.float32,
    attn_impl: str = "auto",
    init_ctx=contextlib.nullcontext,
    whisper_input: str = "clip",
) -> OmniModel:
    """Random-init model of the given architectures (weights loaded by the caller).
    `whisper_input`: Whisper reads the batch's longest clip ("clip") or the 30 s window.
    The VLM and Whisper encoder are built by Hugging Face's `_from_config`, which under
    ZeRO-3 (an HfDeepSpeedConfig alive) builds them inside zero.Init and initialises the
    partitioned weights itself; `init_ctx` wraps the new projector."""
    adapter_cls = adapter_for(vlm_config.model_type)
    _configure(vlm_config, attn_impl)
    _configure(whisper_config, attn_impl)
    _check_zero3_setup(init_ctx)
    vlm = adapter_cls.vlm_class._from_config(vlm_config, dtype=dtype)
    audio_encoder = ZeroSafeWhisperEncoder._from_config(whisper_config, dtype=dtype)
    with default_dtype(dtype), _enter(init_ctx):
        audio_projector = AudioProjector(
            whisper_config.d_model, processor.audio_stack, vlm_config.get_text_config().hidden_size, projector
        )
    _vocab_fits(vlm, processor)
    return _assemble(vlm, audio_encoder, audio_projector, processor, whisper_input)


def _check_zero3_setup(init_ctx) -> None:
    """A zero.Init context without HfDeepSpeedConfig would leave the HF parts whole on
    every rank: refuse that loudly."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if type(init_ctx).__name__ == "Init" and not is_deepspeed_zero3_enabled():
        raise RuntimeError(
            "init_ctx is deepspeed.zero.Init but no transformers HfDeepSpeedConfig is alive: create "
            "`hf_ds = HfDeepSpeedConfig(ds_config)` (and keep a reference) before building the model"
        )


def build_tiny(processor: OmniProcessor, *, projector="mlp", dtype=torch.float32, attn_impl="auto",
               init_ctx=contextlib.nullcontext, seed: int = 0, toy: bool = False, whisper_input: str = "clip",
               vlm: str = "qwen2_vl") -> OmniModel:
    """The `tiny` preset: real Qwen2-VL / Whisper classes at toy size, random weights;
    toy=True gives the larger `toy` preset (its processor: build_tiny_processor(max_pixels=TOY_MAX_PIXELS));
    vlm="qwen3_vl" / "internvl" the `tiny-qwen3vl` / `tiny-internvl` preset (its processor:
    build_tiny_qwen3vl_processor() / build_tiny_internvl_processor())."""
    from trainer.models.tiny import (TOY, TOY_AUDIO_DIM, tiny_internvl_config, tiny_qwen3vl_config, tiny_vlm_config,
                                     tiny_whisper_config)

    audio = {"d_model": TOY_AUDIO_DIM} if toy else {}
    if vlm != "qwen2_vl" and toy:
        raise ValueError("the toy preset is Qwen2-VL only")
    vlm_config = {"qwen2_vl": tiny_vlm_config, "qwen3_vl": tiny_qwen3vl_config, "internvl": tiny_internvl_config}[vlm]
    torch.manual_seed(seed)
    return build_from_configs(
        vlm_config(len(processor.tokenizer), **(TOY if toy else {})),
        tiny_whisper_config(processor.num_mel_bins, processor.window_frames, **audio),
        processor,
        projector=projector,
        dtype=dtype,
        attn_impl=attn_impl,
        init_ctx=init_ctx,
        whisper_input=whisper_input,
    )


def compose(vlm_path: str, audio_encoder_path: str, processor: OmniProcessor, *, projector="mlp",
            dtype=torch.bfloat16, attn_impl="auto", init_ctx=contextlib.nullcontext, whisper_input: str = "clip") -> OmniModel:
    """A new composition from pretrained weights: the VLM, Whisper's encoder only, and a
    fresh projector. Under ZeRO-3 keep an HfDeepSpeedConfig alive (module docstring)."""
    _check_zero3_setup(init_ctx)
    vlm_config = AutoConfig.from_pretrained(vlm_path)
    adapter_cls = adapter_for(vlm_config.model_type)
    impl = resolve_attn_impl(attn_impl)
    vlm = adapter_cls.vlm_class.from_pretrained(vlm_path, dtype=dtype, attn_implementation=impl)
    # Whisper checkpoints (WhisperModel / WhisperForConditionalGeneration) keep the encoder
    # under "encoder." / "model.encoder."; map those keys onto a bare WhisperEncoder.
    audio_encoder, loading_info = ZeroSafeWhisperEncoder.from_pretrained(
        audio_encoder_path,
        dtype=dtype,
        attn_implementation=impl,
        key_mapping={r"^model\.encoder\.": "", r"^encoder\.": ""},
        output_loading_info=True,
    )
    if loading_info["missing_keys"]:
        raise ValueError(f"{audio_encoder_path}: Whisper encoder weights missing: {sorted(loading_info['missing_keys'])[:8]}")
    with default_dtype(dtype), _enter(init_ctx):
        audio_projector = AudioProjector(
            audio_encoder.config.d_model, processor.audio_stack, vlm_config.get_text_config().hidden_size, projector
        )
    _vocab_fits(vlm, processor)
    return _assemble(vlm, audio_encoder, audio_projector, processor, whisper_input)


def build_native(config, processor: OmniProcessor, *, dtype=torch.float32, attn_impl="auto",
                 init_ctx=contextlib.nullcontext) -> OmniModel:
    """Random-init native thinker of `config` (weights loaded by the caller, or noise for the
    tiny and synthetic presets)."""
    _check_zero3_setup(init_ctx)
    thinker = native.build_thinker(config, dtype=dtype, attn_impl=resolve_attn_impl(attn_impl))
    return _assemble(thinker, None, None, processor)


def load_native(model_dir: str, *, dtype=torch.bfloat16, attn_impl="auto", init_ctx=contextlib.nullcontext):
    """A native omni checkpoint (the full model's or its thinker's): the thinker with its
    weights and the family's processor. -> (model, processor)."""
    _check_zero3_setup(init_ctx)
    processor = OmniProcessor.from_pretrained(model_dir)
    thinker = native.load_thinker(model_dir, dtype=dtype, attn_impl=resolve_attn_impl(attn_impl))
    return _assemble(thinker, None, None, processor), processor


def configs_from_spec(spec: dict):
    """(VLM config, Whisper config) from an omni_config.json dict."""
    vlm_config_dict = dict(spec["vlm_config"])
    model_type = vlm_config_dict.pop("model_type")
    vlm_config = AutoConfig.for_model(model_type, **vlm_config_dict)
    whisper_dict = {k: v for k, v in spec["whisper_config"].items() if k != "model_type"}
    return vlm_config, WhisperConfig(**whisper_dict)


def build_from_spec(spec: dict, processor: OmniProcessor, *, dtype=torch.float32, attn_impl="auto",
                    init_ctx=contextlib.nullcontext) -> OmniModel:
    """Random-init model of the architecture `omni_spec` recorded (weights loaded by the caller),
    with LoRA adapters when the spec has them (a LoRA run's checkpoint)."""
    if "native" in spec:
        config_cls = native.THINKERS[spec["native"]][0]
        config = config_cls.from_dict({k: v for k, v in spec["config"].items() if k != "model_type"})
        model = build_native(config, processor, dtype=dtype, attn_impl=attn_impl, init_ctx=init_ctx)
    else:
        if spec.get("audio_stack", processor.audio_stack) != processor.audio_stack:
            raise ValueError(f"spec stacks {spec['audio_stack']} audio frames, the processor {processor.audio_stack}")
        vlm_config, whisper_config = configs_from_spec(spec)
        model = build_from_configs(  # a spec written before the option: the window it was trained with
            vlm_config, whisper_config, processor, projector=spec["projector"], dtype=dtype, attn_impl=attn_impl,
            init_ctx=init_ctx, whisper_input=spec.get("whisper_input", "window"),
        )
    if spec.get("lora"):
        apply_lora(model, spec["lora"])
        set_trainable(model, DEFAULT_TRAINABLE)
    return model
