"""Saving and loading the omni model. A composed model: this project's export format,
omni_config.json (the architecture, `omni_spec`), model.safetensors and the processor files.
A native thinker: the family's own Hugging Face layout (config.json, safetensors, processor
files), which `<Family>ThinkerForConditionalGeneration.from_pretrained` and AutoProcessor
load and standard inference stacks serve. Trainer checkpoints carry the spec as
omni_spec.json, so tools/export_hf.py needs nothing else.
"""

import contextlib
import json
import os
from collections.abc import Mapping

import torch

from trainer.models.build import build_from_spec, load_native
from trainer.models.omni import OmniModel
from trainer.models.processing import OmniProcessor, native_family_of

OMNI_CONFIG = "omni_config.json"
OMNI_SPEC = "omni_spec.json"  # omni_spec(model) in every trainer checkpoint: what export_hf builds
WEIGHTS = "model.safetensors"


def omni_spec(model: OmniModel) -> dict:
    """The architecture as JSON (no weights): omni_config.json of an export, and
    omni_spec.json (OMNI_SPEC) of a trainer checkpoint; `build_from_spec` rebuilds it.
    A native thinker: its family and config."""
    lora = {"lora": dict(model.lora)} if getattr(model, "lora", None) else {}  # a checkpoint of a LoRA run
    if model.native:
        return {"native": model.adapter.family, "config": model.vlm.config.to_dict(), **lora}
    return dict(
        vlm_config=model.vlm.config.to_dict(),
        whisper_config=model.audio_encoder.config.to_dict(),
        projector=model.projector.kind,
        audio_stack=model.projector.stack,
        whisper_input=model.whisper_input,
        **lora,
    )


