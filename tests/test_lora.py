"""LoRA through peft (trainer/models/lora.py), one process, fp32: what takes adapters in each
family, what trains, the adapters-off teacher being the start model, the prefix-shared teacher
staying exact, the merged state and the peft adapter directory giving the trained model's logits.
The 2-rank ZeRO-3 runs are in tests/test_lora_zero3.py (shared launch)."""

import copy

import pytest
import torch

from tests.dist_logits import answer_logits
from trainer.distill.loss import KDSettings
from trainer.distill.objective import SelfKDObjective
from trainer.distill.teachers import AdaptersOffTeacher, make_teacher
from trainer.errors import ConfigError
from trainer.models import lora
from trainer.models.build import build_tiny, set_trainable
from trainer.models.synthetic import make_batch
from trainer.models.tiny import build_tiny_processor

SPEC = {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": list(lora.DEFAULT_TARGETS)}
KD = KDSettings(alpha=0.75, temperature=2.0, divergence="fkl")


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def trained_like(model, seed=1):
    """Adapters as after training: B is 0 at init (the adapted model equals its base), so give
    every adapter weight random values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lora.adapter_params(model):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def lora_model(processor, trainable=("llm", "projector"), spec=SPEC):
    start = build_tiny(processor, attn_impl="sdpa", seed=0)
    model = copy.deepcopy(start)
    lora.apply_lora(model, spec, seed=0)
    set_trainable(model, trainable)
    return start, trained_like(model)


def test_adapters_go_on_the_llm_projections_only(processor):
    """Composed: the 7 projections of every decoder layer, nothing in the vision tower or in
    Whisper (which also have q_proj / v_proj / gate_proj-like names)."""
    start, model = lora_model(processor)
    names = lora.adapter_names(model)
    layers = model.vlm.config.get_text_config().num_hidden_layers
    assert len(names) == 7 * layers
    assert all(n.startswith("vlm.model.language_model.layers.") for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"}
    with pytest.raises(ValueError, match="match no Linear layer.*named"):
        lora.apply_lora(copy.deepcopy(start), {**SPEC, "targets": ["no_such_layer"]})
    only_q = copy.deepcopy(start)
    assert len(lora.apply_lora(only_q, {**SPEC, "targets": ["q_proj"]})) == layers


def test_with_lora_llm_means_the_adapters_and_other_parts_train_in_full(processor):
    _, model = lora_model(processor, trainable=("llm", "projector"))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trained if lora.is_adapter_param(n)}
    assert adapters and len(adapters) == 2 * len(lora.adapter_names(model))
    assert trained - adapters == {n for n, _ in model.projector.named_parameters(prefix="projector")}
    assert not any("embed_tokens" in n or "lm_head" in n or "base_layer" in n for n in trained)


def test_the_adapters_off_teacher_is_the_start_model_and_holds_no_weights(processor):
    """Answer logits with the adapters off equal the start model's (1e-5); with them on they
    differ; the requires_grad flags are as before; the teacher owns 0 bytes."""
    start, model = lora_model(processor)
    batch = make_batch(processor, 3, seed=2, image_size=[(56, 84), (84, 56), None])
    teacher = make_teacher("frozen", model)
    assert isinstance(teacher, AdaptersOffTeacher) and teacher.swaps_weights and teacher.resident_bytes() == 0
    flags = [p.requires_grad for p in model.parameters()]
    with teacher.context():
        off = answer_logits(model, batch)
    torch.testing.assert_close(off, answer_logits(start, batch), rtol=1e-5, atol=1e-5)
    assert (answer_logits(model, batch) - off).abs().max() > 1e-3
    assert [p.requires_grad for p in model.parameters()] == flags
    ema = make_teacher("ema", model, 0.9)
    assert ema.resident_bytes() == 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_self_kd_with_the_adapters_off_teacher_equals_a_copied_start_teacher(processor):
    """The objective's loss with the adapters-off teacher equals the one whose teacher pass runs
    the start model itself (the teacher the copy-based frozen teacher would give)."""
    start, model = lora_model(processor)
    batch = make_batch(processor, 2, seed=3)
    objective = SelfKDObjective(model, KD, chunk_size=8)
    objective.teacher = make_teacher("frozen", model)
    with torch.no_grad():
        out = objective(batch, 3.0)

    from trainer.distill.objective import answer_index

    t_index, _, _ = answer_index(batch.teacher_labels)
    s_index, _, _ = answer_index(batch.student_labels)
    with torch.no_grad():
        images, _ = start.encode_images(batch)
        t_hidden, _ = start.run_side(batch, "teacher", images, None)
        teacher_logits = start.adapter.lm_head(t_hidden.reshape(-1, t_hidden.shape[-1])[t_index])
        s_images, _ = model.encode_images(batch)
        audio, _ = model.encode_audio(batch)
        s_hidden, _ = model.run_side(batch, "student", s_images, audio)
        student_logits = model.adapter.lm_head(s_hidden.reshape(-1, s_hidden.shape[-1])[s_index])
    from trainer.distill.loss import divergence_sum

    kd = divergence_sum(student_logits.float(), teacher_logits.float(), KD.divergence, KD.temperature)
    torch.testing.assert_close(out.kd_sum, kd, rtol=1e-5, atol=1e-5)


def test_the_prefix_shared_teacher_stays_exact_under_lora(processor):
    from tests.test_model_omni import captured_teacher

    _, model = lora_model(processor)
    batch = make_batch(processor, 2, seed=4, image_size=[(84, 84), (84, 84)])
    full, full_hidden = captured_teacher(model, batch, share_prefix=False)
    shared, shared_hidden = captured_teacher(model, batch, share_prefix=True)
    torch.testing.assert_close(shared_hidden, full_hidden, rtol=1e-5, atol=1e-5)
    assert shared.teacher_tokens < full.teacher_tokens


def test_merged_state_gives_the_adapted_models_logits_in_the_plain_architecture(processor):
    """W + scale * B @ A under the base names loads into the model without adapters and gives
    the adapted model's answer logits (fp32, 1e-5)."""
    from trainer.models.serialize import load_weights

    _, model = lora_model(processor)
    merged = lora.merged_state_dict(model)
    assert not any("lora_" in n or "base_layer" in n for n in merged)
    plain = build_tiny(processor, attn_impl="sdpa", seed=5)
    load_weights(plain, merged, source="merged")
    batch = make_batch(processor, 2, seed=6)
    torch.testing.assert_close(answer_logits(plain, batch), answer_logits(model, batch), rtol=1e-5, atol=1e-5)
    name = lora.adapter_names(model)[0]
    layer = dict(model.named_modules())[name]
    scale = SPEC["alpha"] / SPEC["r"]
    naive = layer.base_layer.weight + scale * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(merged[f"{name}.weight"], naive, rtol=1e-6, atol=1e-6)


def test_the_adapter_directory_loads_with_peft_onto_the_start(processor, tmp_path):
    """lora.save_adapter -> PeftModel.from_pretrained(start, DIR): the start model with the
    trained adapters and the fully trained projector gives the trained model's logits."""
    from peft import PeftModel

    start, model = lora_model(processor, trainable=("llm", "projector"))
    with torch.no_grad():
        for param in model.projector.parameters():
            param.add_(0.1)
    lora.save_adapter(model, copy.deepcopy(start), str(tmp_path / "adapter"))  # the structure; values: model's
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    user_base = copy.deepcopy(start)  # what a user has: the start model, untrained
    loaded = PeftModel.from_pretrained(user_base, str(tmp_path / "adapter"))
    batch = make_batch(processor, 2, seed=7)
    torch.testing.assert_close(answer_logits(user_base, batch), answer_logits(model, batch), rtol=1e-5, atol=1e-5)
    assert loaded.peft_config["default"].r == SPEC["r"]


@pytest.mark.parametrize("preset,expected", [
    ("tiny-qwen2_5_omni", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("tiny-qwen3_omni", {"q_proj", "k_proj", "v_proj", "o_proj"}),  # fused MoE experts: frozen
    ("tiny-phi4mm", {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
])
def test_native_families_adapt_their_llm_and_nothing_else(preset, expected, tmp_path):
    """Native thinkers: the LLM's projections, never the audio or vision tower's; Qwen3-Omni's
    experts (fused parameters) stay frozen; adapters off = the start on the typed side (1e-5);
    the adapter directory loads with peft onto the start's thinker (the family's class) and
    gives the adapted model's logits."""
    from trainer.config import ModelConfig
    from trainer.models.factory import build_model

    start, processor = build_model(ModelConfig(model=preset, attn_impl="sdpa"))
    model, _ = build_model(ModelConfig(model=preset, attn_impl="sdpa", lora_r=4, lora_alpha=8.0,
                                       trainable=("llm", "projector")))
    names = lora.adapter_names(model)
    assert {n.rsplit(".", 1)[-1] for n in names} == expected
    towers = [model.adapter.vision_tower, *model.parts()["audio"]]
    tower_params = {id(p) for t in towers for p in t.parameters()}
    assert not any(id(p) in tower_params for p in lora.adapter_params(model))
    if preset == "tiny-qwen3_omni":
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".experts." in n)
    trained_like(model)
    batch = make_batch(processor, 2, seed=8, audio_seconds=(1.0, 2.0))
    with lora.adapters_disabled(model):
        off = answer_logits(model, batch, "teacher")
        with lora.adapters_disabled(model):  # nested: still off after the inner context
            pass
        torch.testing.assert_close(answer_logits(model, batch, "teacher"), off)
    torch.testing.assert_close(off, answer_logits(start, batch, "teacher"), rtol=1e-5, atol=1e-5)
    # The adapter directory is for the family's own thinker class: peft loads it onto the start's thinker.
    from peft import PeftModel

    with torch.no_grad():  # the part trained in full beside the adapters (the recipe's projector)
        for module in model.parts()["projector"]:
            for param in module.parameters():
                param.add_(0.05)
    lora.save_adapter(model, copy.deepcopy(start.vlm), str(tmp_path / "adapter"))
    PeftModel.from_pretrained(start.vlm, str(tmp_path / "adapter"))
    torch.testing.assert_close(answer_logits(start, batch), answer_logits(model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags,message", [
    (["--lora_r", "4", "--trainable", "projector"], "does not train them"),
    (["--lora_r", "4", "--lora_dropout", "0.1", "--kd_alpha", "0.75"], "noisy teacher"),
    (["--lora_r", "-1"], "--lora_r must be >= 0"),
    (["--lora_r", "4", "--teacher", "frozen", "--trainable", "llm,vision"], "trainable vision tower"),
])
def test_lora_flags_are_validated(flags, message):
    from trainer.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(["--model", "tiny", "--train_shards", "x.tar", *flags])


def test_lora_dropout_is_allowed_with_the_adapters_off_teacher():
    from trainer.config import load_config

    config = load_config(["--model", "tiny", "--train_shards", "x.tar", "--lora_r", "8", "--lora_dropout", "0.05",
                          "--kd_alpha", "0.75", "--teacher", "frozen", "--lora_targets", "q_proj,v_proj"])
    assert config.model.lora_targets == ("q_proj", "v_proj") and config.model.lora_r == 8


def test_every_shipped_recipe_is_a_valid_config():
    """launch_scripts/recipes/*.yaml (the LoRA one included) pass the trainer's validation."""
    import os

    from trainer.config import load_config

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch_scripts", "recipes")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".yaml"))
    assert "selfkd_qwen2_5_omni7b_lora.yaml" in names
    for name in names:
        config = load_config(["--config", os.path.join(folder, name)])
        if "lora" in name:
            assert config.model.lora_r == 16 and config.distill.teacher == "frozen"


def test_a_checkpoint_resumes_only_with_its_lora_settings(tmp_path):
    """Another rank or target set would fail deep in DeepSpeed, another alpha would silently
    rescale the trained adapters: refused up front, naming both sets of flags."""
    import json

    from trainer.loop import _check_same_lora

    (tmp_path / "omni_spec.json").write_text(json.dumps({"projector": "mlp", "lora": SPEC}))
    _check_same_lora(str(tmp_path), {"projector": "mlp", "lora": dict(SPEC)})
    with pytest.raises(ConfigError, match="written with --lora_r 4 --lora_alpha 8 .* this run has --lora_r 4 --lora_alpha 16"):
        _check_same_lora(str(tmp_path), {"lora": {**SPEC, "alpha": 16.0}})
    with pytest.raises(ConfigError, match="this run has --lora_r 0"):
        _check_same_lora(str(tmp_path), {"projector": "mlp"})
