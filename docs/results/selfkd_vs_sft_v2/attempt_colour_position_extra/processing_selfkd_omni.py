"""The processor of a composed omni export, for `AutoProcessor.from_pretrained(DIR,
trust_remote_code=True)`: the VLM's tokenizer (with `<|audio_start|>`, `<|audio_pad|>`,
`<|audio_end|>`) and chat template, its image processor, and Whisper's log-mel features.

Copied into every composed export by the selfkd trainer (tools/export_hf.py); it imports nothing
of it. It reproduces the trainer's evaluation prompts exactly (trainer/data/collate.py): one user
turn of [image] + the typed question, or [image] + the audio span for a spoken one; each image
placeholder expanded to the image's tokens (InternVL: between <img> and </img>), the audio pad to
the clip's tokens; prompts LEFT-padded for generate(); images resized to the image processor's
pixel cap and padded (white) to the trainer's shape limits; audio as mono float32 at the feature
extractor's rate (16 kHz for Whisper), cut to its window, log-mel computed on the valid audio
only (trainer/data/features.py: the same numbers as WhisperFeatureExtractor, to 1e-4).

    processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
    inputs = processor(images=[image, None], questions=["What colour is the circle?", "What is 2 + 2?"])  # typed
    inputs = processor(images=[image], audios=[waveform])                                                # spoken
"""

import json
import math
import os

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature, WhisperFeatureExtractor

AUDIO_SPAN = "<|audio_start|><|audio_pad|><|audio_end|>"
MIN_IMAGE_SIDE, MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS = 28, 100, 12_845_056
INTERNVL_IMAGE = ("<img>", "<IMG_CONTEXT>", "</img>")


class LogMel:
    """Whisper log-mel over the valid audio, padding frames filled with their known value."""

    def __init__(self, fe):
        self.n_fft, self.hop, self.n_samples = fe.n_fft, fe.hop_length, fe.n_samples
        self.window_frames, self.bins = fe.nb_max_frames, fe.feature_size
        self.window = torch.hann_window(self.n_fft)
        self.filters = torch.from_numpy(np.asarray(fe.mel_filters, dtype=np.float32)).T.contiguous()

    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        audio = audio[: self.n_samples]
        wave = torch.zeros(min(self.n_samples, len(audio) + self.n_fft + self.hop), dtype=torch.float32)
        wave[: len(audio)] = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
        power = torch.stft(wave, self.n_fft, self.hop, window=self.window, return_complex=True).abs() ** 2
        frames = min(power.shape[1], self.window_frames)
        log = torch.clamp(self.filters @ power[:, :frames].contiguous(), min=1e-10).log10()
        peak = log.max().item()
        if frames < self.window_frames:
            peak = max(peak, -10.0)
        floor = peak - 8.0
        features = torch.empty(self.bins, self.window_frames)
        torch.clamp(log, min=floor, out=features[:, :frames])
        features[:, frames:] = max(-10.0, floor)
        return features.add_(4.0).div_(4.0)


