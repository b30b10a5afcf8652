"""Text, image and audio preprocessing for the composed omni model.

`OmniProcessor` bundles the VLM's tokenizer (with its chat template) and image
processor, the audio encoder's Whisper feature extractor, and the audio placeholder
geometry (how many LLM tokens a clip of N samples becomes). The data pipeline and the
model both read the geometry from here, so they can never disagree.

Audio placeholder tokens: the VLM tokenizer gets three special tokens,
`<|audio_start|>`, `<|audio_pad|>` and `<|audio_end|>`. Each `<|audio_pad|>` is replaced
by one projector output frame. Qwen2-VL's embedding matrix has unused rows past the
tokenizer's last id, so adding these tokens normally needs no embedding resize; the
model resizes only when the tokenizer outgrows the matrix.
"""

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

# Whisper's encoder halves the mel frame rate with its stride-2 second convolution.
WHISPER_CONV_STRIDE = 2


class OmniProcessor:
    """Tokenizer + image processor + Whisper feature extractor + audio token geometry."""

    def __init__(self, tokenizer, image_processor, feature_extractor, audio_stack: int):
        missing = [t for t in AUDIO_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": list(AUDIO_TOKENS)})
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.feature_extractor = feature_extractor
        self.audio_stack = int(audio_stack)
        if self.audio_stack < 1:
            raise ValueError(f"audio_stack must be >= 1, got {audio_stack}")
        vocab = tokenizer.get_vocab()
        self.audio_start_id = vocab[AUDIO_START]
        self.audio_pad_id = vocab[AUDIO_PAD]
        self.audio_end_id = vocab[AUDIO_END]
        self.image_pad_id = vocab[IMAGE_PAD]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # --- audio geometry -------------------------------------------------------------
    @property
    def sampling_rate(self) -> int:
        return self.feature_extractor.sampling_rate

    @property
    def num_mel_bins(self) -> int:
        return self.feature_extractor.feature_size

    @property
    def max_audio_samples(self) -> int:
        """Samples in one encoder window (30 s for real Whisper); longer clips are cut."""
        return self.feature_extractor.n_samples

    @property
    def window_frames(self) -> int:
        """Mel frames in one encoder window (3000 for real Whisper)."""
        return self.feature_extractor.nb_max_frames

    def mel_frames(self, num_samples: int) -> int:
        """Valid mel frames for a clip of `num_samples` (clipped to the window)."""
        num_samples = min(num_samples, self.max_audio_samples)
        return min(self.window_frames, math.ceil(num_samples / self.feature_extractor.hop_length))

    def encoder_frames(self, num_samples: int) -> int:
        """Valid Whisper encoder output frames for a clip of `num_samples`."""
        return math.ceil(self.mel_frames(num_samples) / WHISPER_CONV_STRIDE)

    def audio_token_count(self, num_samples: int) -> int:
        """`<|audio_pad|>` tokens for a clip: encoder frames stacked by `audio_stack`."""
        return max(1, math.ceil(self.encoder_frames(num_samples) / self.audio_stack))

    # --- images ----------------------------------------------------------------------
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
        CPU by the sample encoder, so the training step never reads them off the device."""
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
    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        # The image processor owns preprocessor_config.json; Whisper's goes beside it.
        audio_dir = os.path.join(path, "audio_feature_extractor")
        self.feature_extractor.save_pretrained(audio_dir)
        with open(os.path.join(path, PROCESSOR_CONFIG), "w") as f:
            json.dump({"audio_stack": self.audio_stack}, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str) -> "OmniProcessor":
        """Load a processor written by `save_pretrained` (an exported omni model dir)."""
        config_path = os.path.join(path, PROCESSOR_CONFIG)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} not found: {path} is not an exported omni model directory")
        with open(config_path) as f:
            cfg = json.load(f)
        return cls(
            AutoTokenizer.from_pretrained(path),
            AutoImageProcessor.from_pretrained(path),
            WhisperFeatureExtractor.from_pretrained(os.path.join(path, "audio_feature_extractor")),
            audio_stack=cfg["audio_stack"],
        )

    @classmethod
    def compose(cls, vlm_path: str, audio_encoder_path: str, audio_stack: int) -> "OmniProcessor":
        """Processor for a new composition: the VLM's tokenizer and image processor plus
        the audio encoder's feature extractor (paths or hub ids already cached locally)."""
        return cls(
            AutoTokenizer.from_pretrained(vlm_path),
            AutoImageProcessor.from_pretrained(vlm_path),
            WhisperFeatureExtractor.from_pretrained(audio_encoder_path),
            audio_stack=audio_stack,
        )
