"""Allow-listed decoding of one raw shard sample: JSON metadata, an RGB image and mono
16 kHz float32 audio. Every failure raises `SampleError(reason, field)` so the stream can
skip the sample, count it by reason and log one line naming shard, key and field.

JSON rules: at most MAX_JSON_BYTES, nested at most MAX_JSON_DEPTH deep (checked before
parsing, so a hostile document never reaches the recursive parser).
Image rules: grayscale/RGBA/LA/P/CMYK/16-bit are converted to RGB (transparency composited
on white); an image over MAX_IMAGE_PIXELS (decompression-bomb guard, checked from the
header before any pixel is decoded) is refused as "image_too_large"; an image with more
pixels than `max_pixels` (the image processor's own cap) is downscaled first, so the
processor never resizes a huge array; an image thinner than MIN_IMAGE_SIDE or longer than
MAX_ASPECT_RATIO times its width (or the reverse) is padded with white to those bounds
(noted "image_padded"), so the image processor never refuses it.
Audio rules: only the first `max_seconds` are decoded, block by block, mixed to mono as
they are read (memory is one window of mono audio whatever the file's length or channel
count; a longer file is noted "audio_clipped"); rates outside [MIN_SAMPLE_RATE,
MAX_SAMPLE_RATE] are refused ("bad_audio"); resampling uses torchaudio's sinc kernel, whose
size grows with the reduced ratio of the two rates: a rate whose kernel would exceed
MAX_RESAMPLE_KERNEL elements (e.g. 44101 Hz) is treated as the nearest multiple of 100 Hz
(a speed change under 0.7%, noted "audio_rate_snapped").
"""

import functools
import io
import json
import math
import re
import warnings

import numpy as np
import soundfile as sf
import torch
import torchaudio
from PIL import Image

MAX_IMAGE_PIXELS = 50_000_000
MIN_IMAGE_SIDE = 28  # Qwen2-VL's patch (14) x merge (2): one vision token
MAX_ASPECT_RATIO = 100  # Qwen2-VL's processor refuses more than 200
MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 192_000
MAX_AUDIO_CHANNELS = 64
MAX_RESAMPLE_KERNEL = 1 << 20  # elements of torchaudio's sinc kernel (4 MiB in float32)
# PIL's own bomb check would fire at 2x its limit; ours fires first, from the header.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS * 2


class SampleError(Exception):
    """A sample that cannot be used: `reason` is the skip-count key, `field` the member."""

    def __init__(self, reason: str, field: str, detail: str):
        super().__init__(f"{reason} ({field}): {detail}")
        self.reason = reason
        self.field = field
        self.detail = detail


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKETS = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """Deepest nesting of [ and { in a JSON text (brackets inside strings do not count)."""
    depth = deepest = 0
    for bracket in _JSON_BRACKETS.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def decode_json(raw: dict) -> dict:
    if "json" not in raw:
        raise SampleError("missing_key", "json", "sample has no .json member")
    data = raw["json"]
    if len(data) > MAX_JSON_BYTES:
        raise SampleError("bad_json", "json", f"{len(data)} bytes > {MAX_JSON_BYTES} byte limit")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError("bad_json", "json", f"not UTF-8: {exc}") from None
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise SampleError("bad_json", "json", f"nested {depth} deep > {MAX_JSON_DEPTH} level limit")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise SampleError("bad_json", "json", f"invalid JSON: {type(exc).__name__}: {exc}") from None
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


def decode_image(data: bytes, max_pixels: int) -> tuple[Image.Image, bool]:
    """bytes -> (RGB PIL image with at most ~max_pixels pixels, whether it was padded)."""
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
    return pad_to_shape_limits(image)


def pad_to_shape_limits(image: Image.Image) -> tuple[Image.Image, bool]:
    """Pad (white, centred) so that both sides are >= MIN_IMAGE_SIDE and neither side is more
    than MAX_ASPECT_RATIO times the other. Returns (image, padded)."""
    width, height = image.size
    new_width = max(width, MIN_IMAGE_SIDE, math.ceil(height / MAX_ASPECT_RATIO))
    new_height = max(height, MIN_IMAGE_SIDE, math.ceil(width / MAX_ASPECT_RATIO))
    if (new_width, new_height) == (width, height):
        return image, False
    canvas = Image.new("RGB", (new_width, new_height), (255, 255, 255))
    canvas.paste(image, ((new_width - width) // 2, (new_height - height) // 2))
    return canvas, True


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


def resample_source_rate(rate: int, target_rate: int) -> int:
    """The rate to resample from: `rate` itself unless its sinc kernel would exceed
    MAX_RESAMPLE_KERNEL elements, then the nearest multiple of 100 Hz."""
    def kernel_elements(source):
        gcd = math.gcd(source, target_rate)
        orig, new = source // gcd, target_rate // gcd
        width = math.ceil(6 * orig / (min(orig, new) * 0.99))  # torchaudio's lowpass_filter_width 6, rolloff 0.99
        return new * (orig + 2 * width)

    if kernel_elements(rate) <= MAX_RESAMPLE_KERNEL:
        return rate
    return max(100, round(rate / 100) * 100)


@functools.lru_cache(maxsize=8)
def _resampler(source_rate: int, target_rate: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(source_rate, target_rate)


def decode_audio(data: bytes, target_rate: int, max_seconds: float) -> tuple[np.ndarray, set]:
    """bytes (wav/flac/mp3/ogg) -> (mono float32 at target_rate, at most max_seconds long;
    notes: "audio_clipped" when the file is longer, "audio_rate_snapped" when its rate was
    snapped to bound the resampling kernel)."""
    notes = set()
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels, total = f.samplerate, f.channels, f.frames
            if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
                raise SampleError("bad_audio", "audio", f"sample rate {rate} Hz outside "
                                  f"[{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}]")
            if not 1 <= channels <= MAX_AUDIO_CHANNELS:
                raise SampleError("bad_audio", "audio", f"{channels} channels (at most {MAX_AUDIO_CHANNELS})")
            window = math.ceil(max_seconds * rate)
            # One second per block, mixed down as it arrives: never the whole file, never all channels.
            blocks = [block.mean(axis=1) for block in f.blocks(blocksize=rate, frames=window, dtype="float32",
                                                                always_2d=True)]
    except SampleError:
        raise
    except Exception as exc:  # noqa: BLE001 - libsndfile errors for corrupt/unknown data
        raise SampleError("bad_audio", "audio", f"{type(exc).__name__}: {exc}") from None
    mono = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    if mono.shape[0] == 0:
        raise SampleError("bad_audio", "audio", "no audio samples")
    if total > window:
        notes.add("audio_clipped")
    if not np.isfinite(mono).all():
        raise SampleError("bad_audio", "audio", "non-finite audio samples")
    if rate != target_rate:
        source_rate = resample_source_rate(rate, target_rate)
        if source_rate != rate:
            notes.add("audio_rate_snapped")
        if source_rate != target_rate:
            with torch.no_grad():
                mono = _resampler(source_rate, target_rate)(torch.from_numpy(np.ascontiguousarray(mono))).numpy()
    max_samples = math.floor(max_seconds * target_rate)
    if mono.shape[0] > max_samples:
        notes.add("audio_clipped")
        mono = mono[:max_samples]
    return np.ascontiguousarray(mono, dtype=np.float32), notes
