"""Native omni models (Qwen2.5-Omni and Qwen3-Omni thinkers, Phi-4-multimodal) at toy size,
random init, built from their real transformers classes: the trainer's piecewise path against the family's own
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
from trainer.models.factory import build_model
from trainer.models.processing import OmniProcessor
from trainer.models.serialize import load_omni, save_omni
from trainer.models.synthetic import make_batch, raw_sample

PRESETS = ["tiny-qwen2_5_omni", "tiny-qwen3_omni", "tiny-phi4mm"]
QWEN = PRESETS[:2]
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
    width = batch.input_features.shape[-1]
    valid = torch.arange(width)[None] < batch.audio_frames[:, None]  # B, W
    if thinker.config.model_type == "phi4_multimodal":
        kwargs = dict(input_ids=input_ids, attention_mask=mask, image_pixel_values=batch.pixel_values,
                      image_sizes=batch.image_sizes, image_attention_mask=batch.image_attention_mask)
        if role == "student":
            kwargs.update(audio_input_features=batch.input_features.transpose(1, 2),
                          audio_embed_sizes=batch.audio_token_counts, audio_attention_mask=valid)
        with torch.no_grad():
            return thinker(**kwargs).logits
    kwargs = dict(input_ids=input_ids, attention_mask=mask, pixel_values=batch.pixel_values,
                  image_grid_thw=batch.image_grid_thw)
    if role == "student":
        kwargs.update(input_features=batch.input_features, feature_attention_mask=valid.long())
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
    replaced in order, CPU M-RoPE positions: the same logits as the thinker's own forward.
    (Phi-4 picks its audio projection per batch where we pick it per clip: compared on
    batches whose clips all have, or all lack, an image; mixed batches below.)"""
    preset, model, processor = built
    size_sets = [[SIZES[0], SIZES[2], SIZES[0]], None] if preset == "tiny-phi4mm" else [SIZES]
    for sizes in size_sets:
        batch = make_batch(processor, 3, image_size=sizes, with_image=sizes is not None, audio_seconds=(0.6, 3.0))
        mask = batch.side(role)[1].bool()
        torch.testing.assert_close(our_logits(model, batch, role)[mask], hf_logits(model.vlm, batch, role)[mask],
                                   rtol=1e-5, atol=1e-5)


def test_phi4_projects_each_clip_as_its_own_prompt_would():
    """In a batch mixing image and text-only questions, each spoken question gets the audio
    projection the model's forward gives it alone: vision-speech with an image, speech without."""
    import numpy as np

    from trainer.data.collate import collate_train

    model, processor = build("tiny-phi4mm")
    model.eval()
    encoder = SampleEncoder(processor, Stage.SELFKD, 4096)
    rng = np.random.default_rng(0)
    raws = [raw_sample(f"k{i}", "what colour is the circle?", "red.", rng, image_size=size, audio_seconds=1.0,
                       sampling_rate=processor.sampling_rate) for i, size in enumerate([(56, 84), None])]
    samples = [encoder(raw)[0] for raw in raws]
    mixed = collate_train(samples, processor.pad_id)
    ours = our_logits(model, mixed, "student")
    for i, sample in enumerate(samples):
        alone = collate_train([sample], processor.pad_id)
        n = int(alone.student_attention_mask.sum())
        torch.testing.assert_close(ours[i, :n], hf_logits(model.vlm, alone, "student")[0, :n], rtol=1e-5, atol=1e-5)


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
    assert "what colour is the circle?" in teacher
    prompt_ends = []
    for role, labels in (("student", batch.student_labels), ("teacher", batch.teacher_labels)):
        ids, mask, _ = batch.side(role)
        prompt_ends.append(ids[0][mask[0].bool() & (labels[0] == IGNORE_INDEX)][-2:].tolist())
    assert prompt_ends[0] == prompt_ends[1], "both prompts end in the template's assistant header"


def test_prefix_shared_teacher_equals_the_full_teacher(built):
    _, model, processor = built
    batch = make_batch(processor, 3, image_size=SIZES)
    with torch.no_grad():
        shared = SelfKDObjective(model, KD, share_prefix=True)(batch, 1.0)
        full = SelfKDObjective(model, KD, share_prefix=False)(batch, 1.0)
    assert shared.teacher_tokens < full.teacher_tokens
    for name in ("ce_sum", "kd_sum", "teacher_ce_sum", "agree_count", "n_tokens"):
        torch.testing.assert_close(getattr(shared, name), getattr(full, name), rtol=1e-5, atol=1e-5)


