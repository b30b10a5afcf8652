"""The Self-KD training objective: one module that owns the teacher pass, the student pass
and the loss of a micro-batch. The DeepSpeed engine wraps it, so ZeRO-3 sees every module
it calls; the loop calls it and logs what it returns.

For one micro-batch, on every rank, in this order:
  0. on the CPU batch: placeholder counts checked, M-RoPE positions computed, the prefix the
     two sides share measured (no device value is read inside the step);
  1. the vision tower, once (a dummy image when the batch has none): its features serve
     both passes;
  2. Whisper + projector (dummy audio when the batch has none);
  3. the student pass on the trained side (spoken question, or the typed one in the VL stage);
  4. the teacher pass (SELFKD with alpha > 0), no grad, on the typed question:
     - shared teacher (the live weights), `share_prefix` on: the prefix both sides share (the
       system prompt and the image, up to the first token where the typed and the spoken
       sequence differ, the shortest over the micro-batch) is not recomputed: the teacher runs
       only its question and answer, attending to the student's keys and values of that prefix
       (detached). Same weights, same tokens, same positions: the same teacher logits (tested
       to 1e-5). Not with gradient checkpointing (the checkpointed student keeps no cache).
     - frozen / EMA teacher (its own weights, swapped in by its context), or no sharing: the
       whole typed sequence, before the student pass; a teacher with its own weights turns its
       answer positions into logits inside its context.
  5. the chunked LM head over answer positions only (trainer/distill/loss.py): summed CE,
     KD divergence, teacher CE and agreement; the loss is `combine` of those sums.
Every rank calls the same modules the same number of times (ZeRO-3 gathers collectively).
The image features come from the live vision tower, outside the teacher context: with a
trainable vision tower a frozen / EMA teacher would see the student's image features
(trainer/config.py refuses that combination).
"""

import dataclasses
from typing import NamedTuple

import torch
from torch import nn
from torch.profiler import record_function
from transformers import DynamicCache

from trainer.data.batch import IGNORE_INDEX, Batch, to_device
from trainer.distill.loss import KDSettings, answer_token_loss, chunk_bounds, combine
from trainer.distill.teachers import SharedTeacher
from trainer.models.omni import OmniModel

MODEL_PREFIX = "model."  # the model's parameter names inside the objective (and engine checkpoints)


class ObjectiveOutput(NamedTuple):
    """The loss to back-propagate and the micro-batch's sums the loop reduces and logs. A
    NamedTuple: ZeRO-3 must find the loss among the engine module's outputs to hook its
    backward (a dataclass would hide it)."""

    loss: torch.Tensor  # combine(sums) + the zero terms of dummy encoder passes
    ce_sum: torch.Tensor  # student cross-entropy summed over answer tokens (detached)
    kd_sum: torch.Tensor  # divergence summed over answer tokens, before alpha * T^2 (detached)
    teacher_ce_sum: torch.Tensor  # the teacher's CE on the same tokens (0 without a teacher pass)
    agree_count: torch.Tensor  # answer tokens where teacher and student argmax agree
    teacher_entropy_sum: torch.Tensor  # the teacher's answer-token entropy (nats, T = 1) summed
    n_tokens: torch.Tensor  # answer tokens
    teacher_tokens: float  # tokens the teacher pass computed (the prefix it shared with the student excluded)

    def sums(self) -> torch.Tensor:
        """The six device sums as one float64 vector (OUTPUT_SUMS long), in combine_sums' order."""
        return torch.stack([self.ce_sum, self.kd_sum, self.teacher_ce_sum, self.agree_count,
                            self.teacher_entropy_sum, self.n_tokens]).double()


OUTPUT_SUMS = 6


def combine_sums(sums, kd: KDSettings | None, on_policy_sums=None) -> float:
    """The per-token loss from reduced sums (ObjectiveOutput.sums(), summed over ranks, every
    micro-batch's). `on_policy_sums`: the part of them from on-policy micro-batches, whose loss
    is the KD term alone (alpha 1)."""
    ce_sum, kd_sum, _, _, _, n_tokens = [float(v) for v in sums]
    if on_policy_sums is None or kd is None or not float(on_policy_sums[-1]):
        return float(combine({"ce_sum": ce_sum, "kd_sum": kd_sum}, kd, n_tokens))
    on_ce, on_kd = float(on_policy_sums[0]), float(on_policy_sums[1])
    off = combine({"ce_sum": ce_sum - on_ce, "kd_sum": kd_sum - on_kd}, kd, n_tokens)
    return float(off + combine({"ce_sum": on_ce, "kd_sum": on_kd}, dataclasses.replace(kd, alpha=1.0), n_tokens))


