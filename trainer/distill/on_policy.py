"""On-policy Self-KD (GKD, Agarwal et al. 2024; TRL's GKDTrainer): on a share of the
micro-batches the student answers the spoken question itself, and the typed teacher grades
every token of that answer.

For an on-policy micro-batch, before the step's statistics (its answer tokens change):
  1. `prompt_batch`: the training batch's two prompts (answers cut off), LEFT-padded, with the
     collator's positions of the prompt tokens;
  2. `sample_answers`: the student (the live model, eval mode, no grad) decodes its answer to
     the spoken prompt: softmax(logits / --gen_temperature) sampled (0 = greedy) for at most
     --gen_max_new_tokens tokens, each answer cut after its end token (the turn's end, the
     tokenizer's end of sequence or its pad token), never another special token (an image or
     audio placeholder fed back as input would claim a feature that is not there; a modality's
     start marker would confuse a native family's positions). Under ZeRO-3 with
     several ranks every rank runs all --gen_max_new_tokens decoding steps (ranks whose answers
     ended keep stepping), so every rank calls the same modules: the parameters are gathered
     module by module, as in training, not the whole model at once (a whole-model gather, TRL's
     ds3_gather_for_generation, would not fit an 8B model's ZeRO-3 partitions on one GPU
     beside its optimizer). The sampler is seeded by (seed, step, micro-batch, rank): a resumed
     run draws the same answers;
  3. `with_answers`: the training batch again with the generated ids as the answer of both
     sides: spoken prompt + answer for the student, typed prompt + the same answer for the
     teacher, labels on the answer (its end token included when it ended), cut to --max_seq_len;
     positions: the prompt's, then one more per answer token on every axis (text after the
     prompt, exactly as the decoding steps had them). The token budget plans every answer as
     at least --gen_max_new_tokens long (`answer_reserve`), so a micro-batch stays within it.
The objective then runs unchanged: the teacher (shared, frozen, EMA, or the adapters-off model)
scores the student's tokens given the typed question, with the prefix-shared teacher where it
applies, and the divergence (--kd_divergence, gjsd with --kd_beta) runs over the generated
tokens. The CE term is dropped on an on-policy micro-batch (alpha 1 there, as GKD): CE on the
student's own sample would teach it to repeat itself, and CE on the reference answer would cost
a second student pass. Off-policy micro-batches keep alpha * KD + (1 - alpha) * CE.

Which micro-batches are on-policy is drawn from (seed, step, micro-batch index) alone: the same
on every rank, so every rank generates in the same micro-batches.
"""

import contextlib
import dataclasses

import numpy as np
import torch

from trainer.data.batch import IGNORE_INDEX, Batch


def is_on_policy(seed: int, step: int, micro: int, fraction: float) -> bool:
    """Whether micro-batch `micro` of optimizer step `step` (1-based) is on-policy: a draw from
    (seed, step, micro) alone, identical on every rank."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    return bool(np.random.default_rng([seed, 0x6F70, step, micro]).random() < fraction)


def _prompt_lengths(labels: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    """Tokens before each sample's answer (its first label); a sample without one: all of it."""
    has_answer = (labels != IGNORE_INDEX).any(dim=1)
    first = (labels != IGNORE_INDEX).int().argmax(dim=1)
    return [int(f) if a else int(m) for f, a, m in zip(first, has_answer, attention_mask.sum(dim=1))]


def _sides(batch: Batch):
    """(role, input_ids, attention_mask, labels, prompt lengths) of each side the batch has."""
    for role in ("student", "teacher"):
        input_ids, attention_mask, labels = batch.side(role)
        if input_ids is not None:
            yield role, input_ids, attention_mask, labels, _prompt_lengths(labels, attention_mask)


def prompt_batch(batch: Batch, pad_id: int) -> Batch:
    """The right-padded training batch's prompts (answers cut off), LEFT-padded with `pad_id`
    as generation wants them, both sides, with the collator's positions of the prompt tokens."""
    fields = {}
    for role, input_ids, attention_mask, _, lengths in _sides(batch):
        width = max(lengths)
        ids = torch.full((len(lengths), width), pad_id, dtype=input_ids.dtype)
        mask = torch.zeros((len(lengths), width), dtype=attention_mask.dtype)
        positions = batch.position_ids(role)
        left = None if positions is None else torch.zeros((positions.shape[0], len(lengths), width),
                                                           dtype=positions.dtype)
        for i, n in enumerate(lengths):
            ids[i, width - n:] = input_ids[i, :n]
            mask[i, width - n:] = 1
            if left is not None:
                left[:, i, width - n:] = positions[:, i, :n]
        fields.update({f"{role}_input_ids": ids, f"{role}_attention_mask": mask, f"{role}_labels": None,
                       f"{role}_position_ids": left})
    return dataclasses.replace(batch, **fields)


def with_answers(batch: Batch, answers: list[list[int]], pad_id: int, max_len: int | None = None) -> Batch:
    """The training batch with `answers[i]` as sample i's answer on both sides (right-padded,
    labels on the answer tokens only). Positions: the collator's of the prompt, then one more on
    every axis per answer token (text after the prompt, as generation gave them); none when the
    batch has none. `max_len`: an answer is cut so that neither side passes it (as the encoder's
    --max_seq_len check). An empty answer is an error naming the sample."""
    if max_len is not None:
        room = [max_len - max(n) for n in zip(*(lengths for *_, lengths in _sides(batch)))]
        answers = [answer[:max(r, 1)] for answer, r in zip(answers, room)]
    empty = [key for key, answer in zip(batch.keys, answers) if not answer]
    if empty:
        raise ValueError(f"on-policy: no generated token for samples {empty}")
    fields = {}
    for role, input_ids, attention_mask, labels, lengths in _sides(batch):
        rows = [input_ids[i, :n].tolist() + answer for i, (n, answer) in enumerate(zip(lengths, answers))]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype)
        mask = torch.zeros((len(rows), width), dtype=attention_mask.dtype)
        new_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=labels.dtype)
        positions = batch.position_ids(role)
        new_positions = None if positions is None else torch.zeros((positions.shape[0], len(rows), width),
                                                                    dtype=positions.dtype)
        for i, (row, n) in enumerate(zip(rows, lengths)):
            ids[i, :len(row)] = torch.tensor(row, dtype=input_ids.dtype)
            mask[i, :len(row)] = 1
            new_labels[i, n:len(row)] = ids[i, n:len(row)]
            if new_positions is not None:
                prompt = positions[:, i, :n]
                new_positions[:, i, :n] = prompt
                new_positions[:, i, n:len(row)] = prompt.max() + 1 + torch.arange(len(row) - n)
        fields.update({f"{role}_input_ids": ids, f"{role}_attention_mask": mask, f"{role}_labels": new_labels,
                       f"{role}_position_ids": new_positions})
    return dataclasses.replace(batch, **fields)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def sample_answers(model, batch: Batch, *, max_new_tokens: int, temperature: float, seed: int, step: int, micro: int,
                   rank: int, synced: bool, device=None) -> list[list[int]]:
    """The student's own answers to the spoken prompts of a training batch (see the module
    docstring): token ids, each up to and including its end token."""
    device = device or model.adapter.input_embeddings().weight.device
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.default_rng([seed, 0x6770, step, micro, rank]).integers(2**62)))
    with _eval_mode(model):
        return model.generate_ids(prompt_batch(batch, model.processor.pad_id), "audio", max_new_tokens, synced_gpus=synced,
                                  temperature=temperature, generator=generator, suppress_special=True)
