"""Allow-listed decoding of one raw shard sample: JSON metadata, an RGB image and mono
16 kHz float32 audio. Every failure raises `SampleError(reason, field)` so the stream can
skip the sample, count it by reason and log one line naming shard, key and field.

Image rules: grayscale/RGBA/LA/P/CMYK/16-bit are converted to RGB (transparency composited
on white); an image over MAX_IMAGE_PIXELS (decompression-bomb guard, checked from the
header before any pixel is decoded) is refused as "image_too_large"; an image with more
pixels than `max_pixels` (the image processor's own cap) is downscaled first, so the
processor never resizes a huge array.
Audio rules: any sample rate (resampled with torchaudio), any channel count (averaged).
"""

import io
import json
import warnings

import numpy as np
import soundfile as sf
import torch
import torchaudio
from PIL import Image

MAX_IMAGE_PIXELS = 50_000_000
# PIL's own bomb check would fire at 2x its limit; ours fires first, from the header.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS * 2


class SampleError(Exception):
    """A sample that cannot be used: `reason` is the skip-count key, `field` the member."""

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(f"{reason} ({field}): {detail}")
        self.reason = reason
        self.field = field
        self.detail = detail


def decode_json(raw: dict) -> dict:
    if "json" not in raw:
        raise SampleError("missing_key", "json", "sample has no .json member")
    try:
        meta = json.loads(raw["json"].decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SampleError("bad_json", "json", f"not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SampleError("bad_json", "json", f"invalid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise SampleError("bad_json", "json", f"expected an object, got {type(meta).__name__}")
    return meta


def require_text(meta: dict, name: str, empty_reason: str) -> str:
    if name not in meta:
        raise SampleError("missing_key", f"json.{name}", f"no {name!r} in sample json")
    value = meta[name]
    if not isinstance(value, str):
        raise SampleError("bad_json", f"json.{name}", f"{name!r} is {type(value).__name__}, not a string")
    if not value.strip():
        raise SampleError(empty_reason, f"json.{name}", f"{name!r} is empty")
    return value.strip()


def find_member(raw: dict, exts: tuple, kind: str) -> tuple[str, bytes]:
    for ext in exts:
        if ext in raw:
            return ext, raw[ext]
    raise SampleError("missing_key", kind, f"sample has no {kind} member ({'|'.join(exts)})")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """bytes -> RGB PIL image with at most ~max_pixels pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise SampleError("image_too_large", "image", f"{width}x{height} px > {MAX_IMAGE_PIXELS} px limit")
            if width * height > max_pixels and image.format == "JPEG":
                # JPEG can decode at 1/2, 1/4, 1/8 scale directly: far cheaper than full decode.
                scale = (max_pixels / (width * height)) ** 0.5
                image.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))
            image.load()
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SampleError("image_too_large", "image", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise SampleError("bad_image", "image", f"{type(exc).__name__}: {exc}") from None
    if image.width == 0 or image.height == 0:
        raise SampleError("bad_image", "image", "zero-size image")
    image = to_rgb(image)
    if image.width * image.height > max_pixels:
        scale = (max_pixels / (image.width * image.height)) ** 0.5
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits instead of clipping everything to white.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        return Image.fromarray((array / peak * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


_RESAMPLERS: dict[tuple[int, int], torchaudio.transforms.Resample] = {}


def decode_audio(data: bytes, target_rate: int) -> np.ndarray:
    """bytes (wav/flac/mp3/ogg) -> mono float32 at target_rate."""
    try:
        audio, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - libsndfile errors for corrupt/unknown data
        raise SampleError("bad_audio", "audio", f"{type(exc).__name__}: {exc}") from None
    if audio.shape[0] == 0:
        raise SampleError("bad_audio", "audio", "no audio samples")
    mono = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if not np.isfinite(mono).all():
        raise SampleError("bad_audio", "audio", "non-finite audio samples")
    if rate != target_rate:
        resampler = _RESAMPLERS.get((rate, target_rate))
        if resampler is None:
            resampler = _RESAMPLERS[(rate, target_rate)] = torchaudio.transforms.Resample(rate, target_rate)
        with torch.no_grad():
            mono = resampler(torch.from_numpy(np.ascontiguousarray(mono))).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)