def answer_index(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the answer tokens are, from CPU labels (B, T): (flat indices into the (B*T, H)
    hidden states of the positions that predict them, their target ids, answer tokens per
    sample). Hidden state t predicts token t+1. Index gathers replace boolean masks on the
    device, which would make the host wait for the count."""
    batch, width = labels.shape
    mask = labels[:, 1:] != IGNORE_INDEX  # B, T-1
    rows, cols = mask.nonzero(as_tuple=True)
    return rows * width + cols, labels[:, 1:][mask], mask.sum(1)


def shared_prefix_length(batch: Batch) -> int:
    """Tokens at the start of every sample that the typed and the spoken sequence share (the
    system prompt, the image): the first position where any sample's two sides differ, and
    never past the position that predicts any sample's first answer token."""
    student, teacher = batch.student_input_ids, batch.teacher_input_ids
    width = min(student.shape[1], teacher.shape[1])
    differs = (student[:, :width] != teacher[:, :width]).any(dim=0)  # T
    prefix = int(differs.int().argmax()) if bool(differs.any()) else width
    for labels in (batch.student_labels, batch.teacher_labels):
        if labels is not None and bool((labels != IGNORE_INDEX).any()):
            first_answer = int((labels != IGNORE_INDEX).int().argmax(dim=1).min())
            prefix = min(prefix, first_answer - 1)
    return max(prefix, 0)


class SelfKDObjective(nn.Module):
    """Teacher + student + loss around one OmniModel. `kd` None (or alpha 0): plain SFT,
    no teacher pass. `teacher`: a trainer/distill/teachers.py teacher, set once the engine
    exists (frozen / EMA teachers copy ZeRO-3 partitions); the shared one until then."""

    def __init__(self, model: OmniModel, kd: KDSettings | None, *, chunk_size: int = 1024, share_prefix: bool = True):
        super().__init__()
        self.model = model
        self.kd = kd
        self.chunk_size = chunk_size
        self.share_prefix = share_prefix
        self.teacher = SharedTeacher()

    @property
    def uses_teacher(self) -> bool:
        return self.kd is not None and self.kd.uses_teacher

    def _prefix_to_share(self, batch: Batch) -> int:
        """Tokens the teacher may take from the student's cache (0: the whole typed sequence)."""
        language_model = self.model.adapter.language_model
        checkpointed = getattr(language_model, "gradient_checkpointing", False) and self.training
        if not (self.share_prefix and self.uses_teacher) or self.teacher.swaps_weights or checkpointed:
            return 0
        limit = self.model.adapter.prefix_sharing_limit  # Phi-4's LongRoPE: factors change past it
        if limit is not None and max(batch.student_input_ids.shape[1], batch.teacher_input_ids.shape[1]) > limit:
            return 0
        return shared_prefix_length(batch)

    def forward(self, batch: Batch, normalizer: float, answer_chunks: int | None = None,
                on_policy: bool = False) -> ObjectiveOutput:
        """Loss of one micro-batch, normalised by `normalizer` (the trainer's global
        answer-token count, corrected for DeepSpeed's averaging). The LM head runs on chunks
        of at most `chunk_size` answer tokens, or on exactly `answer_chunks` chunks when
        given: under ZeRO-3 every rank must pass the same count (each LM-head call gathers).
        Pass the batch on the CPU: what the host needs from it is read there (step 0).
        `on_policy`: the answers are the student's own (trainer/distill/on_policy.py): the loss
        is the KD term alone (alpha 1); the CE sum is still computed and returned."""
        model = self.model
        device = model.adapter.input_embeddings().weight.device
        if self.uses_teacher and not batch.has_teacher:
            raise ValueError(f"Self-KD needs the typed-question (teacher) side; batch of {batch.keys[:3]}... has none")
        with record_function("objective/host_prep"):  # reads of the CPU batch only (no device value)
            sides = ("student", "teacher") if self.uses_teacher else ("student",)
            for role in sides:
                model.check_placeholders(batch, role)
            prefix = self._prefix_to_share(batch)
            # Everything the host needs is taken from the CPU batch and sent ahead without waiting.
            positions = {role: to_device(model.positions(batch, role), device) for role in sides}
            student_index, student_targets, student_counts = answer_index(batch.student_labels)
            if self.uses_teacher:
                teacher_index, teacher_targets, teacher_counts = answer_index(batch.teacher_labels[:, prefix:])
                check_pairing(batch.keys, teacher_counts, student_counts, teacher_targets, student_targets)
                teacher_index = to_device(teacher_index, device)
            image_suffix = to_device(_image_index_from(batch, model.image_token_id, prefix), device) if prefix else None
            teacher_tokens = float(batch.teacher_attention_mask[:, prefix:].sum()) if self.uses_teacher else 0.0
            targets = to_device(student_targets, device)
            student_index = to_device(student_index, device)
            batch = model.cut_audio_input(batch)  # Whisper's input: the longest clip, or the window
        # The audio counts stay on the CPU: encode_audio builds its gather index from them.
        batch = dataclasses.replace(batch.to(device), audio_token_counts=batch.audio_token_counts)

        with record_function("objective/vision"):
            image_tokens, vision_zero = model.encode_images(batch)
        with record_function("objective/audio"):
            audio_tokens, audio_zero = model.encode_audio(batch)

        teacher_answers = teacher_logits = None
        if self.uses_teacher and not prefix:
            with record_function("objective/teacher"), torch.no_grad(), self.teacher.context():
                detached_images = None if image_tokens is None else image_tokens.detach()
                teacher_hidden, _ = model.run_side(batch, "teacher", detached_images, None, positions["teacher"])
                teacher_answers = _gather(teacher_hidden, teacher_index)  # N, H
                del teacher_hidden
                if self.teacher.swaps_weights:  # its logits only exist inside its context
                    bounds = chunk_bounds(teacher_answers.shape[0], self.chunk_size, answer_chunks)
                    teacher_logits = torch.cat([model.adapter.lm_head(teacher_answers[a:b]) for a, b in bounds])  # N, V
                    teacher_answers = None

        with record_function("objective/student"):
            student_hidden, cache = model.run_side(batch, "student", image_tokens, audio_tokens, positions["student"],
                                                   use_cache=bool(prefix))
            student_answers = _gather(student_hidden, student_index)  # N, H
        if prefix:
            with record_function("objective/teacher"), torch.no_grad(), self.teacher.context():
                prefix_cache = DynamicCache(ddp_cache_data=[(k[:, :, :prefix].detach(), v[:, :, :prefix].detach())
                                                            for k, v, _ in cache])
                del cache
                suffix_images = None if image_tokens is None else image_tokens.detach().index_select(0, image_suffix)
                teacher_hidden, _ = model.run_side(batch, "teacher", suffix_images, None, positions["teacher"],
                                                   cache=prefix_cache, start=prefix)
                teacher_answers = _gather(teacher_hidden, teacher_index)  # N, H
                del teacher_hidden, prefix_cache

        with record_function("objective/loss"):
            sums = answer_token_loss(student_answers, targets, model.adapter.lm_head, self.kd,
                                     teacher_hidden=teacher_answers, teacher_logits=teacher_logits,
                                     num_chunks=answer_chunks, chunk_size=self.chunk_size)
        kd = dataclasses.replace(self.kd, alpha=1.0) if on_policy and self.kd is not None else self.kd
        return ObjectiveOutput(
            loss=combine(sums, kd, normalizer) + vision_zero + audio_zero,
            ce_sum=sums["ce_sum"].detach(),
            kd_sum=sums["kd_sum"].detach(),
            teacher_ce_sum=sums["teacher_ce_sum"],
            agree_count=sums["agree_count"],
            teacher_entropy_sum=sums["teacher_entropy_sum"],
            n_tokens=sums["n_tokens"],
            teacher_tokens=teacher_tokens,
        )


def _gather(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of (B, T, H) hidden states at flat positions `index` (answer_index): N, H."""
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)


def _image_index_from(batch: Batch, image_token_id: int, start: int) -> torch.Tensor:
    """Indices (into the batch's image features, in placeholder order) of the teacher's image
    placeholders at positions `start` and later: those its suffix pass must embed."""
    placeholders = batch.teacher_input_ids == image_token_id  # B, T
    in_suffix = torch.zeros_like(placeholders)
    in_suffix[:, start:] = True
    return in_suffix[placeholders].nonzero().squeeze(1)


def check_pairing(keys, teacher_counts, student_counts, teacher_targets, student_targets) -> None:
    """Teacher and student must select the same answer tokens, sample by sample: say which
    samples differ, never pair them silently."""
    if not torch.equal(teacher_counts, student_counts):
        bad = {k: (int(t), int(s)) for k, t, s in zip(keys, teacher_counts, student_counts) if t != s}
        raise ValueError(f"teacher and student answer-token counts differ (sample key: (teacher, student)): {bad}")
    if not torch.equal(teacher_targets, student_targets):
        offsets = [0] + torch.cumsum(student_counts, 0).tolist()
        bad = [k for k, a, b in zip(keys, offsets[:-1], offsets[1:])
               if not torch.equal(teacher_targets[a:b], student_targets[a:b])]
        raise ValueError(f"teacher and student answer label ids differ for samples {bad}")
