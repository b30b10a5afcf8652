"""Synthetic batches in the contract's layout, built with a real OmniProcessor.

Used by the model tests and tools/bench_step.py, which must run without any shard or
download: random images, noise "speech" and a handful of fixed questions/answers, run
through the same chat template, image processor and Whisper feature extractor as real
data. Prompts follow the batch contract (teacher: image + typed question; student:
image + audio placeholders), answer tokens are shared and labelled, the rest is -100.
"""

import numpy as np
import torch

from trainer.models.processing import AUDIO_END, AUDIO_PAD, AUDIO_START, IMAGE_PAD, OmniProcessor

QUESTIONS = ["what colour is the circle?", "how many shapes are there?", "is there a yellow star on the left?"]
ANSWERS = ["the circle is red.", "there are three circles.", "no. the star is on the right."]


def _prompt_ids(processor: OmniProcessor, user_text: str, n_image_tokens: int | None) -> list[int]:
    content = ([{"type": "image"}] if n_image_tokens is not None else []) + [{"type": "text", "text": user_text}]
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    if n_image_tokens is not None:
        prompt = prompt.replace(IMAGE_PAD, IMAGE_PAD * n_image_tokens, 1)
    return processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def _pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r if left else r + [value] * (width - len(r)) for r in rows])


def make_batch(
    processor: OmniProcessor,
    batch_size: int,
    *,
    seed: int = 0,
    with_image: bool = True,
    with_audio: bool = True,
    image_size: tuple[int, int] = (56, 84),
    audio_seconds: tuple[float, float] = (1.0, 4.0),
    prompt_only: bool = False,
) -> dict:
    """A micro-batch per the contract. `prompt_only`: an eval batch (left-padded prompts,
    no labels) as build_eval_loader yields, with `answers` for reference."""
    rng = np.random.default_rng(seed)
    tokenizer = processor.tokenizer
    keys, teacher_rows, student_rows, answer_rows, answers = [], [], [], [], []
    pixel_values, grids, features, counts = [], [], [], []
    for i in range(batch_size):
        keys.append(f"synthetic-{seed}-{i}")
        question, answer = QUESTIONS[(seed + i) % len(QUESTIONS)], ANSWERS[(seed + i) % len(ANSWERS)]
        n_image = None
        if with_image:
            h, w = image_size
            image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            out = processor.image_processor(images=[image], return_tensors="pt")
            pixel_values.append(out["pixel_values"])
            grids.append(out["image_grid_thw"])
            n_image = processor.image_token_count(out["image_grid_thw"][0])
        n_audio_samples = int(rng.uniform(*audio_seconds) * processor.sampling_rate)
        n_audio = processor.audio_token_count(n_audio_samples)
        if with_audio:
            wave = (0.1 * rng.standard_normal(min(n_audio_samples, processor.max_audio_samples))).astype(np.float32)
            mel = processor.feature_extractor(wave, sampling_rate=processor.sampling_rate, return_tensors="pt")
            features.append(mel["input_features"])
            counts.append(n_audio)
            spoken = AUDIO_START + AUDIO_PAD * n_audio + AUDIO_END
        else:
            spoken = question  # no audio: the student reads the question too
        teacher_rows.append(_prompt_ids(processor, question, n_image))
        student_rows.append(_prompt_ids(processor, spoken, n_image))
        answer_rows.append(tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
        answers.append(answer)

    batch = dict(
        keys=keys,
        pixel_values=torch.cat(pixel_values) if with_image else None,
        image_grid_thw=torch.cat(grids) if with_image else None,
        input_features=torch.cat(features) if with_audio else None,
        audio_token_counts=torch.tensor(counts) if with_audio else None,
    )
    for role, prompts in (("teacher", teacher_rows), ("student", student_rows)):
        if prompt_only:
            ids = _pad(prompts, processor.pad_id, left=True)
            batch[f"{role}_input_ids"] = ids
            batch[f"{role}_attention_mask"] = _pad([[1] * len(p) for p in prompts], 0, left=True)
        else:
            rows = [p + a for p, a in zip(prompts, answer_rows)]
            labels = [[-100] * len(p) + a for p, a in zip(prompts, answer_rows)]
            batch[f"{role}_input_ids"] = _pad(rows, processor.pad_id, left=False)
            batch[f"{role}_attention_mask"] = _pad([[1] * len(r) for r in rows], 0, left=False)
            batch[f"{role}_labels"] = _pad(labels, -100, left=False)
    if prompt_only:
        batch["answers"] = answers
    return batch
