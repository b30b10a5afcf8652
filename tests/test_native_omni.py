"""Native omni models (Qwen2.5-Omni and Qwen3-Omni thinkers) at toy size, random init, built
from their real transformers classes: the trainer's piecewise path against the family's own
forward, CPU positions against its get_rope_index, the chat templates' teacher/student
alignment, trainable parts, the prefix-shared teacher, export to the family's layout and
loading a full model's checkpoint (talker skipped)."""

import json
import os

import pytest
import torch

from trainer.config import ModelConfig
from trainer.data.batch import IGNORE_INDEX, Stage
from trainer.data.collate import SampleEncoder
from trainer.data.decode import SampleError
from trainer.distill.loss import KDSettings
from trainer.distill.objective import SelfKDObjective, answer_index, shared_prefix_length
from trainer.models import native
from trainer.models.build import build_model
from trainer.models.processing import OmniProcessor
from trainer.models.serialize import load_omni, save_omni
from trainer.models.synthetic import make_batch, raw_sample

PRESETS = ["tiny-qwen2_5_omni", "tiny-qwen3_omni"]
KD = KDSettings(alpha=0.75, temperature=2.0, divergence="fkl")
# Images with and without, of two shapes, so image counts, grids and DeepStack rows differ per sample.
SIZES = [(56, 84), None, (96, 64)]


def build(preset, trainable=("llm", "projector")):
    return build_model(ModelConfig(model=preset, trainable=trainable, attn_impl="sdpa"))


@pytest.fixture(scope="module", params=PRESETS)
def built(request):
    model, processor = build(request.param)
    return request.param, model.eval(), processor


def hf_logits(thinker, batch, role):
    """The family's own forward on one side of the batch: (B, T, V) logits."""
    input_ids, mask, _ = batch.side(role)
    kwargs = dict(input_ids=input_ids, attention_mask=mask, pixel_values=batch.pixel_values,
                  image_grid_thw=batch.image_grid_thw)
    if role == "student":
        width = batch.input_features.shape[-1]
        kwargs.update(input_features=batch.input_features,
                      feature_attention_mask=(torch.arange(width)[None] < batch.audio_frames[:, None]).long())
    with torch.no_grad():
        return thinker(**kwargs).logits


