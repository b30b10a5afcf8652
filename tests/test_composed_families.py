"""Every composed base (a Hugging Face VLM + Whisper + our projector) holds what Qwen2-VL holds,
at toy size from the family's real classes: the trainer's typed side against the family's own
forward, the collator's CPU positions against its get_rope_index, the prefix-shared teacher
against the full teacher pass, cached generation against a naive loop, trainable parts, and
export -> reload. Qwen3-VL adds DeepStack (image features of shape (N, 1 + D, H)) and
interleaved M-RoPE; InternVL tiles (crops + a thumbnail), pixel shuffle and 1-D positions, its
prompts equal InternVLProcessor's; the synthetic 8B presets are the released architectures by
parameter count."""

import inspect
import io

import pytest
import torch

from tests.test_model_omni import naive_greedy
from tests.test_native_omni import our_logits
from trainer.config import ModelConfig
from trainer.distill.loss import KDSettings
from trainer.distill.objective import SelfKDObjective
from trainer.models.factory import build_model
from trainer.models.serialize import load_omni, save_omni
from trainer.models.synthetic import make_batch

PRESETS = ["tiny", "tiny-qwen3vl", "tiny-internvl"]
KD = KDSettings(alpha=0.75, temperature=2.0, divergence="fkl")
# Two image shapes and a text-only sample: grids, image token counts and DeepStack rows differ per sample.
SIZES = [(56, 84), None, (96, 64)]


def build(preset, trainable=("llm", "projector")):
    return build_model(ModelConfig(model=preset, trainable=trainable, attn_impl="sdpa"))


@pytest.fixture(scope="module", params=PRESETS)
def built(request):
    model, processor = build(request.param)
    return request.param, model.eval(), processor


