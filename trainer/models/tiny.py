"""The `tiny` preset: real Qwen2-VL and Whisper classes at toy size, random weights, and
a tokenizer trained here from a built-in corpus. Nothing is downloaded, so tests and the
demo run on any machine. The image processor keeps pictures small (at most 112x112 px,
i.e. 16 image tokens) so a CPU step stays cheap. The `toy` preset (TOY, TOY_AUDIO_DIM, TOY_MAX_PIXELS) is the same classes
larger, for the toy Self-KD vs SFT study.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GotOcr2ImageProcessor, InternVLConfig, PreTrainedTokenizerFast, Qwen2VLConfig, Qwen3VLConfig,
                          WhisperConfig, WhisperFeatureExtractor)
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from trainer.models.processing import AUDIO_TOKENS, INTERNVL_IMAGE, OmniProcessor

# Qwen2-VL's own special tokens, in its id order, so chat templates and the model's
# image/video token ids work unchanged.
QWEN2VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat template (the image/video/text content-list form).
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's chat template for image and text content: Qwen2-VL's without the default system turn.
QWEN3VL_CHAT_TEMPLATE = QWEN2VL_CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}", "")
assert QWEN3VL_CHAT_TEMPLATE != QWEN2VL_CHAT_TEMPLATE

# InternVL (-hf): Qwen2.5's tokens, then its image tokens; an image is one <IMG_CONTEXT> line in the
# template, which the processor expands to <img> + image_seq_length x tiles <IMG_CONTEXT> + </img>.
INTERNVL_SPECIAL_TOKENS = QWEN2VL_SPECIAL_TOKENS + [*INTERNVL_IMAGE, "<video>"]
INTERNVL_NAMED_TOKENS = {"start_image_token": INTERNVL_IMAGE[0], "context_image_token": INTERNVL_IMAGE[1],
                         "end_image_token": INTERNVL_IMAGE[2], "video_token": "<video>"}
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_INTERNVL_TILE = 56  # px: 4 x 4 patches of 14 px, pixel-shuffled to 2 x 2 = 4 tokens per tile

# Enough English for the demo's questions and answers and for LLaVA-style prompts.
_CORPUS = """
what colour is the shape in the image? the circle is red. the square is blue. the triangle is green.
how many shapes are there? there are two shapes. there are three circles. one two three four five six seven eight nine ten.
is there a yellow star on the left? yes. no. the star is on the right. the purple square is at the top.
which shape is at the bottom? a) circle b) square c) triangle d) star. answer with the option letter.
where is the orange circle? it is in the centre of the picture, near the middle, below the blue square.
describe the image in detail. a man is riding a horse in front of a white fence. a cat sits on a table.
transcribe the audio. please repeat what you heard. the quick brown fox jumps over the lazy dog.
0 1 2 3 4 5 6 7 8 9 10 100 % $ . , ? ! : ; ' " ( ) - + = / a b c d e f g h i j k l m n o p q r s t u v w x y z
A B C D E F G H I J K L M N O P Q R S T U V W X Y Z You are a helpful assistant. Answer the question using a single word or phrase.
"""


def build_tiny_tokenizer(vocab_size: int = 512, special_tokens: list | None = None, chat_template: str | None = None,
                         named_tokens: dict | None = None, eos_token: str = "<|im_end|>") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the built-in corpus. Default: Qwen2-VL's special
    tokens (ids 0..13, then the three audio tokens) and chat template; the native omni tiny
    presets pass their family's tokens (in that family's id order), template, and the named
    tokens its transformers processor reads (`tokenizer.image_token`, ...)."""
    special_tokens = special_tokens or QWEN2VL_SPECIAL_TOKENS + list(AUDIO_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    extra = {"extra_special_tokens": named_tokens} if named_tokens else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos_token,
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in special_tokens if t not in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")],
        chat_template=chat_template or QWEN2VL_CHAT_TEMPLATE,
        model_max_length=4096,
        **extra,
    )


