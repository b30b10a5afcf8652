"""Low-rank adapters (LoRA) on the LLM through the `peft` library, for every model family.

  apply_lora(model, spec)        inject adapters into the modules of the LLM part (model.parts()["llm"])
                                 whose names match spec["targets"] (peft's target_modules: a name or a
                                 name suffix); nothing outside the LLM (vision tower, Whisper, a native
                                 audio tower) is adapted, whatever its module names
  adapters_disabled(model)       context: the model with every adapter switched off = the start model
                                 (the frozen teacher under LoRA: no copy of any weight)
  merged_state_dict(model)       the model's state with each adapter folded into its base weight
                                 (peft's own delta, W + scale * B @ A) under the base names
  adapter_names(model)           the adapted modules' names

The spec is plain JSON (r, alpha, dropout, targets), recorded in omni_spec as "lora", so a
checkpoint rebuilds the same structure (tools/export_hf.py) and exports merged or adapter-only.

Which weights adapt: the LLM's Linear layers named in `targets`, handed to peft by their exact
names. Qwen3-Omni's MoE experts are fused 3-D parameters (mlp.experts.gate_up_proj / down_proj),
not Linear modules: they stay frozen, and its attention projections take adapters. (Given the
names as suffixes, peft 0.21 would turn the experts' parameters of those names into targets
through torch parametrizations, whose wrapped parameter ZeRO-3 would have to gather inside
the parametrization on every expert call; frozen experts keep the MoE block as it is.)

Under ZeRO-3 the adapters are created after the base model is partitioned, as ordinary
parameters; `deepspeed.initialize` partitions them like every other parameter (they are not
persistent unless below `stage3_param_persistence_threshold`, where ZeRO-3 keeps any small
parameter whole on every rank). A seed set before injection makes every rank's initial values
the same, so ZeRO-2's broadcast and ZeRO-3's partitioning start from one model.
"""

import contextlib
import re

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                   "gate_up_proj")
ADAPTER = "default"  # peft's adapter name: one adapter per model


def lora_spec(r: int, alpha: float, dropout: float, targets) -> dict | None:
    """The JSON spec of `--lora_*` (None when r == 0: no adapters)."""
    if r == 0:
        return None
    return {"r": int(r), "alpha": float(alpha), "dropout": float(dropout), "targets": list(targets)}


def _peft_config(spec: dict, target_modules):
    from peft import LoraConfig

    return LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                      target_modules=target_modules, bias="none")


def llm_containers(model) -> list:
    """The modules of the LLM part that hold its Linear layers (not the LM head: a lone Linear)."""
    return [m for m in model.parts()["llm"] if not isinstance(m, (nn.Linear, nn.Embedding))]


def apply_lora(model, spec: dict, seed: int = 0) -> list:
    """Inject adapters (spec: r, alpha, dropout, targets) into the LLM of `model` in place and
    record the spec on it (`model.lora`). -> the adapted modules' names. An error names the
    targets when none matches."""
    from peft import inject_adapter_in_model

    if getattr(model, "lora", None):
        raise ValueError("the model already has adapters")
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # the same initial adapters on every rank; the run's RNG untouched
        torch.manual_seed(seed)
        for container in llm_containers(model):
            matching = _matching(container, spec["targets"])
            if matching:  # exact names: peft would also turn fused-expert parameters of these names into targets
                inject_adapter_in_model(_peft_config(spec, _exactly(matching)), container, adapter_name=ADAPTER)
    names = adapter_names(model)
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for c in llm_containers(model) for n, m in c.named_modules()
                         if isinstance(m, nn.Linear)})
        raise ValueError(f"--lora_targets {','.join(spec['targets'])} match no Linear layer of the "
                         f"{model.adapter.family or 'composed'} LLM; its Linear layers are named {linear}")
    model.lora = dict(spec)
    return names


def _matching(container: nn.Module, targets) -> list:
    """Names of the Linear layers in `container` named `t` or ending in `.t` for a target t."""
    return [n for n, m in container.named_modules()
            if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]


