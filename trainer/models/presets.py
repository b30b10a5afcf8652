"""Random-init models of real sizes, for benchmarks and throughput work without downloads:
`--model synthetic-2b` / `synthetic-8b` build the architecture of a Qwen2-VL-2B / -7B plus a
Whisper-large-v3 encoder (`synthetic-qwen3vl-8b`, `synthetic-internvl3-8b`: Qwen3-VL-8B's, InternVL3-8B's) (`overhead-2b` / `overhead-8b`: the same module structure at tiny widths
and a 1k vocabulary, for the framework's per-module overhead), with the locally built tokenizer of the tiny preset, an image
processor capped at 448x448 px (256 image tokens) and Whisper-large-v3's 128-bin, 30 s
feature extractor. Their weights are noise: they measure speed and memory, never quality.

    model, processor = build_preset("synthetic-2b", dtype=torch.bfloat16, init_ctx=...)
"""

from transformers import (GotOcr2ImageProcessor, InternVLConfig, Qwen2VLConfig, Qwen3VLConfig, WhisperConfig,
                          WhisperFeatureExtractor)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from trainer.models.processing import AUDIO_TOKENS, INTERNVL_IMAGE, OmniProcessor
from trainer.models.tiny import (INTERNVL_CHAT_TEMPLATE, INTERNVL_NAMED_TOKENS, INTERNVL_SPECIAL_TOKENS,
                                 QWEN2VL_SPECIAL_TOKENS, QWEN3VL_CHAT_TEMPLATE, build_tiny_tokenizer)

IMAGE_SIDE = 448  # px: 32 x 32 patches of 14 px, 2 x 2 merged -> 256 image tokens

# Qwen2-VL's text models (Qwen2-1.5B and Qwen2-7B), as in the released configs.
TEXT = {
    "synthetic-2b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "synthetic-8b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
# The overhead presets: synthetic-2b's / -8b's module structure (28 decoder layers and their heads, the
# 32-block ViT, the 32-layer Whisper encoder) at widths where compute is negligible (8 per head) and a
# 1k vocabulary, so a CPU step's time is mostly framework overhead: what a GPU waits on the host for.
OVERHEAD = {
    "overhead-2b": dict(vocab_size=1024, hidden_size=96, intermediate_size=192, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "overhead-8b": dict(vocab_size=1024, hidden_size=224, intermediate_size=448, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
TEXT.update(OVERHEAD)
# Qwen3-VL-8B-Instruct's released config (8.77B parameters): a Qwen3-8B decoder with interleaved M-RoPE and
# a 27-block ViT of 16 px patches whose blocks 8, 16 and 24 feed DeepStack.
QWEN3VL = {
    "synthetic-qwen3vl-8b": dict(
        text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                  rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True}),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                    hidden_act="gelu_pytorch_tanh", patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                    in_channels=3, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])),
}
# InternVL3-8B's released config (-hf layout; 7,944,373,760 parameters): InternViT-300M-448px-V2.5 on 448 px
# tiles, pixel shuffle 0.5 (256 tokens a tile), a Qwen2.5-7B decoder.
INTERNVL = {
    "synthetic-internvl3-8b": dict(
        text=dict(model_type="qwen2", vocab_size=151674, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=False),
        vision=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    image_size=[448, 448], patch_size=[14, 14], norm_type="layer_norm", use_qk_norm=False,
                    layer_scale_init_value=0.1, use_mean_pooling=True, use_absolute_position_embeddings=True,
                    attention_bias=True)),
}
PRESETS = (*TEXT, *QWEN3VL, *INTERNVL)


def preset_processor(audio_stack: int = 4, name: str = "synthetic-2b") -> OmniProcessor:
    """The presets' processor: the tiny tokenizer, the family's image processor capped at 448 x 448 px
    (Qwen3-VL: 16 px patches, mean and std 0.5), Whisper-large-v3's feature extractor."""
    if name in INTERNVL:  # InternVL's tiling: up to 12 crops of 448 px and a thumbnail
        tokenizer = build_tiny_tokenizer(special_tokens=INTERNVL_SPECIAL_TOKENS + list(AUDIO_TOKENS),
                                         chat_template=INTERNVL_CHAT_TEMPLATE, named_tokens=INTERNVL_NAMED_TOKENS)
        images = GotOcr2ImageProcessor(size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1,
                                       max_patches=12, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        return OmniProcessor(tokenizer, images, WhisperFeatureExtractor(feature_size=128, chunk_length=30),
                             audio_stack=audio_stack, vlm="internvl", image_seq_length=256)
    if name in QWEN3VL:
        images = Qwen2VLImageProcessor(patch_size=16, merge_size=2, min_pixels=32 * 32,
                                       max_pixels=IMAGE_SIDE * IMAGE_SIDE, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        tokenizer = build_tiny_tokenizer(chat_template=QWEN3VL_CHAT_TEMPLATE)
    else:
        images = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=IMAGE_SIDE * IMAGE_SIDE)
        tokenizer = build_tiny_tokenizer()
    return OmniProcessor(tokenizer, images, WhisperFeatureExtractor(feature_size=128, chunk_length=30),
                         audio_stack=audio_stack)


def vlm_config(name: str):
    special = {token: QWEN2VL_SPECIAL_TOKENS.index(token) for token in QWEN2VL_SPECIAL_TOKENS}
    ids = dict(image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
               vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"])
    if name in INTERNVL:
        spec = INTERNVL[name]
        text = dict(**spec["text"], bos_token_id=None, eos_token_id=special["<|im_end|>"],
                    pad_token_id=special["<|endoftext|>"])
        return InternVLConfig(text_config=text, vision_config=spec["vision"], image_seq_length=256, downsample_ratio=0.5,
                              projector_hidden_act="gelu", tie_word_embeddings=False,
                              image_token_id=INTERNVL_SPECIAL_TOKENS.index(INTERNVL_IMAGE[1]))
    if name in QWEN3VL:
        spec = QWEN3VL[name]
        return Qwen3VLConfig(text_config=dict(**spec["text"], bos_token_id=None, eos_token_id=special["<|im_end|>"],
                                              pad_token_id=special["<|endoftext|>"]),
                             vision_config=spec["vision"], tie_word_embeddings=False, **ids)
    text = TEXT[name]
    small = name in OVERHEAD  # head_dim 8: M-RoPE sections of 4 rotary pairs; a 64-wide ViT
    return Qwen2VLConfig(
        text_config=dict(
            **text, max_position_embeddings=32768, rope_theta=1e6,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2] if small else [16, 24, 24]},
            eos_token_id=special["<|im_end|>"], pad_token_id=special["<|endoftext|>"],
            **({"bos_token_id": special["<|endoftext|>"]} if small else {}),
        ),
        # The 675M ViT of every Qwen2-VL size; its merger projects into the LLM's width.
        vision_config=dict(depth=32, embed_dim=64 if small else 1280, num_heads=16, mlp_ratio=4, hidden_size=text["hidden_size"],
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"],
        tie_word_embeddings=text["tie_word_embeddings"],
    )


def whisper_large_v3_config(small: bool = False) -> WhisperConfig:
    """Whisper-large-v3's encoder (the decoder is never built); small: its 32 layers and 20 heads
    at width 80 (the overhead presets)."""
    d_model = 80 if small else 1280
    return WhisperConfig(
        num_mel_bins=128, d_model=d_model, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=2 * d_model if small else 5120,
        decoder_layers=1, decoder_attention_heads=20, decoder_ffn_dim=5120, max_source_positions=1500,
        vocab_size=64, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
    )
