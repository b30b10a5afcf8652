"""Native omni models: a family's own thinker (audio tower + vision tower + LLM) trained as it
is, with its own placeholders, processor and chat template. The talker and the vocoder
(token2wav / code2wav) of a full checkpoint are neither loaded nor trained.

  --model tiny-qwen2_5_omni          random-init Qwen2.5-Omni thinker at toy size (tests, CPU)
  --model tiny-qwen3_omni            random-init Qwen3-Omni thinker (mixture-of-experts LLM)
  --model tiny-phi4mm                random-init Phi-4-multimodal (448 px crops: 545 tokens per image)
  --model synthetic-qwen2_5_omni-7b  the Qwen2.5-Omni-7B thinker's architecture, random weights
  --model DIR                        a Hugging Face checkpoint of the full model or of its thinker

Tiny presets get a tokenizer trained here with the family's special tokens in the family's
id order, a chat template modelled on the family's, and processors capped at 112x112 px and
10 s of audio, so a CPU step stays cheap.
"""

import contextlib
import json
import os

import torch
from transformers import (Phi4MultimodalConfig, Phi4MultimodalFeatureExtractor, Phi4MultimodalForCausalLM,
                          Phi4MultimodalImageProcessor, Qwen2_5OmniThinkerConfig,
                          Qwen2_5OmniThinkerForConditionalGeneration,
                          Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration,
                          WhisperFeatureExtractor)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from trainer.models.processing import OmniProcessor, native_family_of
from trainer.models.tiny import build_tiny_tokenizer

# family -> (thinker config class, thinker class, the full model's config attribute holding the thinker's)
THINKERS = {
    "qwen2_5_omni": (Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration, "thinker_config"),
    "qwen3_omni_moe": (Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration, "thinker_config"),
    "phi4_multimodal": (Phi4MultimodalConfig, Phi4MultimodalForCausalLM, None),  # no thinker: the model itself
}
FAMILY_PROCESSORS = {"qwen2_5_omni": "Qwen2_5OmniProcessor", "qwen3_omni_moe": "Qwen3OmniMoeProcessor",
                     "phi4_multimodal": "Phi4MultimodalProcessor"}
TINY = {"tiny-qwen2_5_omni": "qwen2_5_omni", "tiny-qwen3_omni": "qwen3_omni_moe", "tiny-phi4mm": "phi4_multimodal"}
SYNTHETIC = {"synthetic-qwen2_5_omni-7b": "qwen2_5_omni"}
PRESETS = (*TINY, *SYNTHETIC)

# The families' special tokens in their released id order (151643 + i there, i here).
QWEN2_5_OMNI_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
                       "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_bos|>", "<|vision_eos|>",
                       "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>"]
QWEN3_OMNI_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                     "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                     "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<|audio_start|>",
                     "<|audio_end|>", "<|audio_pad|>"]
