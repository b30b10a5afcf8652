"""Text, image and audio preprocessing for the omni model.

`OmniProcessor` bundles the tokenizer (with its chat template), the image processor, the
audio feature extractor, and the placeholder geometry (how many LLM tokens a clip of N
samples or an image becomes). The data pipeline and the model both read the geometry from
here, so they can never disagree.

Two kinds of model (`family`):
  composed        a Hugging Face VLM + Whisper's encoder + our projector. The VLM tokenizer
                  gets three special tokens, `<|audio_start|>`, `<|audio_pad|>` and
                  `<|audio_end|>`; each `<|audio_pad|>` is replaced by one projector output
                  frame (encoder frames stacked `audio_stack` at a time). Qwen2-VL's
                  embedding matrix has unused rows past the tokenizer's last id, so adding
                  these tokens normally needs no resize; the model resizes only when the
                  tokenizer outgrows the matrix.
  a native omni   the family's own placeholders and audio geometry (FAMILIES): Qwen2.5-Omni
  model_type      (`<|AUDIO|>`, `<|IMAGE|>`), Qwen3-Omni (`<|audio_pad|>`, `<|image_pad|>`), ...
                  Nothing is added to their tokenizers, and they save and load as the
                  family's own Hugging Face processor (AutoProcessor reads the files).
"""

import dataclasses
import json
import math
import os

import torch

from transformers import AutoImageProcessor, AutoTokenizer, WhisperFeatureExtractor

AUDIO_START = "<|audio_start|>"
AUDIO_PAD = "<|audio_pad|>"
AUDIO_END = "<|audio_end|>"
IMAGE_PAD = "<|image_pad|>"
AUDIO_TOKENS = (AUDIO_START, AUDIO_PAD, AUDIO_END)
PROCESSOR_CONFIG = "omni_processor.json"
COMPOSED = "composed"
# A composed model's VLM kind: how its images become tokens. "qwen": Qwen2-VL / 2.5-VL / 3-VL patch grids
# (<|image_pad|> per merged patch, M-RoPE); "internvl": InternVL's 448 px tiles (crops + a thumbnail),
# `image_seq_length` <IMG_CONTEXT> tokens per tile between <img> and </img>, 1-D positions.
COMPOSED_VLMS = ("qwen", "internvl")
INTERNVL_IMAGE = ("<img>", "<IMG_CONTEXT>", "</img>")

# Whisper's encoder halves the mel frame rate with its stride-2 second convolution.
WHISPER_CONV_STRIDE = 2