def our_logits(model, batch, role):
    with torch.no_grad():
        images, _ = model.encode_images(batch)
        audio, _ = model.encode_audio(batch)
        hidden, _ = model.run_side(batch, role, images, audio if role == "student" else None)
        return model.adapter.lm_head(hidden)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_trainer_path_equals_the_family_forward(built, role):
    """Audio tower on valid mel frames, image features (with DeepStack rows), placeholders
    replaced in order, CPU M-RoPE positions: the same logits as the thinker's own forward."""
    _, model, processor = built
    batch = make_batch(processor, 3, image_size=SIZES, audio_seconds=(0.6, 3.0))
    mask = batch.side(role)[1].bool()
    torch.testing.assert_close(our_logits(model, batch, role)[mask], hf_logits(model.vlm, batch, role)[mask],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_cpu_positions_equal_the_family_rope_index(built, role):
    _, model, processor = built
    batch = make_batch(processor, 3, image_size=SIZES)
    input_ids, mask, _ = batch.side(role)
    reference = model.adapter.position_ids(input_ids, batch.image_grid_thw, mask,
                                           audio_frames=batch.audio_frames if role == "student" else None)
    ours = batch.position_ids(role)
    assert torch.equal(ours[:, mask.bool()], reference[:, mask.bool()])


def test_chat_template_pairs_teacher_and_student_answers(built):
    """The family's template: the typed and the spoken prompt share the system turn and the
    image, differ in the question (text vs the family's audio span), and end in the same
    answer tokens, closed by the turn's end token."""
    _, model, processor = built
    batch = make_batch(processor, 2, image_size=(56, 84))
    s_index, s_targets, s_counts = answer_index(batch.student_labels)
    t_index, t_targets, t_counts = answer_index(batch.teacher_labels)
    assert torch.equal(s_counts, t_counts) and torch.equal(s_targets, t_targets)
    end_id = processor.tokenizer.convert_tokens_to_ids(processor.turn_end)
    assert all(labels[labels != IGNORE_INDEX][-1] == end_id for labels in batch.student_labels)
    prefix = shared_prefix_length(batch)
    last_image = int((batch.student_input_ids[0] == processor.image_pad_id).nonzero().max())
    assert prefix > last_image, "the image is part of the prefix both sides share"
    student = processor.tokenizer.decode(batch.student_input_ids[0])
    teacher = processor.tokenizer.decode(batch.teacher_input_ids[0])
    assert processor.audio_span_tokens[0] in student and processor.audio_span_tokens[0] not in teacher
    assert "what colour is the circle?" in teacher and "<|im_start|>assistant" in student


def test_prefix_shared_teacher_equals_the_full_teacher(built):
    _, model, processor = built
    batch = make_batch(processor, 3, image_size=SIZES)
    with torch.no_grad():
        shared = SelfKDObjective(model, KD, share_prefix=True)(batch, 1.0)
        full = SelfKDObjective(model, KD, share_prefix=False)(batch, 1.0)
    assert shared.teacher_tokens < full.teacher_tokens
    for name in ("ce_sum", "kd_sum", "teacher_ce_sum", "agree_count", "n_tokens"):
        torch.testing.assert_close(getattr(shared, name), getattr(full, name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("parts", [("llm",), ("projector",), ("audio",), ("vision",), ("llm", "projector")])
def test_trainable_parts_map_to_the_family_modules(preset, parts):
    model, processor = build(preset, parts)
    thinker = model.vlm.model
    prefixes = {"llm": ("vlm.model.language_model.", "vlm.lm_head."), "vision": ("vlm.model.visual.",),
                "audio": ("vlm.model.audio_tower.",),
                "projector": tuple(f"vlm.model.audio_tower.{name}." for name in
                                   (("proj",) if preset == "tiny-qwen2_5_omni" else ("proj1", "proj2")))}
    expected = tuple(p for part in parts for p in prefixes[part])
    for name, param in model.named_parameters():
        trains = name.startswith(expected) and "audio_bos_eos_token" not in name
        assert param.requires_grad == trains, name
    out = SelfKDObjective(model, KD)(make_batch(processor, 2), 1.0)
    out.loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} trains but got no gradient"
    assert thinker is model.adapter.core


def test_export_loads_with_the_family_class_and_auto_processor(built, tmp_path):
    """save_omni writes the family's layout: <Family>ThinkerForConditionalGeneration and
    AutoProcessor load it, with the same logits; --model DIR reads it back as ours."""
    from transformers import AutoProcessor

    preset, model, processor = built
    save_omni(model, processor, str(tmp_path))
    _, thinker_cls, _ = native.THINKERS[processor.family]
    reloaded = thinker_cls.from_pretrained(str(tmp_path)).eval()
    batch = make_batch(processor, 2, image_size=SIZES[:2])
    mask = batch.student_attention_mask.bool()
    torch.testing.assert_close(hf_logits(reloaded, batch, "student")[mask], our_logits(model, batch, "student")[mask],
                               rtol=1e-5, atol=1e-5)
    hf_processor = AutoProcessor.from_pretrained(str(tmp_path))
    assert type(hf_processor).__name__ == native.FAMILY_PROCESSORS[processor.family]
    ours, again = load_omni(str(tmp_path))
    assert again.family == processor.family and again.tokenizer.chat_template == processor.tokenizer.chat_template
    sample = raw_sample("k", "what colour is the circle?", "red.", __import__("numpy").random.default_rng(0),
                        image_size=(56, 84), audio_seconds=1.0, sampling_rate=processor.sampling_rate)
    first, _ = SampleEncoder(processor, Stage.SELFKD, 4096)(sample)
    second, _ = SampleEncoder(again, Stage.SELFKD, 4096)(sample)
    assert first["student_prompt_ids"] == second["student_prompt_ids"]
    assert first["teacher_prompt_ids"] == second["teacher_prompt_ids"]


def test_a_full_model_checkpoint_loads_its_thinker_only(built, tmp_path):
    """A released checkpoint holds the whole model (model_type qwen2_5_omni / qwen3_omni_moe,
    thinker_config inside, weights under "thinker.", talker and vocoder beside them) and the
    processor files: the thinker loads, the rest is skipped."""
    from safetensors.torch import save_file

    _, model, processor = built
    state = {f"thinker.{k}": v.contiguous() for k, v in model.vlm.state_dict().items()}
    state["talker.model.embed_tokens.weight"] = torch.zeros(4, 4)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": processor.family, "thinker_config": model.vlm.config.to_dict(),
              "talker_config": {}, "enable_audio_output": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    processor.hf_processor().save_pretrained(str(tmp_path))  # no omni_processor.json: as released
    assert not os.path.exists(tmp_path / "omni_processor.json")
    loaded, loaded_processor = load_omni(str(tmp_path), dtype=torch.float32, attn_impl="sdpa")
    assert loaded_processor.family == processor.family
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_clip_too_short_for_the_audio_tower_is_a_counted_skip(built):
    """Qwen2.5-Omni's tower gives no token for a few milliseconds of audio: the sample is a
    counted bad_audio skip, not a placeholder-less prompt. Qwen3-Omni's gives one."""
    preset, model, processor = built
    raw = raw_sample("short", "what colour?", "red.", __import__("numpy").random.default_rng(0), image_size=None,
                     audio_seconds=0.005, sampling_rate=processor.sampling_rate)
    encoder = SampleEncoder(processor, Stage.SELFKD, 4096)
    if preset == "tiny-qwen3_omni":
        sample, _ = encoder(raw)
        assert sample["audio_token_count"] == 1
        return
    with pytest.raises(SampleError) as err:
        encoder(raw)
    assert err.value.reason == "bad_audio" and "too short" in str(err.value)


def test_generation_stops_at_the_family_turn_end(built):
    _, model, processor = built
    batch = make_batch(processor, 2, stage=Stage.EVAL, image_size=SIZES[:2])
    for mode in ("text", "audio"):
        ids = model.generate_ids(batch, mode, 5)
        assert len(ids) == 2 and all(len(row) <= 5 for row in ids)


def test_processor_files_round_trip(built, tmp_path):
    _, _, processor = built
    processor.save_pretrained(str(tmp_path))
    again = OmniProcessor.from_pretrained(str(tmp_path))
    assert (again.family, again.audio_pad_id, again.image_pad_id) == (processor.family, processor.audio_pad_id,
                                                                      processor.image_pad_id)
    assert again.audio_token_count(48_000) == processor.audio_token_count(48_000)
