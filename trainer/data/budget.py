"""Micro-batches by token budget (`--max_tokens_per_micro_batch N`): the stream collects a
buffer of encoded samples, sorts it by length and cuts it into micro-batches whose padded
size stays within N tokens, so each carries about N real tokens and little padding.

Size of a micro-batch of n samples: n x (longest student sequence + longest teacher
sequence), the tokens the LLM's passes compute, padding included (the teacher side counts
only when the run has a teacher pass). Audio has no term of its own: a clip's tokens are part
of its student sequence (12.5 per second), but a small part next to an image and an answer,
so sorting by length does not group clips of similar length, and the audio encoder, reading
the batch's longest clip, pads about as much as with a fixed sample count (measured:
docs/training.md).

A sample longer than N on its own forms a micro-batch alone (over the budget; --max_seq_len
bounds it). The micro-batches of one buffer are handed out in a seeded random order, so the
step does not see long and short samples in sorted runs; the last one cut (the shortest
samples' rest) may be part-filled.
"""

import numpy as np


def sample_lengths(sample: dict, with_teacher: bool, answer_reserve: int = 0) -> tuple[int, int]:
    """(student, teacher) sequence tokens (prompt + answer) of an encoded training sample;
    teacher 0 without a teacher pass or a typed side. `answer_reserve`: the answer counts as at
    least this many tokens (on-policy runs: the student's own answer may be that long)."""
    answer = max(len(sample.get("answer_ids", ())), answer_reserve)
    student = len(sample["student_prompt_ids"]) + answer
    teacher = len(sample["teacher_prompt_ids"]) + answer if with_teacher and "teacher_prompt_ids" in sample else 0
    return student, teacher


def padded_tokens(lengths: list[tuple[int, int]]) -> int:
    """Tokens a micro-batch of these (student, teacher) lengths computes, padding included."""
    if not lengths:
        return 0
    return len(lengths) * (max(s for s, _ in lengths) + max(t for _, t in lengths))


def plan_micro_batches(lengths: list[tuple[int, int]], max_tokens: int, rng: np.random.Generator) -> list[list[int]]:
    """Indices into `lengths` grouped into micro-batches of padded size <= max_tokens (a lone
    sample may exceed it): longest first, each micro-batch filled greedily while the next
    sample fits; the micro-batches in an order drawn from `rng`."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (-(lengths[i][0] + lengths[i][1]), i))
    groups, current, longest_s, longest_t = [], [], 0, 0
    for i in order:
        s, t = lengths[i]
        grown_s, grown_t = max(longest_s, s), max(longest_t, t)
        if current and (len(current) + 1) * (grown_s + grown_t) > max_tokens:
            groups.append(current)
            current, grown_s, grown_t = [], s, t
        current.append(i)
        longest_s, longest_t = grown_s, grown_t
    if current:
        groups.append(current)
    return [groups[k] for k in rng.permutation(len(groups))]