def _qwen2_5_omni_audio_tokens(mel_frames: int, n_window: int) -> int:
    """Qwen2.5-Omni's audio tower: stride-2 conv, then 2x average pooling
    (Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths)."""
    after_conv = (mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def _qwen3_omni_audio_tokens(mel_frames: int, n_window: int) -> int:
    """Qwen3-Omni's audio tower: chunks of 2 * n_window mel frames, each downsampled 8x by
    three stride-2 convolutions (13 tokens per full 100-frame chunk; the module's
    _get_feat_extract_output_lengths)."""
    chunk = 2 * n_window
    rest = mel_frames % chunk
    after_conv = (rest - 1) // 2 + 1
    return ((after_conv - 1) // 2 + 1 - 1) // 2 + 1 + (mel_frames // chunk) * 13


def _phi4_audio_tokens(mel_frames: int, n_window: int) -> int:
    """Phi-4-multimodal's conformer: three stride-2 convolutions, ceil(frames / 8)."""
    return -(-mel_frames // 8)


@dataclasses.dataclass(frozen=True)
class Family:
    """A native omni family's placeholder tokens and audio geometry."""

    image_pad: str
    audio_start: str
    audio_pad: str
    audio_end: str
    audio_tokens: object  # (mel_frames, n_window) -> placeholder tokens of one clip (0: too short)
    n_window: int = 50  # the audio tower's chunk, in mel frames / 2, where the count depends on it
    processor_class: str = ""  # the family's transformers processor
    turn_end: str = "<|im_end|>"  # the token that closes a chat turn (and ends an answer)
    encoder_positions_per_token: int = 1  # audio tower sequence positions behind one output token (FLOP counts)
    mrope: bool = True  # 3-D multimodal rotary positions (Qwen); else plain 1-D positions
    whisper_features: bool = True  # Whisper log-mel windows; else the family's own audio feature extractor


FAMILIES = {
    "qwen2_5_omni": Family("<|IMAGE|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>", _qwen2_5_omni_audio_tokens,
                           n_window=100, processor_class="Qwen2_5OmniProcessor", encoder_positions_per_token=2),
    "qwen3_omni_moe": Family("<|image_pad|>", "<|audio_start|>", "<|audio_pad|>", "<|audio_end|>",
                             _qwen3_omni_audio_tokens, n_window=50, processor_class="Qwen3OmniMoeProcessor"),
    # Phi-4-multimodal: bare repeated placeholders, 80-bin fbank at 100 Hz, 8x subsampling (a token per 80 ms).
    "phi4_multimodal": Family("<|image|>", "", "<|audio|>", "", _phi4_audio_tokens, processor_class="Phi4MultimodalProcessor",
                              turn_end="<|end|>", encoder_positions_per_token=1, mrope=False, whisper_features=False),
}
PHI4_AUDIO_SECONDS = 30  # clips are cut to this (the encoder itself takes longer audio in 500-frame chunks)


class OmniProcessor:
    """Tokenizer + image processor + audio feature extractor + placeholder geometry.
    `family`: COMPOSED (Whisper + projector, `audio_stack` frames per token) or a native
    omni model_type in FAMILIES."""

    def __init__(self, tokenizer, image_processor, feature_extractor, audio_stack: int = 1, family: str = COMPOSED,
                 video_processor=None, vlm: str = "qwen", image_seq_length: int | None = None):
        if family != COMPOSED and family not in FAMILIES:
            raise ValueError(f"unknown processor family {family!r}; known: {[COMPOSED, *FAMILIES]}")
        if vlm not in COMPOSED_VLMS or (vlm != "qwen" and family != COMPOSED):
            raise ValueError(f"vlm must be one of {COMPOSED_VLMS} (a composed processor), got {vlm!r} for {family}")
        if (vlm == "internvl") != (image_seq_length is not None):
            raise ValueError("an InternVL processor needs image_seq_length (tokens per tile), only it")
        self.family = family
        self.vlm = vlm
        self.image_seq_length = image_seq_length
        native = FAMILIES.get(family)
        self.image_pad = native.image_pad if native else INTERNVL_IMAGE[1] if vlm == "internvl" else IMAGE_PAD
        span = (native.audio_start, native.audio_pad, native.audio_end) if native else AUDIO_TOKENS
        self.audio_span_tokens = tuple(t for t in span if t)  # Phi-4 has a bare placeholder, no start/end
        missing = [t for t in self.audio_span_tokens if t not in tokenizer.get_vocab()]
        if missing and native:
            raise ValueError(f"the {family} tokenizer lacks its placeholder tokens {missing}")
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": list(AUDIO_TOKENS)})
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.feature_extractor = feature_extractor
        self.video_processor = video_processor  # native families only: kept so their processor files stay whole
        self._log_mel = None  # Whisper features, made on first use
        self.audio_stack = int(audio_stack)
        if self.audio_stack < 1:
            raise ValueError(f"audio_stack must be >= 1, got {audio_stack}")
        vocab = tokenizer.get_vocab()
        self.audio_pad_id = vocab[span[1]]
        self.audio_start_id, self.audio_end_id = vocab.get(span[0]), vocab.get(span[2])
        if self.image_pad not in vocab:
            raise ValueError(f"the tokenizer lacks the image placeholder {self.image_pad}")
        self.image_pad_id = vocab[self.image_pad]
        # Tokens around each image's placeholders that the prompt's single placeholder expands into
        # (InternVL: <img> ... </img>); None where the chat template writes them itself.
        self.image_wrap_ids = None
        if vlm == "internvl":
            missing = [t for t in INTERNVL_IMAGE if t not in vocab]
            if missing:
                raise ValueError(f"the InternVL tokenizer lacks its image tokens {missing}")
            self.image_wrap_ids = (vocab[INTERNVL_IMAGE[0]], vocab[INTERNVL_IMAGE[2]])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @property
    def turn_end(self) -> str:
        """The token that ends a chat turn: appended to every answer, and where generation stops."""
        return FAMILIES[self.family].turn_end if self.native else "<|im_end|>"

    @property
    def encoder_positions_per_token(self) -> int:
        """Audio encoder positions behind one audio token: the stack (composed), or the
        family's pooling (Qwen2.5-Omni pools 2 positions per token)."""
        return FAMILIES[self.family].encoder_positions_per_token if self.native else self.audio_stack

    @property
    def native(self) -> bool:
        return self.family != COMPOSED

    @property
    def audio_span(self) -> str:
        """The text that stands for one clip in a prompt (its single pad is expanded later)."""
        return "".join(self.audio_span_tokens)

    # --- audio geometry -------------------------------------------------------------
    @property
    def sampling_rate(self) -> int:
        return self.feature_extractor.sampling_rate

    @property
    def num_mel_bins(self) -> int:
        return self.feature_extractor.feature_size

    @property
    def whisper_features(self) -> bool:
        return FAMILIES[self.family].whisper_features if self.native else True

    @property
    def max_audio_samples(self) -> int:
        """Samples in one encoder window (30 s for real Whisper); longer clips are cut."""
        if not self.whisper_features:
            return PHI4_AUDIO_SECONDS * self.sampling_rate
        return self.feature_extractor.n_samples

    @property
    def window_frames(self) -> int:
        """Mel frames in one encoder window (3000 for real Whisper)."""
        if not self.whisper_features:
            return self.mel_frames(self.max_audio_samples)
        return self.feature_extractor.nb_max_frames

    def mel_frames(self, num_samples: int) -> int:
        """Valid mel frames for a clip of `num_samples` (clipped to the window)."""
        num_samples = min(num_samples, self.max_audio_samples)
        if not self.whisper_features:  # Phi-4's fbank: 25 ms windows every 10 ms, no centring
            fe = self.feature_extractor
            return max(0, (num_samples - fe.win_length) // fe.hop_length + 1)
        return min(self.window_frames, math.ceil(num_samples / self.feature_extractor.hop_length))

    def audio_features(self, audio) -> torch.Tensor:
        """Mono float32 audio at `sampling_rate` -> (n_mels, frames): Whisper's log-mel over the
        whole window (padding included, as Whisper's encoder expects), or the family's own
        features over the clip's valid frames (the collator pads to the batch's longest)."""
        if self.whisper_features:
            if self._log_mel is None:
                from trainer.data.features import LogMel

                self._log_mel = LogMel(self.feature_extractor)
            return self._log_mel(audio)
        out = self.feature_extractor(audio[: self.max_audio_samples], sampling_rate=self.sampling_rate,
                                     return_tensors="pt")
        return out["audio_input_features"][0].T.contiguous()  # frames, n_mels -> n_mels, frames

    def encoder_frames(self, num_samples: int) -> int:
        """Valid Whisper encoder output frames for a clip of `num_samples`."""
        return math.ceil(self.mel_frames(num_samples) / WHISPER_CONV_STRIDE)

    def audio_token_count(self, num_samples: int) -> int:
        """Audio placeholder tokens for a clip. Composed: Whisper's encoder frames stacked by
        `audio_stack` (at least 1). Native: the family's audio tower output length, which is
        0 for a clip too short to encode (the sample encoder refuses those)."""
        if self.native:
            family = FAMILIES[self.family]
            return max(0, family.audio_tokens(self.mel_frames(num_samples), family.n_window))
        return max(1, math.ceil(self.encoder_frames(num_samples) / self.audio_stack))

    # --- images ----------------------------------------------------------------------
    def encode_image(self, image) -> tuple[dict, int]:
        """A PIL image -> (the tensors the family's vision tower takes, LLM tokens it becomes).
        Qwen: pixel_values (patches, patch_dim) and image_grid_thw (1, 3). Phi-4: 448 px crops
        (1, crops, 3, 448, 448), image_sizes (1, 2), image_attention_mask (1, crops, 32, 32)."""
        if self.family == "phi4_multimodal":
            out = self.image_processor(images=[image], return_tensors="pt")
            fields = {"pixel_values": out["image_pixel_values"], "image_sizes": out["image_sizes"],
                      "image_attention_mask": out["image_attention_mask"]}
            return fields, int(out["num_img_tokens"][0])
        if self.vlm == "internvl":  # tiles (crops + a thumbnail when cropped), flat per tile: tiles, 3 * s * s
            out = self.image_processor(images=[image], crop_to_patches=True, return_tensors="pt")
            tiles = out["pixel_values"]
            return {"pixel_values": tiles.flatten(1)}, tiles.shape[0] * self.image_seq_length
        out = self.image_processor(images=[image], return_tensors="pt")
        fields = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        return fields, self.image_token_count(out["image_grid_thw"][0])

    @staticmethod
    def collate_images(images: list[dict]) -> dict:
        """Per-image tensors (encode_image) -> the batch's, images in order. Qwen's patches
        concatenate; Phi-4's crops are zero-padded (mask 0) to the most crops of the batch."""
        fields = {}
        for key in images[0]:
            tensors = [image[key] for image in images]
            if tensors[0].dim() >= 4:  # (1, crops, ...): pad the crop axis
                most = max(t.shape[1] for t in tensors)
                tensors = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, most - t.shape[1])) for t in tensors]
            fields[key] = torch.cat(tensors)
        return fields

    @property
    def image_merge_size(self) -> int:
        return getattr(self.image_processor, "merge_size", 2)

    def image_token_count(self, grid_thw) -> int:
        """LLM tokens for one image with patch grid (t, h, w)."""
        t, h, w = (int(x) for x in grid_thw)
        return t * h * w // (self.image_merge_size**2)

    def rope_positions(self, token_ids: list[int], image_grids: list) -> torch.Tensor:
        """Qwen2-VL's multimodal (M-RoPE) position ids of one unpadded sequence: (3, T).

        Text advances all three axes together; an image block (its `<|image_pad|>` run, in
        order of `image_grids`' (t, h, w) patch grids) takes (start + t, start + row, start +
        col) over its merged grid, and the text after it resumes at start + max(rows, cols).
        The same numbers as the VLM's get_rope_index (tested), computed per sample on the
        CPU by the sample encoder, so the training step never reads them off the device.
        Families without M-RoPE (Phi-4, InternVL) get 0..T-1 on all three rows."""
        if (self.native and not FAMILIES[self.family].mrope) or self.vlm == "internvl":
            return torch.arange(len(token_ids)).expand(3, -1).clone()
        merge = self.image_merge_size
        positions = []
        start = 0
        grids = iter(image_grids)
        i = 0
        while i < len(token_ids):
            if token_ids[i] == self.image_pad_id:
                t, h, w = (int(x) for x in next(grids))
                rows, cols = h // merge, w // merge
                block = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(rows), torch.arange(cols),
                                                   indexing="ij")).reshape(3, -1) + start  # 3, t*rows*cols
                positions.append(block)
                i += block.shape[1]
                start += max(rows, cols)
            else:
                run = i
                while run < len(token_ids) and token_ids[run] != self.image_pad_id:
                    run += 1
                positions.append(torch.arange(start, start + run - i).expand(3, -1))
                start += run - i
                i = run
        return torch.cat(positions, dim=1) if positions else torch.zeros(3, 0, dtype=torch.long)

    # --- persistence -----------------------------------------------------------------
    def hf_processor(self):
        """The family's own transformers processor around the same parts (native families)."""
        import transformers

        cls = getattr(transformers, FAMILIES[self.family].processor_class)
        if self.family == "phi4_multimodal":
            hf = cls(image_processor=self.image_processor, audio_processor=self.feature_extractor, tokenizer=self.tokenizer)
            hf.chat_template = self.tokenizer.chat_template
            return hf
        video = self.video_processor
        if video is None:  # a tiny preset: the Qwen2-VL video processor at the image processor's patch size
            from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

            video = Qwen2VLVideoProcessor(patch_size=self.image_processor.patch_size,
                                          merge_size=self.image_processor.merge_size)
        return cls(image_processor=self.image_processor, video_processor=video, feature_extractor=self.feature_extractor,
                   tokenizer=self.tokenizer, chat_template=self.tokenizer.chat_template)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        if self.native:  # the family's processor files, as the released checkpoints have them
            self.hf_processor().save_pretrained(path)
        else:
            self.tokenizer.save_pretrained(path)
            self.image_processor.save_pretrained(path)
            # The image processor owns preprocessor_config.json; Whisper's goes beside it.
            self.feature_extractor.save_pretrained(os.path.join(path, "audio_feature_extractor"))
        config = {"audio_stack": self.audio_stack, "family": self.family}
        if self.vlm != "qwen":
            config.update(vlm=self.vlm, image_seq_length=self.image_seq_length)
        with open(os.path.join(path, PROCESSOR_CONFIG), "w") as f:
            json.dump(config, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str) -> "OmniProcessor":
        """Load a processor written by `save_pretrained` (an exported model dir or a
        checkpoint's processor/), or a native omni checkpoint's own processor files."""
        config_path = os.path.join(path, PROCESSOR_CONFIG)
        if os.path.isfile(config_path):
            with open(config_path) as f:
                cfg = json.load(f)
        else:
            family = native_family_of(path)
            if family is None:
                raise FileNotFoundError(f"{config_path} not found: {path} is neither an exported omni model directory "
                                        f"nor a native omni checkpoint ({', '.join(FAMILIES)})")
            cfg = {"audio_stack": 1, "family": family}
        family = cfg.get("family", COMPOSED)
        if family != COMPOSED:
            return cls.native_from_pretrained(path, family)
        return cls(
            load_tokenizer(path),
            AutoImageProcessor.from_pretrained(path),
            WhisperFeatureExtractor.from_pretrained(os.path.join(path, "audio_feature_extractor")),
            audio_stack=cfg["audio_stack"],
            vlm=cfg.get("vlm", "qwen"),
            image_seq_length=cfg.get("image_seq_length"),
        )

    @classmethod
    def native_from_pretrained(cls, path: str, family: str) -> "OmniProcessor":
        """A native family's processor files (AutoProcessor) -> OmniProcessor. The chat
        template may live on the processor only: the tokenizer gets it, the sample encoder
        renders prompts through the tokenizer."""
        from transformers import AutoProcessor

        hf = AutoProcessor.from_pretrained(path)
        tokenizer = hf.tokenizer
        if tokenizer.chat_template is None and getattr(hf, "chat_template", None):
            tokenizer.chat_template = hf.chat_template
        if tokenizer.chat_template is None:
            raise ValueError(f"{path}: neither the tokenizer nor the processor has a chat template")
        feature_extractor = getattr(hf, "feature_extractor", None) or hf.audio_processor  # Phi-4 names it audio_processor
        return cls(tokenizer, hf.image_processor, feature_extractor, audio_stack=1, family=family,
                   video_processor=getattr(hf, "video_processor", None))

    @classmethod
    def compose(cls, vlm_path: str, audio_encoder_path: str, audio_stack: int) -> "OmniProcessor":
        """Processor for a new composition: the VLM's tokenizer and image processor plus
        the audio encoder's feature extractor (paths or hub ids already cached locally). A chat
        template kept on the VLM's processor only (chat_template.json) goes to the tokenizer.
        InternVL: its tokens per tile from the checkpoint's config (image_seq_length)."""
        from transformers import AutoConfig

        tokenizer = AutoTokenizer.from_pretrained(vlm_path)
        if tokenizer.chat_template is None:
            from transformers import AutoProcessor

            tokenizer.chat_template = getattr(AutoProcessor.from_pretrained(vlm_path), "chat_template", None)
        if tokenizer.chat_template is None:
            raise ValueError(f"{vlm_path}: neither the tokenizer nor the processor has a chat template")
        config = AutoConfig.from_pretrained(vlm_path)
        internvl = config.model_type == "internvl"
        processor = cls(
            tokenizer,
            AutoImageProcessor.from_pretrained(vlm_path),
            WhisperFeatureExtractor.from_pretrained(audio_encoder_path),
            audio_stack=audio_stack,
            vlm="internvl" if internvl else "qwen",
            image_seq_length=int(config.image_seq_length) if internvl else None,
        )
        image_turn = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
        if processor.image_pad not in image_turn:  # e.g. an early InternVL -hf template that writes "<image>"
            raise ValueError(f"{vlm_path}: its chat template renders an image as {image_turn!r}, without the model's "
                             f"image placeholder {processor.image_pad}; fix the template (chat_template.jinja)")
        return processor


def load_tokenizer(path: str):
    """The tokenizer of an export, by the class its tokenizer_config.json names: AutoTokenizer would
    read config.json first, which in a composed export names the export's own transformers code
    (auto_map) and would ask to run it."""
    import transformers.models.auto.tokenization_auto as tokenization_auto

    with open(os.path.join(path, "tokenizer_config.json")) as f:
        name = json.load(f).get("tokenizer_class")
    cls = tokenization_auto.tokenizer_class_from_name(name) if name else None
    return cls.from_pretrained(path) if cls is not None else AutoTokenizer.from_pretrained(path)


# A native checkpoint's config.json model_type (the full model or its thinker) -> family.
NATIVE_MODEL_TYPES = {"qwen2_5_omni": "qwen2_5_omni", "qwen2_5_omni_thinker": "qwen2_5_omni",
                      "qwen3_omni_moe": "qwen3_omni_moe", "qwen3_omni_moe_thinker": "qwen3_omni_moe",
                      "phi4_multimodal": "phi4_multimodal"}


def native_family_of(path: str) -> str | None:
    """The native omni family of a Hugging Face checkpoint directory (config.json's
    model_type), or None."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path) as f:
        return NATIVE_MODEL_TYPES.get(json.load(f).get("model_type"))
