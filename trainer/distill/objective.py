"""The Self-KD training objective: one module that owns the teacher pass, the student pass
and the loss of a micro-batch. The DeepSpeed engine wraps it, so ZeRO-3 sees every module
it calls; the loop calls it and logs what it returns.

For one micro-batch, on every rank, in this order:
  1. the vision tower, once (a dummy image when the batch has none): its features serve
     both passes;
  2. Whisper + projector (dummy audio when the batch has none);
  3. the teacher pass (SELFKD with alpha > 0): no grad, inside the teacher's context
     (shared: the live weights; frozen / EMA: their partitions swapped in), on the typed
     question; a teacher with its own weights turns its answer positions into logits inside
     its context, the shared teacher's logits are recomputed chunk by chunk in the loss;
  4. the student pass on the trained side (spoken question, or the typed one in the VL stage);
  5. the chunked LM head over answer positions only (trainer/distill/loss.py): summed CE,
     KD divergence, teacher CE and agreement; the loss is `combine` of those sums.
Every rank calls the same modules the same number of times (ZeRO-3 gathers collectively).
The image features come from the live vision tower, before the teacher context: with a
trainable vision tower a frozen / EMA teacher would see the student's image features
(trainer/config.py refuses that combination).
"""

from typing import NamedTuple

import torch
from torch import nn

from trainer.data.batch import Batch
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
    n_tokens: torch.Tensor  # answer tokens

    def sums(self) -> torch.Tensor:
        """The five sums as one float64 vector, in the order `combine_sums` reads them."""
        return torch.stack([self.ce_sum, self.kd_sum, self.teacher_ce_sum, self.agree_count, self.n_tokens]).double()


def combine_sums(sums, kd: KDSettings | None) -> float:
    """The per-token loss from reduced sums (ObjectiveOutput.sums(), summed over ranks)."""
    ce_sum, kd_sum, _, _, n_tokens = [float(v) for v in sums]
    return float(combine({"ce_sum": ce_sum, "kd_sum": kd_sum}, kd, n_tokens))


class SelfKDObjective(nn.Module):
    """Teacher + student + loss around one OmniModel. `kd` None (or alpha 0): plain SFT,
    no teacher pass. `teacher`: a trainer/distill/teachers.py teacher, set once the engine
    exists (frozen / EMA teachers copy ZeRO-3 partitions); the shared one until then."""

    def __init__(self, model: OmniModel, kd: KDSettings | None, *, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.kd = kd
        self.chunk_size = chunk_size
        self.teacher = SharedTeacher()

    @property
    def uses_teacher(self) -> bool:
        return self.kd is not None and self.kd.uses_teacher

    def forward(self, batch: Batch, normalizer: float, answer_chunks: int | None = None) -> ObjectiveOutput:
        """Loss of one micro-batch, normalised by `normalizer` (the trainer's global
        answer-token count, corrected for DeepSpeed's averaging). The LM head runs on chunks
        of at most `chunk_size` answer tokens, or on exactly `answer_chunks` chunks when
        given: under ZeRO-3 every rank must pass the same count (each LM-head call gathers)."""
        model = self.model
        batch = batch.to(model.adapter.input_embeddings().weight.device)
        image_tokens, vision_zero = model.encode_images(batch)
        audio_tokens, audio_zero = model.encode_audio(batch)

        teacher_answers = teacher_logits = teacher_targets = teacher_counts = None
        if self.uses_teacher:
            if not batch.has_teacher:
                raise ValueError(f"Self-KD needs the typed-question (teacher) side; batch of {batch.keys[:3]}... has none")
            with torch.no_grad(), self.teacher.context():
                detached_images = None if image_tokens is None else image_tokens.detach()
                teacher_hidden = model.hidden_states(batch, "teacher", detached_images, None)
                teacher_answers, teacher_targets, teacher_counts = model.answer_positions(teacher_hidden,
                                                                                          batch.teacher_labels)
                del teacher_hidden
                if self.teacher.swaps_weights:  # its logits only exist inside its context
                    bounds = chunk_bounds(teacher_answers.shape[0], self.chunk_size, answer_chunks)
                    teacher_logits = torch.cat([model.adapter.lm_head(teacher_answers[a:b]) for a, b in bounds])  # N, V
                    teacher_answers = None

        student_hidden = model.hidden_states(batch, "student", image_tokens, audio_tokens)
        student_answers, student_targets, student_counts = model.answer_positions(student_hidden, batch.student_labels)
        if self.uses_teacher:
            check_pairing(batch.keys, teacher_counts, student_counts, teacher_targets, student_targets)

        sums = answer_token_loss(student_answers, student_targets, model.adapter.lm_head, self.kd,
                                 teacher_hidden=teacher_answers, teacher_logits=teacher_logits,
                                 num_chunks=answer_chunks, chunk_size=self.chunk_size)
        return ObjectiveOutput(
            loss=combine(sums, self.kd, normalizer) + vision_zero + audio_zero,
            ce_sum=sums["ce_sum"].detach(),
            kd_sum=sums["kd_sum"].detach(),
            teacher_ce_sum=sums["teacher_ce_sum"],
            agree_count=sums["agree_count"],
            n_tokens=sums["n_tokens"],
        )


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