def family_logits(vlm, batch, role):
    """The VLM's own forward on one side's tokens and images (the typed side has no audio)."""
    input_ids, mask, _ = batch.side(role)
    if vlm.config.model_type == "internvl":  # its tiles, and 1-D positions over the real tokens (as generate() makes)
        side = vlm.config.vision_config.image_size[0]
        with torch.no_grad():
            return vlm(input_ids=input_ids, attention_mask=mask, pixel_values=batch.pixel_values.view(-1, 3, side, side),
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    kwargs = dict(input_ids=input_ids, attention_mask=mask, pixel_values=batch.pixel_values,
                  image_grid_thw=batch.image_grid_thw)
    if "mm_token_type_ids" in inspect.signature(vlm.forward).parameters:
        kwargs["mm_token_type_ids"] = (input_ids == vlm.config.image_token_id).int()
    with torch.no_grad():
        return vlm(**kwargs).logits


@pytest.mark.parametrize("stage", ["selfkd", "eval"])
def test_typed_side_equals_the_family_forward(built, stage):
    """Image features (with DeepStack rows), placeholders replaced in order and the collator's
    positions: the typed prompt's logits are the VLM's own, right- and left-padded (fp32, 1e-5)."""
    _, model, processor = built
    batch = make_batch(processor, 3, seed=3, image_size=SIZES, stage=stage)
    mask = batch.teacher_attention_mask.bool()
    torch.testing.assert_close(our_logits(model, batch, "teacher")[mask], family_logits(model.vlm, batch, "teacher")[mask],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", ["selfkd", "eval"])
def test_cpu_positions_equal_the_family_rope_index(built, stage):
    _, model, processor = built
    batch = make_batch(processor, 3, seed=6, image_size=SIZES, stage=stage)
    for role in ("student", "teacher"):
        input_ids, mask, _ = batch.side(role)
        reference = model.adapter.position_ids(input_ids, batch.image_grid_thw, mask)
        assert torch.equal(batch.position_ids(role)[:, mask.bool()], reference[:, mask.bool()]), role


@pytest.mark.parametrize("sizes", [SIZES, [(64, 64), (64, 64)]], ids=["mixed", "image-in-the-prefix"])
def test_prefix_shared_teacher_equals_the_full_teacher(built, sizes):
    """With one image size the image (and, for Qwen3-VL, its DeepStack additions) lies in the
    prefix the teacher reuses; with mixed sizes the images are recomputed after it."""
    _, model, processor = built
    batch = make_batch(processor, len(sizes), seed=4, image_size=sizes)
    with torch.no_grad():
        shared = SelfKDObjective(model, KD, share_prefix=True)(batch, 1.0)
        full = SelfKDObjective(model, KD, share_prefix=False)(batch, 1.0)
    assert shared.teacher_tokens < full.teacher_tokens
    for name in ("loss", "ce_sum", "kd_sum", "teacher_ce_sum", "agree_count", "n_tokens"):
        torch.testing.assert_close(getattr(shared, name), getattr(full, name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["text", "audio"])
def test_cached_generation_equals_the_naive_loop(built, mode):
    _, model, processor = built
    batch = make_batch(processor, 3, seed=1, image_size=SIZES, stage="eval")
    with torch.no_grad():
        fast = model.generate_ids(batch, mode, 5, synced_gpus=True)
        slow = naive_greedy(model, batch, "teacher" if mode == "text" else "student", 5)
    assert fast == slow


PART_PREFIXES = {
    "llm": ("vlm.model.language_model.", "vlm.lm_head."), "vision": ("vlm.model.visual.",),
    "audio": ("audio_encoder.",), "projector": ("projector.",),
}
VISION = {"tiny-internvl": ("vlm.model.vision_tower.", "vlm.model.multi_modal_projector.")}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("parts", [("llm",), ("vision",), ("audio", "projector")])
def test_trainable_parts_map_to_the_family_modules(preset, parts):
    model, processor = build(preset, parts)
    expected = tuple(prefix for part in parts
                     for prefix in (VISION.get(preset, PART_PREFIXES[part]) if part == "vision" else PART_PREFIXES[part]))
    for name, param in model.named_parameters():
        trains = name.startswith(expected) and "embed_positions" not in name  # Whisper's sinusoids never train
        assert param.requires_grad == trains, name
    SelfKDObjective(model, KD)(make_batch(processor, 2, image_size=(64, 96)), 1.0).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} trains but got no gradient"


def test_export_reloads_with_the_engine_logits(built, tmp_path):
    preset, model, processor = built
    save_omni(model, processor, str(tmp_path))
    again, again_processor = load_omni(str(tmp_path), dtype=torch.float32, attn_impl="sdpa")
    assert type(again.adapter) is type(model.adapter)
    assert again_processor.tokenizer.chat_template == processor.tokenizer.chat_template
    assert type(again_processor.image_processor) is type(processor.image_processor)
    assert (again_processor.vlm, again_processor.image_seq_length) == (processor.vlm, processor.image_seq_length)
    batch = make_batch(processor, 3, seed=2, image_size=SIZES)
    for role in ("student", "teacher"):
        mask = batch.side(role)[1].bool()
        torch.testing.assert_close(our_logits(again.eval(), batch, role)[mask], our_logits(model, batch, role)[mask],
                                   rtol=0, atol=0)


def test_qwen3vl_deepstack_reaches_the_decoder():
    """The image features carry one row per DeepStack level, and those rows change the typed
    logits: zeroing them is not the same model."""
    model, processor = build("tiny-qwen3vl")
    model.eval()
    batch = make_batch(processor, 2, seed=5, image_size=(64, 96))
    images, _ = model.encode_images(batch)
    assert images.shape[1] == 1 + len(model.vlm.config.vision_config.deepstack_visual_indexes) == 1 + model.adapter.deepstack
    with torch.no_grad():
        hidden, _ = model.run_side(batch, "teacher", images, None)
        flat = torch.cat([images[:, :1], torch.zeros_like(images[:, 1:])], dim=1)
        without, _ = model.run_side(batch, "teacher", flat, None)
    assert not torch.allclose(hidden, without)


def test_synthetic_qwen3vl_8b_is_the_released_architecture():
    """Built on the meta device (8B fp32 weights do not fit this machine): the VLM has
    Qwen3-VL-8B-Instruct's 8,767,123,696 parameters, its ViT 576,388,336, with whisper-large-v3's
    encoder (637M) beside it."""
    from transformers import Qwen3VLForConditionalGeneration

    from trainer.models.presets import vlm_config, whisper_large_v3_config
    from trainer.models.omni import ZeroSafeWhisperEncoder

    with torch.device("meta"):
        vlm = Qwen3VLForConditionalGeneration(vlm_config("synthetic-qwen3vl-8b"))
        whisper = ZeroSafeWhisperEncoder(whisper_large_v3_config())
    assert sum(p.numel() for p in vlm.parameters()) == 8_767_123_696
    assert sum(p.numel() for p in vlm.model.visual.parameters()) == 576_388_336
    assert round(sum(p.numel() for p in whisper.parameters()) / 1e6) == 637


@pytest.mark.parametrize("preset", PRESETS)
def test_lora_adapts_the_llm_only_and_adapters_off_is_the_start(preset):
    """LoRA on a composed base: adapters on the decoder's attention and MLP projections only (not
    the ViT's or Whisper's), and with them off the typed side is the start model's (1e-5)."""
    from tests.dist_logits import answer_logits
    from tests.test_lora import trained_like
    from trainer.models import lora

    start, processor = build(preset)
    model, _ = build_model(ModelConfig(model=preset, attn_impl="sdpa", lora_r=4, lora_alpha=8.0,
                                       trainable=("llm", "projector")))
    names = lora.adapter_names(model)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"}
    assert all(n.startswith("vlm.model.language_model.") for n in names)
    trained_like(model)
    batch = make_batch(processor, 2, seed=8, image_size=(64, 96))
    with lora.adapters_disabled(model):
        off = answer_logits(model.eval(), batch, "teacher")
    torch.testing.assert_close(off, answer_logits(start.eval(), batch, "teacher"), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(answer_logits(model, batch, "teacher"), off)


@pytest.mark.parametrize("family", ["qwen3vl", "internvl"])
def test_vlm_dir_composes_a_checkpoint_with_whisper(family, tmp_path):
    """--vlm DIR --audio_encoder DIR on a checkpoint saved as released (the family's processor
    files: tokenizer, image processor, chat template) and a Whisper checkpoint: the VLM's and the
    encoder's weights load unchanged, the processor is the checkpoint's, and a step runs."""
    from transformers import (InternVLForConditionalGeneration, InternVLProcessor, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, WhisperForConditionalGeneration)
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from trainer.models import tiny

    torch.manual_seed(2)
    if family == "qwen3vl":
        ours = tiny.build_tiny_qwen3vl_processor()
        vlm = Qwen3VLForConditionalGeneration(tiny.tiny_qwen3vl_config(len(ours.tokenizer)))
        hf = Qwen3VLProcessor(image_processor=ours.image_processor, tokenizer=ours.tokenizer,
                              video_processor=Qwen3VLVideoProcessor(), chat_template=ours.tokenizer.chat_template)
    else:
        ours = tiny.build_tiny_internvl_processor()
        vlm = InternVLForConditionalGeneration(tiny.tiny_internvl_config(len(ours.tokenizer)))
        hf = InternVLProcessor(image_processor=ours.image_processor, tokenizer=ours.tokenizer,
                               video_processor=InternVLVideoProcessor(), image_seq_length=ours.image_seq_length,
                               chat_template=ours.tokenizer.chat_template)
    vlm.save_pretrained(tmp_path / "vlm")
    hf.save_pretrained(tmp_path / "vlm")
    whisper_config = tiny.tiny_whisper_config(80, 1000)
    whisper_config.pad_token_id = whisper_config.bos_token_id = whisper_config.eos_token_id = 0
    whisper_config.decoder_start_token_id = 0
    whisper = WhisperForConditionalGeneration(whisper_config)
    whisper.save_pretrained(tmp_path / "whisper")
    ours.feature_extractor.save_pretrained(tmp_path / "whisper")
    model, processor = build_model(ModelConfig(vlm=str(tmp_path / "vlm"), audio_encoder=str(tmp_path / "whisper"),
                                               attn_impl="sdpa"), dtype=torch.float32)
    assert type(model.adapter).__name__ == {"qwen3vl": "Qwen3VLAdapter", "internvl": "InternVLAdapter"}[family]
    for name, weight in vlm.state_dict().items():
        assert torch.equal(model.vlm.state_dict()[name], weight), name
    for name, weight in whisper.model.encoder.state_dict().items():
        assert torch.equal(model.audio_encoder.state_dict()[name], weight), name
    assert processor.tokenizer.chat_template == ours.tokenizer.chat_template
    assert type(processor.image_processor) is type(ours.image_processor)
    assert (processor.vlm, processor.image_seq_length) == (ours.vlm, ours.image_seq_length)
    out = SelfKDObjective(model, KD)(make_batch(processor, 2, image_size=(64, 96)), 1.0)
    assert torch.isfinite(out.loss)
    # A template that writes no image placeholder (an early InternVL -hf one wrote "<image>") is refused.
    hf.chat_template = hf.tokenizer.chat_template = ours.tokenizer.chat_template.replace(
        "<IMG_CONTEXT>" if family == "internvl" else "<|image_pad|>", "<image>")
    hf.save_pretrained(tmp_path / "vlm")
    with pytest.raises(ValueError, match="without the model's image placeholder"):
        build_model(ModelConfig(vlm=str(tmp_path / "vlm"), audio_encoder=str(tmp_path / "whisper"), attn_impl="sdpa"))


def test_internvl_prompts_and_tiles_are_internvl_processors(tmp_path):
    """The sample encoder's typed prompt and tiles for a picture equal InternVLProcessor's on the
    same chat-template text: <img>, 4 tokens per tile for crops + thumbnail, </img>."""
    import numpy as np
    from PIL import Image
    from transformers import InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    from trainer.data.batch import Stage
    from trainer.data.collate import SampleEncoder
    from trainer.models.synthetic import raw_sample

    _, processor = build("tiny-internvl")
    hf = InternVLProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                           video_processor=InternVLVideoProcessor(),
                           image_seq_length=processor.image_seq_length, chat_template=processor.tokenizer.chat_template)
    sample = raw_sample("k", "what colour is the circle?", "red.", np.random.default_rng(0), image_size=(64, 150),
                        audio_seconds=1.0, sampling_rate=processor.sampling_rate)
    encoded, _ = SampleEncoder(processor, Stage.SELFKD, 4096)(sample)
    image = Image.open(io.BytesIO(sample["png"])).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the circle?"}]}]
    text = hf.apply_chat_template(messages, add_generation_prompt=True)
    reference = hf(images=[image], text=[text], return_tensors="pt")
    assert encoded["teacher_prompt_ids"] == reference["input_ids"][0].tolist()
    tiles = reference["pixel_values"]
    assert tiles.shape[0] > 1, "want a cropped picture (crops + thumbnail)"
    torch.testing.assert_close(encoded["image"]["pixel_values"], tiles.flatten(1))


def test_synthetic_internvl3_8b_is_the_released_architecture():
    """InternVL3-8B (-hf): 7,944,373,760 parameters, InternViT-300M 304,012,288, on the meta device."""
    from transformers import InternVLForConditionalGeneration

    from trainer.models.presets import vlm_config

    with torch.device("meta"):
        vlm = InternVLForConditionalGeneration(vlm_config("synthetic-internvl3-8b"))
    assert sum(p.numel() for p in vlm.parameters()) == 7_944_373_760
    assert sum(p.numel() for p in vlm.model.vision_tower.parameters()) == 304_012_288
