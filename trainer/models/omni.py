"""The omni model's architecture, two kinds behind one interface (the objective, evaluation
and the benchmarks never tell them apart):
  composed  a Hugging Face VLM (through its adapter) + a Whisper encoder + an audio projector;
  native    a native omni model's thinker (Qwen2.5-Omni, Qwen3-Omni; trainer/models/native.py),
            whose adapter encodes audio with the thinker's own audio tower.
Building and composing: trainer/models/build.py; saving and loading:
trainer/models/serialize.py; the training objective that runs it: trainer/distill/objective.py.

Speech enters the LLM through audio placeholders (`<|audio_pad|>`, Qwen2.5-Omni's
`<|AUDIO|>`). Composed: Whisper encodes the batch's longest clip (`whisper_input` "clip", new
models) or the whole padded mel window ("window", models trained before), the valid encoder
frames of each clip are stacked `audio_stack` at a time (B, F, C -> B, F/S, C*S) and projected into
the LLM embedding space. Native: the thinker's audio tower reads each clip's valid mel
frames. Either way the audio tokens replace the placeholders in order. Images go through
the model's own vision tower and replace its image placeholders; a family with DeepStack
(Qwen3-Omni) gives image tokens of shape (N, 1 + D, H), whose D extra rows the decoder adds
at the image positions of its first D layers.

ZeRO-3 rule: every rank calls the same modules the same number of times (each call gathers
its parameters collectively), so `encode_images` / `encode_audio` run the tower on a dummy
input when the batch has no image / no audio, and return a zero-valued term that ties that
pass to the loss.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from trainer.data.batch import Batch, to_device
from trainer.models.adapters import adapter_for
from trainer.models.processing import OmniProcessor

PROJECTORS = ("mlp", "linear")


WHISPER_INPUTS = ("clip", "window")  # what a composed model's Whisper encoder reads (OmniModel.whisper_input)


class ZeroSafeWhisperEncoder(WhisperEncoder):
    """WhisperEncoder whose weight init also works on ZeRO-3-partitioned parameters.

    transformers <= 5.17 gathers only a module's own parameters before `_init_weights`, but
    Whisper's init writes the sinusoidal table of its child `embed_positions`, which under
    ZeRO-3 is then an empty partition (seen on an H200 with 5.17: `sinusoids() missing 1
    required positional argument`). Later releases gather direct children too; then the
    table is already whole and nothing extra happens here."""

    def _init_weights(self, module):
        table = getattr(module, "embed_positions", None)
        if isinstance(module, WhisperEncoder) and table is not None and table.weight.numel() == 0 and hasattr(table.weight, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([table.weight], modifier_rank=0):
                super()._init_weights(module)
            return
        super()._init_weights(module)

    def forward(self, input_features, attention_mask=None, **kwargs):
        """The window (Hugging Face's forward, which insists on all of it), or any shorter even
        number of mel frames: then the same layers run on the frames given, with the first
        frames / 2 rows of the position table (looked up through the module, so ZeRO-3 gathers
        it), as Ultravox runs Whisper on cut input."""
        window = self.config.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        frames = input_features.shape[-1]
        if frames == window:
            return super().forward(input_features, attention_mask=attention_mask, **kwargs)
        if frames > window or frames % (self.conv1.stride[0] * self.conv2.stride[0]):
            raise ValueError(f"Whisper reads the {window}-frame window or an even number of frames below it, "
                             f"got {frames}")
        from transformers.modeling_outputs import BaseModelOutput

        hidden = F.gelu(self.conv2(F.gelu(self.conv1(input_features)))).permute(0, 2, 1)  # B, frames / 2, C
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        hidden = F.dropout(hidden + self.embed_positions(positions), p=self.dropout, training=self.training)
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            hidden = layer(hidden, None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return BaseModelOutput(last_hidden_state=self.layer_norm(hidden))


class AudioProjector(nn.Module):
    """Stack `stack` encoder frames, then MLP (Linear-GELU-Linear) or one Linear into H."""

    def __init__(self, audio_dim: int, stack: int, hidden_size: int, kind: str = "mlp"):
        super().__init__()
        if kind not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS}, got {kind!r}")
        self.stack = stack
        self.kind = kind
        if kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(audio_dim * stack, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
            )
        else:
            self.net = nn.Linear(audio_dim * stack, hidden_size)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        batch, num_frames, channels = frames.shape
        pad = (-num_frames) % self.stack
        if pad:  # a partial last group: zero frames fill it
            frames = F.pad(frames, (0, 0, 0, pad))
        stacked = frames.reshape(batch, (num_frames + pad) // self.stack, channels * self.stack)  # B, F, C -> B, F/S, C*S
        return self.net(stacked)  # B, F/S, C*S -> B, F/S, H


class OmniModel(nn.Module):
    """A composed VLM + Whisper + projector, or a native thinker (audio_encoder and projector
    None). See the module docstring."""

    def __init__(self, vlm: nn.Module, audio_encoder: WhisperEncoder | None, projector: AudioProjector | None,
                 processor: OmniProcessor, whisper_input: str = "clip"):
        super().__init__()
        if whisper_input not in WHISPER_INPUTS:
            raise ValueError(f"whisper_input must be one of {WHISPER_INPUTS}, got {whisper_input!r}")
        # Composed models: Whisper reads the batch's longest valid clip ("clip") or the whole 30 s
        # window ("window", what every model trained before this option did). Saved in omni_spec.
        self.whisper_input = whisper_input
        self.vlm = vlm
        self.adapter = adapter_for(vlm.config.model_type)(vlm)
        if self.adapter.family != (processor.family if processor.native else None):
            raise ValueError(f"a {vlm.config.model_type} model needs a {self.adapter.family or 'composed'} processor, "
                             f"got {processor.family}")
        if self.adapter.family is None:
            if audio_encoder is None or projector is None:
                raise ValueError("a composed model needs its audio encoder and projector")
            if projector.stack != processor.audio_stack:
                raise ValueError(f"projector stacks {projector.stack} frames, processor.audio_stack is {processor.audio_stack}")
            self.audio_encoder = audio_encoder
            self.projector = projector
        elif audio_encoder is not None or projector is not None:
            raise ValueError(f"a native {self.adapter.family} model encodes audio itself: no Whisper encoder or projector")
        else:
            self.audio_encoder = self.projector = None
        self.processor = processor
        self.audio_pad_id = processor.audio_pad_id
        self.image_token_id = self.adapter.image_token_id
        if processor.image_pad_id != self.image_token_id:
            raise ValueError(f"tokenizer {processor.image_pad} id {processor.image_pad_id} != model image_token_id "
                             f"{self.image_token_id}")
        if self.native and processor.audio_pad_id != self.adapter.audio_token_id:
            raise ValueError(f"tokenizer audio placeholder id {processor.audio_pad_id} != model audio_token_id "
                             f"{self.adapter.audio_token_id}")
        self.trainable_parts = frozenset()  # set by trainer.models.build.set_trainable

    @property
    def native(self) -> bool:
        return self.adapter.family is not None

    def parts(self) -> dict:
        """Trainable part name -> modules it unfreezes (trainer.models.build.set_trainable)."""
        if self.native:
            return self.adapter.parts()
        return {**self.adapter.parts(), "audio": [self.audio_encoder], "projector": [self.projector]}

    def frozen_always(self) -> list:
        """Parameters that never train: Whisper's fixed sinusoids, a native tower's unused ones."""
        if self.native:
            return self.adapter.frozen_always()
        return [self.audio_encoder.embed_positions.weight]

    # --- encoders --------------------------------------------------------------------
    def _grad_if(self, *parts: str):
        return contextlib.nullcontext() if self.trainable_parts.intersection(parts) else torch.no_grad()

    def encode_images(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor]:
        """-> (image tokens (N_img_tok, H), or (N_img_tok, 1 + D, H) with DeepStack, or None;
        zero-valued term tying a dummy pass to the loss)."""
        device = self.adapter.input_embeddings().weight.device
        with self._grad_if("vision"):
            if batch.pixel_values is None:
                dummy = self.adapter.image_features(**self.adapter.dummy_image(device))
                return None, 0.0 * dummy.float().sum()
            features = self.adapter.image_features(**self.adapter.image_inputs(batch, device))
        return features, features.new_zeros((), dtype=torch.float32)

    def encode_audio(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor]:
        """-> (audio tokens of all samples in order (sum counts, H) or None, zero term)."""
        if self.native:
            return self._encode_audio_native(batch)
        input_features, counts = batch.input_features, batch.audio_token_counts
        device = self.adapter.input_embeddings().weight.device
        encoder_dtype = self.audio_encoder.conv1.weight.dtype
        if input_features is None:
            frames = self.encoder_input_frames(None)
            input_features = torch.zeros(1, self.audio_encoder.config.num_mel_bins, frames, device=device)
        elif self.whisper_input == "clip" and input_features.shape[-1] == self.audio_encoder.config.max_source_positions * 2:
            # Not cut yet (evaluation; the objective cuts on the CPU, see cut_audio_input): one read.
            input_features = input_features[..., : self.encoder_input_frames(batch.audio_frames.cpu())]
        with self._grad_if("audio"):
            frames = self.audio_encoder(input_features.to(device, encoder_dtype)).last_hidden_state  # B, n_mels, W -> B, W/2, C
        with self._grad_if("projector"):
            tokens = self.projector(frames)  # B, W/2, C -> B, W/2/S, H
        if batch.input_features is None:
            return None, 0.0 * tokens.float().sum()
        # Only each clip's valid frames: the first counts[i] stacked tokens of sample i, picked
        # by flat indices built where the counts live (the CPU, in training: no device read).
        width = tokens.shape[1]
        index = torch.cat([i * width + torch.arange(int(n)) for i, n in enumerate(counts.tolist())])
        tokens = tokens.reshape(-1, tokens.shape[-1]).index_select(0, to_device(index, device))  # sum(counts), H
        return tokens, tokens.new_zeros((), dtype=torch.float32)

    def cut_audio_input(self, batch: Batch) -> Batch:
        """The CPU batch with a composed model's mel features cut to what its Whisper reads
        (encoder_input_frames): done where the batch is made, so the step reads nothing from
        the device for it and copies less. Native models and batches without audio: as given."""
        if self.native or batch.input_features is None:
            return batch
        import dataclasses

        frames = self.encoder_input_frames(batch.audio_frames)
        return dataclasses.replace(batch, input_features=batch.input_features[..., :frames])

    def encoder_input_frames(self, audio_frames: torch.Tensor | None) -> int:
        """Mel frames the composed model's Whisper reads for a batch whose clips have
        `audio_frames` valid frames (a CPU tensor; None: no audio, a dummy pass): the window, or
        with whisper_input "clip" the longest clip rounded up to whole projector groups (2 x
        audio_stack mel frames: the conv stride, then the stacking), so each clip's last audio
        token stacks encoded frames only, whatever the batch."""
        window = self.audio_encoder.config.max_source_positions * 2
        if self.whisper_input == "window" or (audio_frames is not None and audio_frames.numel() == 0):
            return window
        group = 2 * self.projector.stack
        longest = int(audio_frames.max()) if audio_frames is not None else 1
        return min(window, max(group, -(-longest // group) * group))

    def _encode_audio_native(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor]:
        device = self.adapter.input_embeddings().weight.device
        with self._grad_if("audio", "projector"):  # requires_grad decides which of the tower's weights learn
            if batch.input_features is None:
                dummy = self.adapter.audio_features(**self.adapter.dummy_audio(device))
                return None, 0.0 * dummy.float().sum()
            if batch.audio_frames is None:
                raise ValueError(f"a native audio tower needs each clip's mel frame count (batch.audio_frames); "
                                 f"batch of {batch.keys[:3]}... has none")
            if bool((batch.audio_frames == 0).any()):
                raise ValueError(f"a native audio tower takes no sample without audio in a batch with audio (a --stage "
                                 f"mixed batch of {batch.keys[:3]}...): mixed stages need a composed model")
            tokens = self.adapter.audio_features(**self.adapter.audio_inputs(batch, device))
        return tokens, tokens.new_zeros((), dtype=torch.float32)

    # --- sequence assembly -------------------------------------------------------------
    def check_placeholders(self, batch: Batch, role: str) -> None:
        """Every sample's <|image_pad|> / <|audio_pad|> count must equal the features that will
        fill them; the error names the samples. Run it on the CPU batch (a few reads there; on
        the device each would stall the host)."""
        input_ids, _, _ = batch.side(role)
        image_counts = (input_ids == self.image_token_id).sum(1)  # B
        if batch.image_token_counts is not None:
            expected = int(batch.image_token_counts.sum())
        else:  # a batch made without the counts (Qwen grids give them)
            merge = self.processor.image_merge_size
            expected = 0 if batch.image_grid_thw is None else int((batch.image_grid_thw.prod(-1) // merge**2).sum())
        if int(image_counts.sum()) != expected:
            raise ValueError(f"{role}_input_ids hold {int(image_counts.sum())} <|image_pad|> tokens but the images give "
                             f"{expected} features; per sample key: {dict(zip(batch.keys, image_counts.tolist()))}")
        audio_counts = (input_ids == self.audio_pad_id).sum(1)  # B
        uses_audio = role == "student" and batch.audio_token_counts is not None
        expected_audio = batch.audio_token_counts.to(audio_counts) if uses_audio else torch.zeros_like(audio_counts)
        if not torch.equal(audio_counts, expected_audio):
            bad = {key: (have, want) for key, have, want in zip(batch.keys, audio_counts.tolist(), expected_audio.tolist())
                   if have != want}
            raise ValueError(f"{role}_input_ids: <|audio_pad|> tokens vs audio tokens differ (sample key: "
                             f"(placeholders, audio_token_counts)): {bad}")

    def positions(self, batch: Batch, role: str) -> torch.Tensor:
        """M-RoPE position ids (3, B, T) of one side: the collator's (made on the CPU, in the
        data workers), else computed by the VLM where the batch is (a read per sample)."""
        if batch.position_ids(role) is not None:
            return batch.position_ids(role)
        input_ids, attention_mask, _ = batch.side(role)
        audio = {"audio_frames": batch.audio_frames if role == "student" else None} if self.native else {}
        return self.adapter.position_ids(input_ids, batch.image_grid_thw, attention_mask, **audio)

    def embed(self, input_ids, image_tokens, audio_tokens) -> torch.Tensor:
        """Token embeddings with the image / audio placeholders replaced, in order (checked
        beforehand by `check_placeholders`)."""
        embeds = self.adapter.embed_tokens(input_ids)  # B, T -> B, T, H
        if image_tokens is not None and image_tokens.dim() == 3:  # DeepStack: row 0 is the token itself
            image_tokens = image_tokens[:, 0]
        if image_tokens is not None:
            embeds = embeds.masked_scatter((input_ids == self.image_token_id)[..., None], image_tokens.to(embeds.dtype))
        if audio_tokens is not None:
            embeds = embeds.masked_scatter((input_ids == self.audio_pad_id)[..., None], audio_tokens.to(embeds.dtype))
        return embeds

    def run_side(self, batch: Batch, role: str, image_tokens, audio_tokens, position_ids=None, *, cache=None,
                 start: int = 0, use_cache: bool = False) -> tuple:
        """The decoder on one side ("student" / "teacher") -> (last hidden states of tokens
        `start`..T (B, T - start, H), cache or None). With `cache` holding the keys and values
        of the first `start` tokens (shared with another pass), only the rest is computed, and
        `image_tokens` are the features of the image placeholders from `start` on."""
        input_ids, attention_mask, _ = batch.side(role)
        if position_ids is None:
            position_ids = self.positions(batch, role)
        embeds = self.embed(input_ids[:, start:], image_tokens, audio_tokens)
        positions = position_ids[:, :, start:].to(input_ids.device)
        return self.adapter.decode(embeds, positions, attention_mask, cache=cache, use_cache=use_cache,
                                   **self.decoder_extras(input_ids[:, start:], image_tokens))

    def decoder_extras(self, input_ids, image_tokens) -> dict:
        """What the decoder needs beyond the embeddings for this segment (DeepStack features)."""
        return self.adapter.deepstack_inputs(input_ids, image_tokens) if self.adapter.deepstack else {}

    # --- evaluation ------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: Batch, mode: str, max_new_tokens: int, *, synced_gpus: bool = False) -> list[str]:
        """Greedy decoding with a KV cache from LEFT-padded prompts: mode "text" uses the
        teacher_* (typed) prompt, "audio" the student_* (spoken) one. With `synced_gpus`
        (ZeRO-3, several ranks) every rank runs all `max_new_tokens` steps so module calls
        stay in lockstep; otherwise decoding stops when every sample has ended."""
        if mode not in ("text", "audio"):
            raise ValueError(f"generate mode must be 'text' or 'audio', got {mode!r}")
        new_ids = self.generate_ids(batch, mode, max_new_tokens, synced_gpus=synced_gpus)
        return self.processor.tokenizer.batch_decode(new_ids, skip_special_tokens=True)

    @torch.no_grad()
    def generate_ids(self, batch: Batch, mode: str, max_new_tokens: int, *, synced_gpus: bool = False,
                     temperature: float = 0.0, generator: torch.Generator | None = None,
                     suppress_special: bool = False) -> list[list[int]]:
        """Token ids of the answers (each up to and including its end token), as `generate`;
        `temperature` > 0 samples from softmax(logits / temperature) with `generator` instead
        of taking the argmax. `suppress_special` (answers fed back as input, on-policy): the pad
        token ends an answer too, and no other special token is ever emitted (an image or audio
        placeholder would claim a feature that is not there)."""
        role = "teacher" if mode == "text" else "student"
        device = self.adapter.input_embeddings().weight.device
        if (batch.side(role)[1][:, -1] == 0).any():
            raise ValueError(f"generate needs LEFT-padded {role}_input_ids (a prompt ends in padding)")
        self.check_placeholders(batch, role)
        position_ids = self.positions(batch, role).to(device)  # 3, B, T
        batch = batch.to(device)
        input_ids, attention_mask, _ = batch.side(role)
        image_tokens, _ = self.encode_images(batch)
        audio_tokens, _ = self.encode_audio(batch)
        embeds = self.embed(input_ids, image_tokens, audio_tokens if role == "student" else None)
        next_position = position_ids.amax(dim=(0, 2)) + 1  # B
        hidden, cache = self.adapter.decode(embeds, position_ids, attention_mask, use_cache=True,
                                            **self.decoder_extras(input_ids, image_tokens))

        eos_ids = {self.processor.tokenizer.convert_tokens_to_ids(self.processor.turn_end), self.processor.tokenizer.eos_token_id}
        if suppress_special:
            eos_ids.add(self.processor.pad_id)
        eos_ids.discard(None)
        eos = torch.tensor(sorted(eos_ids), device=device)
        suppressed = None
        if suppress_special:
            tokenizer = self.processor.tokenizer
            special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
            special |= {self.image_token_id, self.audio_pad_id}
            suppressed = torch.tensor(sorted(special - eos_ids), device=device, dtype=torch.long)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
        generated = []
        for step in range(max_new_tokens):
            logits = self.adapter.lm_head(hidden[:, -1])  # B, H -> B, V
            if suppressed is not None and suppressed.numel():
                logits[:, suppressed] = float("-inf")
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                next_ids = logits.argmax(-1)
            next_ids = torch.where(finished, torch.full_like(next_ids, self.processor.pad_id), next_ids)
            generated.append(next_ids)
            finished |= torch.isin(next_ids, eos)
            if step + 1 == max_new_tokens or (not synced_gpus and finished.all()):
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            step_positions = (next_position + step).view(1, -1, 1).expand(3, -1, 1)  # 3, B, 1
            hidden, cache = self.adapter.decode(
                self.adapter.embed_tokens(next_ids[:, None]), step_positions, attention_mask, cache=cache, use_cache=True
            )
        new_ids = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(input_ids.shape[0])]
        eos_list = eos.tolist()
        return [ids[: next((i + 1 for i, t in enumerate(ids) if t in eos_list), len(ids))] for ids in new_ids]
