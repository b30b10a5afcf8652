"""Per-sample encoding (image patches, log-mel, prompt and answer token ids) and the
collators that turn encoded samples into a `Batch` (trainer/data/batch.py).

Stages (`Stage`): the sample encoder's mode decides what a sample becomes.
  SELFKD  [image] + spoken question -> answer (student), [image] + typed question -> answer (teacher)
  VL      [image] + typed question -> answer, as the student; no teacher, audio not decoded
  MIXED   each sample is ALIGN or VL as its JSON "stage" says (a sample without it is a bad_json
          skip): one CE-only run that trains hearing and reading together. Both stages call the
          same modules (a dummy pass stands in for a missing image or clip), so micro-batches of
          any mix keep every rank in step under ZeRO-3; the mix's weights are the data's counts
  ALIGN   speech -> transcript ("transcript", else the spoken "question"), student only; a sample
          with a "context" is a spoken question on a typed text instead: the context, a line
          break, then the speech -> "answer" (the text where a picture would be: the prompt
          ends with the speech, as a spoken question about an image does); a sample whose JSON
          has "with_image": true keeps its image member in front of the speech (transcription
          with a picture in the prompt: speech after a picture, with no question about it
          answered); without that key an ALIGN sample's image is never decoded
  EVAL    both prompts (no answer tokens) plus the scoring metadata
  TRANSCRIBE  EVAL of transcription (task "asr", reference the transcript): the student prompt is
          ALIGN's (speech + instruction), the teacher's its typed twin (the transcript written
          where the audio would be, then the same instruction); no image

Over-long rule: a sample whose teacher or student sequence (prompt + answer) exceeds
max_seq_len is dropped and counted as "too_long"; answers are never truncated, because a
cut answer would teach the model to stop mid-sentence. Audio longer than the encoder
window is cut to the window and counted as "audio_clipped" (the sample is kept).

Failure rule: whatever goes wrong while one sample is encoded (a decoder, the image
processor, the tokenizer or a chat template raising anything) is a SampleError naming the
field being worked on ("json", "audio", "image", "text"), so the stream skips and counts
that one sample instead of the job dying on it.

Text-only rule (SELFKD, VL, EVAL): a sample without an image member is a text-only sample
(prompts without the image slot); the collator concatenates the patches of the samples that
have images, in sample order, so a batch may mix both kinds. An image member that is present
but undecodable is still a bad sample. JSON is required in every stage, audio in all but VL
("missing_key").
"""

import contextlib

import torch

from trainer.data.batch import IGNORE_INDEX, MIXED_STAGES, Batch, Stage
from trainer.data.decode import SampleError, decode_audio, decode_image, decode_json, find_member, require_text
from trainer.data.shards import AUDIO_EXTS, IMAGE_EXTS
from trainer.models.processing import OmniProcessor

ASR_INSTRUCTION = "\nTranscribe the audio."


def image_max_pixels(image_processor) -> int:
    """The image processor's pixel cap (Qwen2-VL: size["longest_edge"] or max_pixels)."""
    size = getattr(image_processor, "size", None)
    for value in (getattr(size, "longest_edge", None),
                  size.get("longest_edge") if isinstance(size, dict) else None,
                  getattr(image_processor, "max_pixels", None)):
        if value:
            return int(value)
    return 12_845_056  # Qwen2-VL's documented default max_pixels


@contextlib.contextmanager
def failures_as(reason: str, field: str):
    """Turn any exception but SampleError raised inside into SampleError(reason, field)."""
    try:
        yield
    except SampleError:
        raise
    except Exception as exc:  # noqa: BLE001 - one sample's failure, whatever its type, is a counted skip
        raise SampleError(reason, field, f"{type(exc).__name__}: {exc}") from None