PHI4 = "vlm.model.embed_tokens_extend."
PART_PREFIXES = {
    "tiny-qwen2_5_omni": {"llm": ("vlm.model.language_model.", "vlm.lm_head."), "vision": ("vlm.model.visual.",),
                          "audio": ("vlm.model.audio_tower.",), "projector": ("vlm.model.audio_tower.proj.",)},
    "tiny-qwen3_omni": {"llm": ("vlm.model.language_model.", "vlm.lm_head."), "vision": ("vlm.model.visual.",),
                        "audio": ("vlm.model.audio_tower.",),
                        "projector": ("vlm.model.audio_tower.proj1.", "vlm.model.audio_tower.proj2.")},
    "tiny-phi4mm": {"llm": ("vlm.model.embed_tokens.", "vlm.model.layers.", "vlm.model.norm.", "vlm.lm_head."),
                    "vision": (PHI4 + "image_embed.",), "audio": (PHI4 + "audio_embed.encoder.",),
                    "projector": tuple(f"{PHI4}audio_embed.{side}_proj_for_{kind}." for side in ("up", "down")
                                       for kind in ("speech", "vision_speech"))},
}
# Never trained: unused by any forward (Qwen2.5-Omni's audio bos/eos table; SigLIP past its feature layer).
NEVER = ("audio_bos_eos_token", "img_processor.encoder.layers.1.", "img_processor.post_layernorm.",
         "img_processor.head.")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("parts", [("llm",), ("projector",), ("audio",), ("vision",), ("llm", "projector")])
def test_trainable_parts_map_to_the_family_modules(preset, parts):
    model, processor = build(preset, parts)
    expected = tuple(p for part in parts for p in PART_PREFIXES[preset][part])
    for name, param in model.named_parameters():
        trains = name.startswith(expected) and not any(never in name for never in NEVER)
        assert param.requires_grad == trains, name
    out = SelfKDObjective(model, KD)(make_batch(processor, 2), 1.0)
    out.loss.backward()
    # Phi-4 projects speech with one of two pairs, per batch (these batches have images).
    idle = "_proj_for_speech." if preset == "tiny-phi4mm" else None
    for name, param in model.named_parameters():
        if param.requires_grad and not (idle and idle in name):
            assert param.grad is not None, f"{name} trains but got no gradient"


def test_export_loads_with_the_family_class_and_auto_processor(built, tmp_path):
    """save_omni writes the family's layout: <Family>ThinkerForConditionalGeneration and
    AutoProcessor load it, with the same logits; --model DIR reads it back as ours."""
    from transformers import AutoProcessor

    preset, model, processor = built
    save_omni(model, processor, str(tmp_path))
    _, thinker_cls, _ = native.THINKERS[processor.family]
    reloaded = thinker_cls.from_pretrained(str(tmp_path)).eval()
    type(model.adapter)(reloaded)  # the upstream fixes the trainer applies (Phi-4's bidirectional SigLIP)
    batch = make_batch(processor, 2, image_size=[SIZES[0], SIZES[2]])  # both with an image (Phi-4: one projection)
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


@pytest.mark.parametrize("preset", QWEN)
def test_a_full_model_checkpoint_loads_its_thinker_only(preset, tmp_path):
    """A released checkpoint holds the whole model (model_type qwen2_5_omni / qwen3_omni_moe,
    thinker_config inside, weights under "thinker.", talker and vocoder beside them) and the
    processor files: the thinker loads, the rest is skipped."""
    from safetensors.torch import save_file

    model, processor = build(preset)
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
    """Qwen2.5-Omni's and Phi-4's towers give no token for a few milliseconds of audio: the
    sample is a counted bad_audio skip, not a placeholder-less prompt. Qwen3-Omni's gives one."""
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


def test_synthetic_qwen2_5_omni_7b_is_the_released_thinker_architecture():
    """Built on the meta device (no memory): the Qwen2.5-Omni-7B thinker's parameter counts
    (7.07B LLM with embeddings, 0.68B ViT, 0.64B audio tower, 0.54B LM head; 8.93B)."""
    processor = native.tiny_processor("qwen2_5_omni", max_pixels=448 * 448, num_mel_bins=128, chunk_seconds=30)
    config = native.synthetic_config("synthetic-qwen2_5_omni-7b", processor)
    with torch.device("meta"):
        thinker = native.build_thinker(config, dtype=torch.bfloat16)

    def billions(module):
        return round(sum(p.numel() for p in module.parameters()) / 1e9, 2)

    core = thinker.model
    assert (billions(core.language_model), billions(core.visual), billions(core.audio_tower),
            billions(thinker.lm_head), billions(thinker)) == (7.07, 0.68, 0.64, 0.54, 8.93)
