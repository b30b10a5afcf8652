"""Synthetic batches for tests and benchmarks, built the way real ones are: raw samples
(random PNG images, noise "speech" as WAV, a handful of fixed questions and answers) go
through the same SampleEncoder and collator as shard samples, so no second implementation
of prompts, padding or features exists. No shard or download needed.
"""

import io
import json

import numpy as np
import soundfile as sf
from PIL import Image

from trainer.data.batch import Batch, Stage
from trainer.data.collate import SampleEncoder, collate_eval, collate_train
from trainer.models.processing import OmniProcessor

QUESTIONS = ["what colour is the circle?", "how many shapes are there?", "is there a yellow star on the left?"]
ANSWERS = ["the circle is red.", "there are three circles.", "no. the star is on the right."]


def raw_sample(key: str, question: str, answer: str, rng: np.random.Generator, *, image_size: tuple | None,
               audio_seconds: float, sampling_rate: int) -> dict:
    """One sample as a shard holds it: {"__key__", "json", "wav"[, "png"]} of bytes."""
    sample = {"__key__": key, "json": json.dumps({"question": question, "answer": answer}).encode()}
    wave = (0.1 * rng.standard_normal(int(audio_seconds * sampling_rate))).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, wave, sampling_rate, format="WAV")
    sample["wav"] = buffer.getvalue()
    if image_size is not None:
        h, w = image_size
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
        sample["png"] = buffer.getvalue()
    return sample


def make_batch(
    processor: OmniProcessor,
    batch_size: int,
    *,
    seed: int = 0,
    with_image: bool = True,
    stage: Stage | str = Stage.SELFKD,
    image_size: tuple[int, int] | list = (56, 84),
    audio_seconds: tuple[float, float] = (1.0, 4.0),
    max_seq_len: int = 32768,
) -> Batch:
    """A micro-batch of `stage`: SELFKD / VL / ALIGN training batches (right-padded, with
    labels) or an EVAL batch (left-padded prompts with reference answers). `image_size`:
    (h, w) for every sample, or a list with one (h, w), or None for no image, per sample."""
    sizes = image_size if isinstance(image_size, list) else [image_size] * batch_size
    rng = np.random.default_rng(seed)
    encoder = SampleEncoder(processor, stage, max_seq_len)
    samples = []
    for i in range(batch_size):
        question, answer = QUESTIONS[(seed + i) % len(QUESTIONS)], ANSWERS[(seed + i) % len(ANSWERS)]
        raw = raw_sample(f"synthetic-{seed}-{i}", question, answer, rng, image_size=sizes[i] if with_image else None,
                         audio_seconds=float(rng.uniform(*audio_seconds)), sampling_rate=processor.sampling_rate)
        samples.append(encoder(raw)[0])
    collate = collate_eval if encoder.stage == Stage.EVAL else collate_train
    return collate(samples, processor.pad_id)