class SelfKDOmniProcessor:
    def __init__(self, tokenizer, image_processor, feature_extractor, audio_stack=4, vlm="qwen", image_seq_length=None):
        self.tokenizer, self.image_processor, self.feature_extractor = tokenizer, image_processor, feature_extractor
        self.audio_stack, self.vlm, self.image_seq_length = int(audio_stack), vlm, image_seq_length
        vocab = tokenizer.get_vocab()
        self.image_pad_id = vocab[INTERNVL_IMAGE[1] if vlm == "internvl" else "<|image_pad|>"]
        self.audio_pad_id = vocab["<|audio_pad|>"]
        self.wrap = (vocab[INTERNVL_IMAGE[0]], vocab[INTERNVL_IMAGE[2]]) if vlm == "internvl" else None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.log_mel = LogMel(feature_extractor)
        size = getattr(image_processor, "size", None)
        caps = [size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None),
                getattr(image_processor, "max_pixels", None)]
        self.max_pixels = int(next((c for c in caps if c), DEFAULT_MAX_PIXELS))

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        """AutoProcessor calls this on remote classes; nothing to register beyond the export's auto_map."""

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        with open(os.path.join(path, "omni_processor.json")) as f:
            config = json.load(f)
        # The tokenizer by the class its config names: AutoTokenizer would read config.json, this export's model code.
        import transformers.models.auto.tokenization_auto as tokenization_auto

        with open(os.path.join(path, "tokenizer_config.json")) as f:
            name = json.load(f).get("tokenizer_class")
        tokenizer_cls = (tokenization_auto.tokenizer_class_from_name(name) if name else None) or AutoTokenizer
        return cls(tokenizer_cls.from_pretrained(path), AutoImageProcessor.from_pretrained(path),
                   WhisperFeatureExtractor.from_pretrained(os.path.join(path, "audio_feature_extractor")),
                   audio_stack=config["audio_stack"], vlm=config.get("vlm", "qwen"),
                   image_seq_length=config.get("image_seq_length"))

    # --- pieces ------------------------------------------------------------------
    @staticmethod
    def to_rgb(image: Image.Image) -> Image.Image:
        """The trainer's conversion (trainer/data/decode.py): transparency onto white, 16-bit grey scaled."""
        if image.mode == "RGB":
            return image
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float64)
            peak = array.max() if array.size and array.max() > 0 else 1.0
            return Image.fromarray((array / peak * 255).astype(np.uint8)).convert("RGB")
        return image.convert("RGB")

    def prepare_image(self, image: Image.Image) -> Image.Image:
        """As the trainer's loader: RGB, at most the image processor's pixel cap, padded to the shape
        limits. (The loader decodes a large JPEG at reduced size first; pass such a picture decoded
        the same way for the same pixels.)"""
        image = self.to_rgb(image)
        if image.width * image.height > self.max_pixels:
            scale = (self.max_pixels / (image.width * image.height)) ** 0.5
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BICUBIC)
        width, height = image.size
        new_width = max(width, MIN_IMAGE_SIDE, math.ceil(height / MAX_ASPECT_RATIO))
        new_height = max(height, MIN_IMAGE_SIDE, math.ceil(width / MAX_ASPECT_RATIO))
        if (new_width, new_height) != (width, height):
            canvas = Image.new("RGB", (new_width, new_height), (255, 255, 255))
            canvas.paste(image, ((new_width - width) // 2, (new_height - height) // 2))
            image = canvas
        return image

    def encode_image(self, image) -> tuple:
        image = self.prepare_image(image)
        if self.vlm == "internvl":
            tiles = self.image_processor(images=[image], crop_to_patches=True, return_tensors="pt")["pixel_values"]
            return {"pixel_values": tiles.flatten(1)}, tiles.shape[0] * self.image_seq_length
        out = self.image_processor(images=[image], return_tensors="pt")
        t, h, w = (int(x) for x in out["image_grid_thw"][0])
        merge = getattr(self.image_processor, "merge_size", 2)
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}, t * h * w // merge**2

    def audio_token_count(self, num_samples: int) -> int:
        fe = self.feature_extractor
        mel = min(fe.nb_max_frames, math.ceil(min(num_samples, fe.n_samples) / fe.hop_length))
        return max(1, math.ceil(math.ceil(mel / 2) / self.audio_stack))

    def prompt_ids(self, content: list, image_tokens: int, audio_tokens: int) -> list:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
        ids = []
        for token in self.tokenizer(text, add_special_tokens=False)["input_ids"]:
            if token == self.image_pad_id:
                ids.extend([self.wrap[0], *[token] * image_tokens, self.wrap[1]] if self.wrap else [token] * image_tokens)
            elif token == self.audio_pad_id:
                ids.extend([token] * audio_tokens)
            else:
                ids.append(token)
        return ids

    # --- a batch -----------------------------------------------------------------
    def __call__(self, images=None, questions=None, audios=None, return_tensors="pt") -> BatchFeature:
        """Per sample an image (PIL, or None) and either a typed question or a spoken one
        (`audios`: mono float32 at the feature extractor's rate). -> input_ids, attention_mask
        (left-padded), pixel_values (+ image_grid_thw for Qwen), input_features, audio_frames."""
        if (questions is None) == (audios is None):
            raise ValueError("give typed `questions` or spoken `audios`, one per sample")
        spoken = audios is not None
        items = list(audios if spoken else questions)
        images = list(images) if images is not None else [None] * len(items)
        if len(images) != len(items):
            raise ValueError(f"{len(images)} images for {len(items)} samples")
        prompts, image_fields, features, frames = [], [], [], []
        for image, item in zip(images, items):
            content, image_tokens, audio_tokens = [], 0, 0
            if image is not None:
                fields, image_tokens = self.encode_image(image)
                image_fields.append(fields)
                content.append({"type": "image"})
            if spoken:
                audio = np.asarray(item, dtype=np.float32)[: self.feature_extractor.n_samples]
                audio_tokens = self.audio_token_count(len(audio))
                features.append(self.log_mel(audio))
                frames.append(min(self.feature_extractor.nb_max_frames,
                                  math.ceil(len(audio) / self.feature_extractor.hop_length)))
                content.append({"type": "text", "text": AUDIO_SPAN})
            else:
                content.append({"type": "text", "text": item})
            prompts.append(self.prompt_ids(content, image_tokens, audio_tokens))
        width = max(len(p) for p in prompts)
        data = {"input_ids": torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts]),
                "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])}
        if image_fields:
            for key in image_fields[0]:
                data[key] = torch.cat([f[key] for f in image_fields])
        if spoken:
            data["input_features"] = torch.stack(features)
            data["audio_frames"] = torch.tensor(frames)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