def save_omni(model: OmniModel, processor: OmniProcessor, out_dir: str, state_dict: dict | None = None) -> None:
    """Write `out_dir`: omni_config.json, model.safetensors (fp32 unless the weights are
    lower precision), and the processor. `state_dict`: a consolidated one (export_hf)
    instead of the model's own (the model then only supplies the architecture)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    state_dict = model.state_dict() if state_dict is None else state_dict
    if model.native:  # the thinker's own layout: its keys are ours without "vlm."
        thinker_state = {name[len("vlm."):]: tensor for name, tensor in state_dict.items() if name.startswith("vlm.")}
        model.vlm.save_pretrained(out_dir, state_dict=thinker_state)
        processor.save_pretrained(out_dir)
        return
    # Tied weights are stored once; load_omni re-ties them through the config.
    seen, tensors = {}, {}
    for name, tensor in state_dict.items():
        key = (tensor.data_ptr(), tensor.shape) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    save_file(tensors, os.path.join(out_dir, WEIGHTS))
    with open(os.path.join(out_dir, OMNI_CONFIG), "w") as f:
        json.dump(omni_spec(model), f, indent=2)
    processor.save_pretrained(out_dir)
    if not getattr(model, "lora", None):  # a LoRA checkpoint's spec is exported merged (tools/export_hf.py)
        write_auto_classes(model, processor, out_dir)


REMOTE_CODE = ("modeling_selfkd_omni.py", "processing_selfkd_omni.py")  # trainer/models/hf_remote/


def write_auto_classes(model: OmniModel, processor: OmniProcessor, out_dir: str) -> None:
    """Make a composed export a transformers model: the two self-contained files of
    trainer/models/hf_remote/ beside the weights, config.json and processor_config.json naming them
    (auto_map), and generation_config.json (greedy, stopping at the turn's end), so that
    AutoModelForCausalLM / AutoProcessor.from_pretrained(out_dir, trust_remote_code=True) load it
    without this project."""
    import shutil

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote")
    for name in REMOTE_CODE:
        shutil.copyfile(os.path.join(here, name), os.path.join(out_dir, name))
    spec = omni_spec(model)
    config = {"model_type": "selfkd_omni", "architectures": ["SelfKDOmniForCausalLM"],
              "auto_map": {"AutoConfig": "modeling_selfkd_omni.SelfKDOmniConfig",
                           "AutoModelForCausalLM": "modeling_selfkd_omni.SelfKDOmniForCausalLM"},
              **spec, "audio_pad_id": processor.audio_pad_id}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "processor_config.json"), "w") as f:
        json.dump({"processor_class": "SelfKDOmniProcessor",
                   "auto_map": {"AutoProcessor": "processing_selfkd_omni.SelfKDOmniProcessor"}}, f, indent=2)
    tokenizer = processor.tokenizer
    ends = sorted({i for i in (tokenizer.convert_tokens_to_ids(processor.turn_end), tokenizer.eos_token_id)
                   if i is not None})
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": ends, "pad_token_id": processor.pad_id, "do_sample": False}, f, indent=2)


def load_omni(model_dir: str, *, dtype=torch.float32, attn_impl="auto", init_ctx=contextlib.nullcontext):
    """-> (model, processor) from a directory written by save_omni / tools/export_hf.py, or
    a native omni checkpoint (trainer/models/build.py load_native).
    The weights file is read lazily, one tensor at a time. Under ZeRO-3 (init_ctx =
    zero.Init) they are copied in module by module under GatheredParameters(modifier_rank=0):
    only rank 0 reads them (the others receive its values when the module is re-partitioned),
    and only one module is ever whole at a time."""
    from safetensors import safe_open

    if native_family_of(model_dir) is not None:
        return load_native(model_dir, dtype=dtype, attn_impl=attn_impl, init_ctx=init_ctx)
    config_path = os.path.join(model_dir, OMNI_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: {model_dir} is neither an exported omni model nor a native "
                                f"omni checkpoint (config.json of Qwen2.5-Omni or Qwen3-Omni)")
    with open(config_path) as f:
        spec = json.load(f)
    processor = OmniProcessor.from_pretrained(model_dir)
    model = build_from_spec(spec, processor, dtype=dtype, attn_impl=attn_impl, init_ctx=init_ctx)
    with safe_open(os.path.join(model_dir, WEIGHTS), framework="pt", device="cpu") as weights_file:
        load_weights(model, LazyWeights(weights_file), source=model_dir)
    return model, processor


class LazyWeights(Mapping):
    """Read-only mapping over an open safetensors file: names and shapes come from its
    header, a tensor is read from disk only when indexed."""

    def __init__(self, weights_file):
        self.weights_file = weights_file
        self.names = set(weights_file.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.weights_file.get_tensor(name)

    def __contains__(self, name) -> bool:  # Mapping's default would read the tensor
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, name: str) -> tuple:
        return tuple(self.weights_file.get_slice(name).get_shape())


def _stored_shape(state_dict, name: str) -> tuple:
    return state_dict.shape(name) if isinstance(state_dict, LazyWeights) else tuple(state_dict[name].shape)


def load_weights(model: OmniModel, state_dict, source: str) -> None:
    """Copy `state_dict` (a dict of tensors or LazyWeights) into `model` (plain or ZeRO-3
    partitioned). Keys missing from the file must be tied to a stored one; unexpected keys
    are an error. Names and shapes are checked on every rank before any gather, so a bad
    file fails everywhere at once; under ZeRO-3 only rank 0 reads parameter values."""
    params = dict(model.named_parameters())  # deduplicated: tied weights appear once
    buffers = dict(model.named_buffers())
    unexpected = sorted(set(state_dict) - set(model.state_dict()))
    missing = sorted(set(params) - set(state_dict))
    if unexpected or missing:
        raise ValueError(f"{source}: weights do not match the architecture: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, tensor in {**params, **buffers}.items():
        if name in state_dict:
            expected = tuple(getattr(tensor, "ds_shape", tensor.shape))  # ZeRO-3: the whole shape
            if _stored_shape(state_dict, name) != expected:
                raise ValueError(f"{source}: {name} has shape {_stored_shape(state_dict, name)}, model {expected}")
    zero3 = any(hasattr(p, "ds_id") for p in params.values())
    if zero3:
        import deepspeed
    # Under ZeRO-3 rank 0 is the modifier_rank: its values are broadcast when a module is released.
    reads_params = not zero3 or deepspeed.comm.get_rank() == 0
    with torch.no_grad():
        for module_name, module in model.named_modules():
            prefix = f"{module_name}." if module_name else ""
            own = [(n, p) for n, p in module.named_parameters(recurse=False)]
            if not own:
                continue
            gather = (
                deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0) if zero3 else contextlib.nullcontext()
            )
            with gather:
                for name, param in own:
                    key = prefix + name
                    if reads_params and key in state_dict:
                        param.copy_(state_dict[key].to(param.dtype))
        for name, buffer in buffers.items():
            if name in state_dict:
                buffer.copy_(state_dict[name].to(buffer.dtype))