NAMED_TOKENS = {
    "qwen2_5_omni": {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
                     "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                     "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"},
    "qwen3_omni_moe": {"image_token": "<|image_pad|>", "audio_token": "<|audio_pad|>", "video_token": "<|video_pad|>",
                       "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
                       "audio_bos_token": "<|audio_start|>", "audio_eos_token": "<|audio_end|>"},
}


def _chat_template(image: str, audio: str, video: str, default_system: str | None) -> str:
    """The Qwen omni chat templates' shape: content lists of image / audio / video / text
    items; Qwen2.5-Omni adds a default system turn, Qwen3-Omni does not."""
    system = ("{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + default_system
              + "<|im_end|>\n{% endif %}") if default_system else ""
    return (
        "{% for message in messages %}" + system + "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
        "{% for content in message['content'] %}"
        "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}" + image +
        "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}" + audio +
        "{% elif content['type'] == 'video' or 'video' in content %}" + video +
        "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


PHI4_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>",
               "<|image|>", "<|audio|>"]
# Phi-4-multimodal's template: <|role|>content<|end|>, images and audio as bare placeholders.
PHI4_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif content['type'] == 'audio' %}{{ '<|audio|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

TEMPLATES = {
    "phi4_multimodal": PHI4_TEMPLATE,
    "qwen2_5_omni": _chat_template("<|vision_bos|><|IMAGE|><|vision_eos|>", "<|audio_bos|><|AUDIO|><|audio_eos|>",
                                   "<|vision_bos|><|VIDEO|><|vision_eos|>", "You are a helpful assistant."),
    "qwen3_omni_moe": _chat_template("<|vision_start|><|image_pad|><|vision_end|>",
                                     "<|audio_start|><|audio_pad|><|audio_end|>",
                                     "<|vision_start|><|video_pad|><|vision_end|>", None),
}
SPECIAL_TOKENS = {"qwen2_5_omni": QWEN2_5_OMNI_TOKENS, "qwen3_omni_moe": QWEN3_OMNI_TOKENS, "phi4_multimodal": PHI4_TOKENS}
NAMED_TOKENS["phi4_multimodal"] = {"image_token": "<|image|>", "audio_token": "<|audio|>"}


def tiny_processor(family: str, *, max_pixels: int = 112 * 112, num_mel_bins: int = 80,
                   chunk_seconds: int = 10, vocab_size: int = 512) -> OmniProcessor:
    """A locally built processor of `family`: tokenizer, image processor at the family's
    patch size, Whisper-style log-mel feature extractor (Phi-4: its own image processor and
    fbank extractor at their released settings; its crops are fixed at 448 px)."""
    if family == "phi4_multimodal":
        tokenizer = build_tiny_tokenizer(vocab_size, PHI4_TOKENS, PHI4_TEMPLATE, NAMED_TOKENS[family],
                                         eos_token="<|endoftext|>")
        return OmniProcessor(tokenizer, Phi4MultimodalImageProcessor(), Phi4MultimodalFeatureExtractor(), family=family)
    tokenizer = build_tiny_tokenizer(vocab_size, SPECIAL_TOKENS[family], TEMPLATES[family], NAMED_TOKENS[family])
    patch = 16 if family == "qwen3_omni_moe" else 14
    image_processor = Qwen2VLImageProcessor(patch_size=patch, merge_size=2, min_pixels=(2 * patch) ** 2,
                                            max_pixels=max_pixels)
    feature_extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, chunk_length=chunk_seconds)
    return OmniProcessor(tokenizer, image_processor, feature_extractor, family=family)


def _token_ids(processor: OmniProcessor) -> dict:
    vocab = processor.tokenizer.get_vocab()
    span = processor.audio_span_tokens
    named = NAMED_TOKENS[processor.family]
    return dict(image_token_id=vocab[named["image_token"]], video_token_id=vocab[named["video_token"]],
                audio_token_id=vocab[span[1]], audio_start_token_id=vocab[span[0]],
                vision_start_token_id=vocab[named["vision_bos_token"]],
                vision_end_token_id=vocab[named["vision_eos_token"]])


def tiny_phi4_config(processor: OmniProcessor) -> Phi4MultimodalConfig:
    """A 2-layer Phi-4-multimodal: 64-d LLM with LongRoPE (partial rotary 0.75, as released),
    2-layer 32-d SigLIP on 448 px crops (the processor's fixed geometry), 2-block 32-d conformer."""
    tokenizer = processor.tokenizer
    head_dim = 16
    rotary = int(head_dim * 0.75) // 2
    return Phi4MultimodalConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=131072, original_max_position_embeddings=4096,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0] * rotary, "long_factor": [1.5] * rotary,
                         "original_max_position_embeddings": 4096},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id],
        pad_token_id=processor.pad_id, tie_word_embeddings=False, embd_pdrop=0.0,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=448, patch_size=14, crop_size=448, image_token_id=processor.image_pad_id,
                           feature_layer=-2),
        audio_config=dict(hidden_size=32, intermediate_size=48, num_blocks=2, num_attention_heads=4,
                          ext_pw_out_channel=32, depthwise_separable_out_channel=32, nemo_conv_channels=16,
                          bias_max_distance=500, input_size=processor.num_mel_bins, time_reduction=8, chunk_size=-1,
                          left_chunk=18, audio_token_id=processor.audio_pad_id),
    )