class SampleEncoder:
    """Raw shard sample ({"__key__", ext: bytes}) -> encoded sample dict (tensors and id
    lists) for `stage` (see the module docstring), or SampleError."""

    def __init__(self, processor, stage: Stage | str, max_seq_len: int):
        self.stage = Stage(stage)
        self.processor = processor
        self.max_seq_len = int(max_seq_len)
        self.max_pixels = image_max_pixels(processor.image_processor)

    def __call__(self, raw: dict) -> tuple[dict, set]:
        """Returns (encoded sample, notes): notes name what was adjusted and kept
        ("audio_clipped", "audio_rate_snapped", "image_padded")."""
        with failures_as("bad_json", "json"):
            meta = decode_json(raw)
            stage = self._sample_stage(meta)
            if stage == Stage.ALIGN and "context" in meta:  # a spoken question on a typed text
                answer = require_text(meta, "answer", "empty_answer")
                question = require_text(meta, "context", "empty_question") + "\n"
            elif stage in (Stage.ALIGN, Stage.TRANSCRIBE):
                answer_field = "transcript" if "transcript" in meta else "question"
                answer = require_text(meta, answer_field, "empty_answer")
                question = answer + ASR_INSTRUCTION if stage == Stage.TRANSCRIBE else None
            else:
                question = require_text(meta, "question", "empty_question")
                answer = str(meta.get("answer", "")) if stage == Stage.EVAL else \
                    require_text(meta, "answer", "empty_answer")
        sample, notes = {"key": raw["__key__"]}, set()
        if stage != Stage.VL:
            with failures_as("bad_audio", "audio"):
                _, audio_bytes = find_member(raw, AUDIO_EXTS, "audio")
                rate = self.processor.sampling_rate
                audio, notes = decode_audio(audio_bytes, rate, self.processor.max_audio_samples / rate)
                sample["audio_token_count"] = self.processor.audio_token_count(len(audio))
                if sample["audio_token_count"] < 1:  # a native audio tower's output for a few milliseconds
                    raise SampleError("bad_audio", "audio", f"{len(audio) / rate * 1000:.0f} ms of audio is too short "
                                      f"for the {self.processor.family} audio tower (no output token)")
                sample["audio_frames"] = self.processor.mel_frames(len(audio))
                sample["input_features"] = self.processor.audio_features(audio)  # n_mels, frames (Whisper: the window)
                sample["audio_seconds"] = len(audio) / rate
        num_image_tokens = 0
        image_bytes = next((raw[ext] for ext in IMAGE_EXTS if ext in raw), None)
        picture = stage == Stage.ALIGN and meta.get("with_image") is True
        if picture and image_bytes is None:
            raise SampleError("missing_key", "image", "'with_image': true but the sample has no image member")
        if (picture or stage not in (Stage.ALIGN, Stage.TRANSCRIBE)) and image_bytes is not None:
            with failures_as("bad_image", "image"):
                image, padded = decode_image(image_bytes, self.max_pixels)
                if padded:
                    notes.add("image_padded")
                sample["image"], num_image_tokens = self.processor.encode_image(image)  # the family's tensors
                sample["image_token_count"] = num_image_tokens
        with failures_as("bad_text", "text"):
            self._encode_text(stage, sample, meta, question, answer, num_image_tokens)
        return sample, notes

    def _sample_stage(self, meta: dict) -> Stage:
        """The run's stage, or in a MIXED run the sample's own ("stage" in its JSON)."""
        if self.stage != Stage.MIXED:
            return self.stage
        if meta.get("stage") not in MIXED_STAGES:
            raise SampleError("bad_json", "json", f"a --stage mixed sample needs 'stage' in its JSON, one of "
                              f"{MIXED_STAGES}; got {meta.get('stage')!r}")
        return Stage(meta["stage"])

    def _encode_text(self, stage: Stage, sample: dict, meta: dict, question: str | None, answer: str,
                     num_image_tokens: int) -> None:
        """Prompt ids (student, and teacher where the stage has one), answer ids and, for
        EVAL, the scoring metadata."""
        image_slot = [{"type": "image"}] if "image" in sample else []
        typed = image_slot + [{"type": "text", "text": question}]
        spoken_text = self.processor.audio_span  # the family's start, pad and end tokens
        if stage == Stage.ALIGN:  # the speech, then the ASR instruction; or a typed context, then the speech
            text = question + spoken_text if question else spoken_text + ASR_INSTRUCTION
            student = image_slot + [{"type": "text", "text": text}]
        elif stage == Stage.TRANSCRIBE:
            student = [{"type": "text", "text": spoken_text + ASR_INSTRUCTION}]
            sample["teacher_prompt_ids"] = self._prompt_ids(typed, 0, 0)
        elif stage == Stage.VL:
            student = typed
        else:
            student = image_slot + [{"type": "text", "text": spoken_text}]
            sample["teacher_prompt_ids"] = self._prompt_ids(typed, num_image_tokens, 0)
        sample["student_prompt_ids"] = self._prompt_ids(student, num_image_tokens, sample.get("audio_token_count", 0))
        if stage in (Stage.EVAL, Stage.TRANSCRIBE):
            transcribe = stage == Stage.TRANSCRIBE
            sample.update(question=question, answer=answer, task="asr" if transcribe else meta.get("task"),
                          choices=None if transcribe else meta.get("choices"), source=meta.get("source"),
                          id=meta.get("id", sample["key"]), bench=None if transcribe else meta.get("bench"),
                          answers=[answer] if transcribe else meta.get("answers") or ([answer] if answer else []))
            longest = max(len(sample["student_prompt_ids"]), len(sample["teacher_prompt_ids"]))
        else:
            sample["answer_ids"] = self.processor.tokenizer(answer + self.processor.turn_end, add_special_tokens=False)["input_ids"]
            longest = len(sample["student_prompt_ids"]) + len(sample["answer_ids"])
            if "teacher_prompt_ids" in sample:
                longest = max(longest, len(sample["teacher_prompt_ids"]) + len(sample["answer_ids"]))
        if longest > self.max_seq_len:
            raise SampleError("too_long", "tokens", f"{longest} tokens > max_seq_len {self.max_seq_len}")
        # M-RoPE positions of each whole side, here on the CPU, so the step never reads them off the device.
        grids = list(sample["image"]["image_grid_thw"]) if "image_grid_thw" in sample.get("image", {}) else []
        answer = sample.get("answer_ids", [])
        for side in ("student", "teacher"):
            if f"{side}_prompt_ids" in sample:
                sample[f"{side}_positions"] = self.processor.rope_positions(sample[f"{side}_prompt_ids"] + answer, grids)

    def _prompt_ids(self, content: list, num_image_tokens: int, num_audio_tokens: int) -> list[int]:
        """Chat-template prompt with the single image/audio pad expanded to its token count."""
        text = self.processor.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                            add_generation_prompt=True)
        ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        expanded = []
        wrap = self.processor.image_wrap_ids  # InternVL: <img> pads </img>
        for token_id in ids:
            if token_id == self.processor.image_pad_id:
                expanded.extend([wrap[0], *[token_id] * num_image_tokens, wrap[1]] if wrap else [token_id] * num_image_tokens)
            elif token_id == self.processor.audio_pad_id:
                expanded.extend([token_id] * num_audio_tokens)
            else:
                expanded.append(token_id)
        return expanded