def _exactly(names) -> str:
    """peft target_modules matching exactly `names` (a string is a full-match regex)."""
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def lora_layers(model: nn.Module) -> list:
    """(name, peft LoRA layer) pairs."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def adapter_names(model: nn.Module) -> list:
    return [name for name, _ in lora_layers(model)]


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_params(model: nn.Module) -> list:
    return [p for n, p in model.named_parameters() if is_adapter_param(n)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Every adapter off (peft's enable_adapters(False)), then back as it was; the parameters'
    requires_grad flags (which peft's toggle rewrites) are restored too."""
    layers = [m for _, m in lora_layers(model)]
    if not layers:
        raise RuntimeError("adapters_disabled: the model has no LoRA adapters")
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    were_disabled = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, disabled in zip(layers, were_disabled):
            layer.enable_adapters(not disabled)
        for param, flag in flags:
            param.requires_grad_(flag)


def merged_state_dict(model: nn.Module, state_dict: dict | None = None) -> dict:
    """The model's state (or `state_dict`, the same names) with each adapter folded into its
    base layer and every adapter key dropped: `X.base_layer.weight` -> `X.weight` = W + s * B @ A
    in fp32 (s: the layer's peft scaling, lora_alpha / r; peft's delta for a Linear layer), then
    back to W's dtype; `X.base_layer.bias` -> `X.bias`. The model itself is not changed."""
    state = model.state_dict() if state_dict is None else state_dict
    scaling = {name: layer.scaling[ADAPTER] for name, layer in lora_layers(model)}
    merged = {}
    for name, tensor in state.items():
        if is_adapter_param(name):
            continue
        owner, found, leaf = name.rpartition(".base_layer.")
        if not found:
            merged[name] = tensor
            continue
        if leaf == "weight":
            a = state[f"{owner}.lora_A.{ADAPTER}.weight"].float()  # r, in
            b = state[f"{owner}.lora_B.{ADAPTER}.weight"].float()  # out, r
            tensor = (tensor.float() + scaling[owner] * (b @ a)).to(tensor.dtype)
        merged[f"{owner}.{leaf}"] = tensor
    return merged


def without_lora(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "lora"}


def save_adapter(model: nn.Module, base: nn.Module, out_dir: str) -> None:
    """Write a peft adapter directory (adapter_config.json + adapter_model.safetensors) for the
    model without adapters that `PeftModel.from_pretrained(base, out_dir)` loads onto: a native
    family's thinker (the family's own class) or a composed OmniModel. `base` is such a model
    (the start; peft injects into it, so it is used up) and only supplies the structure.
    `model` is the trained adapted model (an OmniModel). Parts trained in full (the projector,
    the audio encoder) go in as peft `modules_to_save` with their trained values; the adapters
    target exactly the adapted modules (a regex of their names), never a tower with the same
    module names. Every saved value comes from `model`."""
    from peft import get_peft_model

    prefix = "vlm." if model.native else ""  # a thinker's names are the OmniModel's without "vlm."
    names = [n[len(prefix):] for n in adapter_names(model)]
    model_names = {id(m): n for n, m in model.named_modules()}
    base_names = {n for n, _ in base.named_modules()}
    full = []
    for part in sorted(model.trainable_parts - {"llm"}):
        for module in model.parts()[part]:
            name = model_names[id(module)]
            if not name.startswith(prefix) or name[len(prefix):] not in base_names:
                raise ValueError(f"the {part} part ({name}) is not inside the adapter's base model")
            full.append(name[len(prefix):])
    spec = dict(model.lora)
    config = _peft_config(spec, _exactly(names))
    config.modules_to_save = full or None
    peft_model = get_peft_model(base, config, adapter_name=ADAPTER)  # injects into `base` in place
    own = dict(peft_model.named_parameters())
    trained = {f"base_model.model.{n[len(prefix):]}": p for n, p in model.named_parameters() if is_adapter_param(n)}
    for module_name in full:  # the trained values of the parts trained in full: peft's own copy of each
        module = dict(model.named_modules())[prefix + module_name]
        trained.update({f"base_model.model.{module_name}.modules_to_save.{ADAPTER}.{n}": p
                        for n, p in module.named_parameters()})
    with torch.no_grad():
        for name, param in trained.items():
            own[name].copy_(param.detach().to(own[name].dtype))
    peft_model.save_pretrained(out_dir)
