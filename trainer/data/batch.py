"""The micro-batch: what the collator builds and the objective, the model, evaluation and the
benchmarks read. Its fields are documented here, once. And the stages that decide its shape.

Shapes: B samples; T the padded length of one side (student or teacher); P the image patches
of all the batch's images together (samples without an image add none); N_img the images;
M mel bins; W the mel window (3000 frames for Whisper).
"""

import dataclasses
import enum
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


class Stage(str, enum.Enum):
    """What a sample becomes; the sample encoder's mode (trainer/data/collate.py)."""

    SELFKD = "selfkd"  # student: [image] + spoken question; teacher: [image] + typed question; both -> answer
    ALIGN = "align"  # student only: speech -> transcript (ASR); no image, no teacher
    VL = "vl"  # student only: [image] + typed question -> answer (the typed path itself; no audio decoded)
    MIXED = "mixed"  # student only: each sample is ALIGN or VL as its JSON "stage" says (one CE-only run, both)
    EVAL = "eval"  # both prompts, left-padded, no answer tokens, with the scoring metadata
    TRANSCRIBE = "transcribe"  # EVAL of transcription: speech + ASR prompt ("audio"), its typed twin ("text")


TRAINING_STAGES = (Stage.SELFKD.value, Stage.ALIGN.value, Stage.VL.value, Stage.MIXED.value)
MIXED_STAGES = (Stage.ALIGN.value, Stage.VL.value)  # what a sample of a MIXED run may be
SIDES = ("student", "teacher")


@dataclass
class Batch:
    """One micro-batch. Training batches are right-padded with answer labels; evaluation
    batches (Stage.EVAL) are left-padded prompts with the reference answers instead."""

    keys: list  # B sample keys, for messages that name the sample
    student_input_ids: torch.Tensor  # B, T: the trained side's prompt (+ answer in training)
    student_attention_mask: torch.Tensor  # B, T: 1 on tokens, 0 on padding
    student_labels: torch.Tensor | None = None  # B, T: answer token ids, IGNORE_INDEX elsewhere (training)
    teacher_input_ids: torch.Tensor | None = None  # B, T': [image] + typed question (+ answer); SELFKD, EVAL
    teacher_attention_mask: torch.Tensor | None = None  # B, T'
    teacher_labels: torch.Tensor | None = None  # B, T': the same answer ids as the student's (checked)
    student_position_ids: torch.Tensor | None = None  # 3, B, T: M-RoPE positions (0 on padding), made on the CPU
    teacher_position_ids: torch.Tensor | None = None  # 3, B, T'
    input_features: torch.Tensor | None = None  # B, M, W: log-mel of each clip (None: no audio, as in VL)
    audio_token_counts: torch.Tensor | None = None  # B: <|audio_pad|> tokens (= valid audio tokens) per sample
    audio_frames: torch.Tensor | None = None  # B: valid mel frames of each clip (native audio towers read only those)
    pixel_values: torch.Tensor | None = None  # P, patch_dim: the images' patches, in sample order (Qwen)
    #                                           tiles, 3 * s * s: each image's tiles, flat, in order (InternVL)
    #                                           N_img, C, 3, 448, 448: each image's crops, zero-padded (Phi-4)
    image_grid_thw: torch.Tensor | None = None  # N_img, 3: (t, h, w) patch grid of each image (Qwen)
    image_sizes: torch.Tensor | None = None  # N_img, 2: the resized image's (h, w) (Phi-4)
    image_attention_mask: torch.Tensor | None = None  # N_img, C, 32, 32: valid patches of each crop (Phi-4)
    image_token_counts: torch.Tensor | None = None  # N_img: image placeholder tokens of each image
    # Evaluation only: what scoring needs (trainer/eval/scoring.py).
    questions: list | None = None  # B typed questions
    answers: list | None = None  # B lists of reference answers
    tasks: list | None = None  # B task names (yesno, choice, open, asr, ...) or None
    choices: list | None = None  # B option lists or None
    ids: list | None = None  # B sample ids
    sources: list | None = None  # B source data sets or None
    benches: list | None = None  # B benchmark grouping dicts ({"benchmark", ...}; tools/make_eval_shards.py) or None

    def __len__(self) -> int:
        return len(self.keys)

    def side(self, role: str) -> tuple:
        """(input_ids, attention_mask, labels) of "student" or "teacher"."""
        if role not in SIDES:
            raise ValueError(f"role must be one of {SIDES}, got {role!r}")
        return getattr(self, f"{role}_input_ids"), getattr(self, f"{role}_attention_mask"), getattr(self, f"{role}_labels")

    def position_ids(self, role: str) -> torch.Tensor | None:
        """The collator's M-RoPE positions of one side (3, B, T), or None."""
        return getattr(self, f"{role}_position_ids")

    @property
    def has_teacher(self) -> bool:
        return self.teacher_input_ids is not None

    def answer_tokens(self) -> int:
        """Answer tokens the student is trained on (0 for an evaluation batch)."""
        return 0 if self.student_labels is None else int((self.student_labels != IGNORE_INDEX).sum())

    def _map_tensors(self, fn) -> "Batch":
        return Batch(**{f.name: fn(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
                        for f in dataclasses.fields(self)})

    def pin_memory(self) -> "Batch":
        """A copy in page-locked memory (the DataLoader's pin thread calls this), so the copy to
        the GPU runs without making the host wait."""
        return self._map_tensors(torch.Tensor.pin_memory)

    def to(self, device=None, dtype=None) -> "Batch":
        """A copy with tensors on `device` and floating ones (pixels, mel) in `dtype`."""
        def move(value):
            if device is not None:
                value = value.to(device, non_blocking=True)
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            return value

        return self._map_tensors(move)


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor to `device` without making the host wait for queued device work (pinned
    memory, non-blocking copy)."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