# The `toy` preset: the tiny classes at the size the toy study needs to really see its shapes
# (a 4-layer 128-d LLM, a 4-block 64-d vision tower, pictures up to 224x224 px = 64 image
# tokens, a 64-d Whisper). `tiny` cannot: at 112 px and a 2-layer 64-d LLM it memorises the
# training scenes and answers held-out ones at chance (docs/study_v1.md).
# rope_theta 10, not Qwen2-VL's 1e6: M-RoPE gives an image token in row i, column j the
# positions (t, s + i, s + j) and splits a head's rotary frequencies into temporal, height and
# width sections, fastest first. At head_dim 32 and theta 1e6 the width section's fastest
# frequency is 1.8e-4 rad per token, 0.0013 rad across a 64-token picture: the LLM cannot tell
# left from right, and the vision tower (relative 2-D RoPE only, no absolute embedding) cannot
# either on a plain background. At theta 10 every section turns by at least 0.8 rad across it.
TOY = dict(hidden_size=128, layers=4, heads=4, vision_depth=4, vision_dim=64, rope_theta=10.0)  # tiny_vlm_config sizes
TOY_AUDIO_DIM = 64
TOY_MAX_PIXELS = 224 * 224


def build_tiny_processor(audio_stack: int = 4, max_pixels: int = 112 * 112) -> OmniProcessor:
    """Tiny tokenizer + Qwen2-VL image processor (<= 112x112 px by default) + an 80-bin Whisper
    feature extractor with a 10 s window."""
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=max_pixels)
    feature_extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=10)
    return OmniProcessor(build_tiny_tokenizer(), image_processor, feature_extractor, audio_stack=audio_stack)


def build_tiny_qwen3vl_processor(audio_stack: int = 4, max_pixels: int = 128 * 128) -> OmniProcessor:
    """The `tiny-qwen3vl` processor: the tiny tokenizer (Qwen3-VL has Qwen2-VL's special tokens in the
    same order) with Qwen3-VL's chat template, Qwen3-VL's image processing (16 px patches, 2x2
    merge, mean and std 0.5) at <= 128x128 px, and the tiny 80-bin Whisper feature extractor."""
    image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                                            max_pixels=max_pixels, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    feature_extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=10)
    tokenizer = build_tiny_tokenizer(chat_template=QWEN3VL_CHAT_TEMPLATE)
    return OmniProcessor(tokenizer, image_processor, feature_extractor, audio_stack=audio_stack)