def _pad(sequences: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        if left:
            out[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        else:
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def _pad_positions(samples: list[dict], side: str, left: bool) -> torch.Tensor:
    """Per-sample (3, T_i) position ids -> (3, B, T), padding positions 0 (masked out)."""
    rows = [s[f"{side}_positions"] for s in samples]
    width = max(r.shape[1] for r in rows)
    out = torch.zeros(3, len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if left:
            out[:, i, width - row.shape[1]:] = row
        else:
            out[:, i, : row.shape[1]] = row
    return out


def _shared_fields(samples: list[dict]) -> dict:
    fields = {"keys": [s["key"] for s in samples]}
    with_audio = [s for s in samples if "input_features" in s]
    if with_audio:
        # Whisper: the window; others: the longest clip. A sample without audio (a VL sample of a
        # MIXED batch) gets zero features, 0 audio tokens and 0 frames: none of them is read.
        width = max(s["input_features"].shape[1] for s in with_audio)
        n_mels = with_audio[0]["input_features"].shape[0]
        fields["input_features"] = torch.stack([
            torch.nn.functional.pad(s["input_features"], (0, width - s["input_features"].shape[1]))
            if "input_features" in s else torch.zeros(n_mels, width) for s in samples])  # B, n_mels, W
        fields["audio_token_counts"] = torch.tensor([s.get("audio_token_count", 0) for s in samples], dtype=torch.long)
        fields["audio_frames"] = torch.tensor([s.get("audio_frames", 0) for s in samples], dtype=torch.long)
    with_image = [s for s in samples if "image" in s]
    if with_image:  # Qwen: pixel_values (sum(patches), patch_dim), image_grid_thw (N_img, 3); Phi-4: crops (Batch)
        fields.update(OmniProcessor.collate_images([s["image"] for s in with_image]))
        fields["image_token_counts"] = torch.tensor([s["image_token_count"] for s in with_image], dtype=torch.long)
    return fields


def _train_side(samples: list[dict], prompt_key: str, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = [s[prompt_key] + s["answer_ids"] for s in samples]
    labels = [[IGNORE_INDEX] * len(s[prompt_key]) + s["answer_ids"] for s in samples]
    input_ids = _pad(ids, pad_id, left=False)  # B, T
    attention_mask = _pad([[1] * len(x) for x in ids], 0, left=False)
    return input_ids, attention_mask, _pad(labels, IGNORE_INDEX, left=False)


def collate_train(samples: list[dict], pad_id: int) -> Batch:
    """Encoded samples -> right-padded training Batch (teacher fields only when the samples
    carry a typed question for a teacher, i.e. the SELFKD stage)."""
    fields = _shared_fields(samples)
    student = _train_side(samples, "student_prompt_ids", pad_id)
    fields["student_input_ids"], fields["student_attention_mask"], fields["student_labels"] = student
    fields["student_position_ids"] = _pad_positions(samples, "student", left=False)
    if "teacher_prompt_ids" in samples[0]:
        teacher = _train_side(samples, "teacher_prompt_ids", pad_id)
        fields["teacher_input_ids"], fields["teacher_attention_mask"], fields["teacher_labels"] = teacher
        fields["teacher_position_ids"] = _pad_positions(samples, "teacher", left=False)
    return Batch(**fields)


def collate_eval(samples: list[dict], pad_id: int) -> Batch:
    """Encoded EVAL samples -> LEFT-padded prompt-only Batch plus the scoring metadata."""
    fields = _shared_fields(samples)
    for side in ("teacher", "student"):
        prompts = [s[f"{side}_prompt_ids"] for s in samples]
        fields[f"{side}_input_ids"] = _pad(prompts, pad_id, left=True)  # B, T
        fields[f"{side}_attention_mask"] = _pad([[1] * len(p) for p in prompts], 0, left=True)
        fields[f"{side}_position_ids"] = _pad_positions(samples, side, left=True)
    return Batch(**fields, questions=[s["question"] for s in samples], answers=[s["answers"] for s in samples],
                 tasks=[s["task"] for s in samples], choices=[s["choices"] for s in samples],
                 ids=[s["id"] for s in samples], sources=[s["source"] for s in samples],
                 benches=[s["bench"] for s in samples])