def tiny_config(family: str, processor: OmniProcessor):
    """A 2-layer thinker: 64-d LLM, 2-block 32-d vision tower, 2-layer 32-d audio tower. The
    Qwen3-Omni one has 8 experts, 2 per token, in both LLM layers, and a DeepStack feature
    from the first vision block."""
    if family == "phi4_multimodal":
        return tiny_phi4_config(processor)
    ids = _token_ids(processor)
    special = {"eos_token_id": processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), "pad_token_id": processor.pad_id}
    text = dict(vocab_size=len(processor.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, **special)
    audio = dict(num_mel_bins=processor.num_mel_bins, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                 encoder_ffn_dim=64, output_dim=64, max_source_positions=1500)
    if family == "qwen2_5_omni":
        ids["audio_token_index"] = ids.pop("audio_token_id")
        ids["image_token_index"] = ids.pop("image_token_id")
        ids["video_token_index"] = ids.pop("video_token_id")
        ids["audio_end_token_id"] = processor.audio_end_id
        ids.pop("vision_end_token_id")
        return Qwen2_5OmniThinkerConfig(
            text_config=dict(**text, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56,
                               fullatt_block_indexes=[1]),
            audio_config=dict(**audio, n_window=100), **ids)
    ids.pop("vision_end_token_id")
    return Qwen3OmniMoeThinkerConfig(
        text_config=dict(**text, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                         norm_topk_prob=True, head_dim=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        audio_config=dict(**audio, n_window=50, n_window_infer=400, downsample_hidden_size=16, conv_chunksize=500),
        **ids)


def synthetic_config(name: str, processor: OmniProcessor):
    """The released thinker's architecture (Qwen2.5-Omni-7B: 7.6B LLM, 675M ViT, 640M audio
    tower), with this processor's token ids and vocabulary rounded up as released."""
    ids = _token_ids(processor)
    ids.pop("vision_end_token_id")
    ids = {"audio_token_index": ids.pop("audio_token_id"), "image_token_index": ids.pop("image_token_id"),
           "video_token_index": ids.pop("video_token_id"), "audio_end_token_id": processor.audio_end_id, **ids}
    special = {"eos_token_id": processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), "pad_token_id": processor.pad_id}
    return Qwen2_5OmniThinkerConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                         **special),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31]),
        audio_config=dict(num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                          encoder_ffn_dim=5120, output_dim=3584, n_window=100, max_source_positions=1500),
        **ids)


def thinker_config_of(path: str):
    """The thinker config of a native checkpoint: config.json of the thinker itself, or the
    `thinker_config` inside a full model's."""
    family = native_family_of(path)
    config_cls, _, attribute = THINKERS[family]
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    if raw.get("model_type") == config_cls.model_type or attribute is None:
        return config_cls.from_pretrained(path)
    return config_cls(**{k: v for k, v in raw[attribute].items() if k != "model_type"})


def load_thinker(path: str, *, dtype=torch.bfloat16, attn_impl: str = "sdpa"):
    """The thinker of a native checkpoint, weights loaded. A full model's checkpoint keeps
    them under "thinker."; the talker's and the vocoder's weights are skipped unread."""
    family = native_family_of(path)
    _, thinker_cls, _ = THINKERS[family]
    config = thinker_config_of(path)
    with open(os.path.join(path, "config.json")) as f:
        full = json.load(f).get("model_type") != config.model_type  # a whole model holding the thinker
    kwargs = {"key_mapping": {r"^thinker\.": ""}} if full else {}
    thinker, info = thinker_cls.from_pretrained(path, config=config, dtype=dtype, attn_implementation=attn_impl,
                                                output_loading_info=True, **kwargs)
    if info["missing_keys"]:
        raise ValueError(f"{path}: thinker weights missing: {sorted(info['missing_keys'])[:8]}")
    return thinker


def build_thinker(config, *, dtype=torch.float32, attn_impl: str = "sdpa", init_ctx=contextlib.nullcontext):
    """Random-init thinker of `config` (under ZeRO-3 Hugging Face builds it partitioned while
    an HfDeepSpeedConfig is alive; see trainer/models/build.py)."""
    family = next(f for f, (config_cls, _, _) in THINKERS.items() if isinstance(config, config_cls))
    config._attn_implementation = attn_impl
    return THINKERS[family][1]._from_config(config, dtype=dtype)