def tiny_qwen3vl_config(vocab_size: int, hidden_size: int = 64, layers: int = 3, heads: int = 4) -> Qwen3VLConfig:
    """Qwen3-VL at toy size, shaped like the released config: a 3-layer Qwen3 decoder (head_dim 16,
    q/k norms; a DeepStack addition after the last layer would reach image positions only) with interleaved M-RoPE (sections T, H, W = 4, 2, 2 of 8 rotary pairs; released 24, 20,
    20 of 64), a 3-block 32-d ViT of 16 px patches with a 4 x 4 learned position grid, and
    DeepStack from blocks 0 and 1 (released: 8, 16, 24 of 27) into the decoder's first two layers."""
    return Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=heads // 2, head_dim=hidden_size // heads,
            max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2],
                             "mrope_interleaved": True},
            bos_token_id=None, eos_token_id=QWEN2VL_SPECIAL_TOKENS.index("<|im_end|>"),
            pad_token_id=QWEN2VL_SPECIAL_TOKENS.index("<|endoftext|>"),
        ),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        image_token_id=QWEN2VL_SPECIAL_TOKENS.index("<|image_pad|>"),
        video_token_id=QWEN2VL_SPECIAL_TOKENS.index("<|video_pad|>"),
        vision_start_token_id=QWEN2VL_SPECIAL_TOKENS.index("<|vision_start|>"),
        vision_end_token_id=QWEN2VL_SPECIAL_TOKENS.index("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def build_tiny_internvl_processor(audio_stack: int = 4) -> OmniProcessor:
    """The `tiny-internvl` processor: the tiny tokenizer with InternVL's image tokens and chat
    template, InternVL's tiling image processor (GotOcr2: crops + a thumbnail, at most 4 crops)
    at 56 px tiles, 4 tokens per tile, and the tiny 80-bin Whisper feature extractor."""
    tokenizer = build_tiny_tokenizer(special_tokens=INTERNVL_SPECIAL_TOKENS + list(AUDIO_TOKENS),
                                     chat_template=INTERNVL_CHAT_TEMPLATE, named_tokens=INTERNVL_NAMED_TOKENS)
    images = GotOcr2ImageProcessor(size={"height": TINY_INTERNVL_TILE, "width": TINY_INTERNVL_TILE}, crop_to_patches=True,
                                   min_patches=1, max_patches=4, image_mean=[0.485, 0.456, 0.406],
                                   image_std=[0.229, 0.224, 0.225])
    return OmniProcessor(tokenizer, images, WhisperFeatureExtractor(feature_size=80, chunk_length=10),
                         audio_stack=audio_stack, vlm="internvl", image_seq_length=4)


def tiny_internvl_config(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4) -> InternVLConfig:
    """InternVL 3 at toy size, shaped like the released config: a Qwen2 decoder, a 2-layer 32-d
    InternViT (layer norm, layer scale, absolute positions) on 56 px tiles, pixel shuffle 0.5 and the
    LayerNorm-Linear-GELU-Linear projector."""
    tokens = {t: i for i, t in enumerate(INTERNVL_SPECIAL_TOKENS)}
    return InternVLConfig(
        text_config=dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads // 2, max_position_embeddings=4096, rope_theta=1e6,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokens["<|im_end|>"],
                         pad_token_id=tokens["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=[TINY_INTERNVL_TILE] * 2, patch_size=[14, 14], norm_type="layer_norm",
                           use_qk_norm=False, layer_scale_init_value=0.1, use_mean_pooling=True,
                           use_absolute_position_embeddings=True),
        image_token_id=tokens[INTERNVL_IMAGE[1]], image_seq_length=4, downsample_ratio=0.5,
        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def build_real_size_processor() -> OmniProcessor:
    """The real-size data path with the tiny tokenizer (no weights download): Qwen2-VL's image
    processor at its defaults and a Whisper-large-v3 feature extractor (128 mel bins, 30 s window)."""
    return OmniProcessor(build_tiny_tokenizer(), Qwen2VLImageProcessor(), WhisperFeatureExtractor(feature_size=128),
                         audio_stack=4)


def tiny_vlm_config(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4, vision_depth: int = 2,
                    vision_dim: int = 32, rope_theta: float = 1e6) -> Qwen2VLConfig:
    """A Qwen2-VL at toy size; by default a 2-layer 64-d LLM and a 2-block 32-d vision tower,
    M-RoPE at Qwen2-VL's theta (1e6)."""
    half_head = hidden_size // heads // 2  # mrope sections (temporal, height, width) split half a head
    temporal = half_head // 4
    mrope_section = [temporal, (half_head - temporal) // 2, half_head - temporal - (half_head - temporal) // 2]
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope_section},
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=QWEN2VL_SPECIAL_TOKENS.index("<|im_end|>"),
            pad_token_id=QWEN2VL_SPECIAL_TOKENS.index("<|endoftext|>"),
        ),
        vision_config=dict(depth=vision_depth, embed_dim=vision_dim, num_heads=2, mlp_ratio=2, hidden_size=hidden_size,
                           patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=QWEN2VL_SPECIAL_TOKENS.index("<|image_pad|>"),
        video_token_id=QWEN2VL_SPECIAL_TOKENS.index("<|video_pad|>"),
        vision_start_token_id=QWEN2VL_SPECIAL_TOKENS.index("<|vision_start|>"),
        vision_end_token_id=QWEN2VL_SPECIAL_TOKENS.index("<|vision_end|>"),
        tie_word_embeddings=False,
    )


def tiny_whisper_config(num_mel_bins: int = 80, window_frames: int = 1000, d_model: int = 32) -> WhisperConfig:
    """A 2-layer Whisper (32-d by default) whose encoder window matches the tiny feature extractor."""
    return WhisperConfig(
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=2 * d_model,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        max_source_positions=window_frames // 2,
        vocab_size=64,
        # Whisper's own ids (50256...) lie outside a 64-token vocabulary; only the encoder is used.
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=[],
        begin_suppress_tokens=[],
    )
