"""The composed omni model: a Hugging Face VLM + a Whisper encoder + an audio projector.

Speech enters the LLM through `<|audio_pad|>` placeholders: Whisper encodes the padded
mel window, the valid encoder frames of each clip are stacked `audio_stack` at a time
(B, F, C -> B, F/S, C*S) and projected into the LLM embedding space, and the projected
frames replace the placeholders in order. Images go through the VLM's own vision tower
and replace `<|image_pad|>` tokens as in the VLM.

One training call (`OmniModel.forward`) runs, in this order on every rank:
  vision tower (a dummy image when the batch has none) -> Whisper + projector (dummy audio
  when the batch has none) -> teacher pass (no grad, inside `teacher_ctx()`, typed
  question, image features reused) -> student pass (spoken question) -> chunked LM head
  over answer positions only. Every rank calls the same modules the same number of times,
  which ZeRO-3 needs (each module call gathers its parameters collectively).
The image features come from the live (student) vision tower, before `teacher_ctx()` is
entered: with a trainable vision tower a frozen / EMA teacher would therefore see the
student's image features, not its own (trainer.config refuses that combination).

Build functions (see `build_model` for the dispatch the trainer uses):
  build_tiny(processor, ...)        random-init real classes from tiny configs
  compose(vlm_path, audio_encoder_path, processor, ...)   from_pretrained weights
  load_omni(dir, ...) / save_omni(model, processor, dir)  our own export format
ZeRO-3: pass `init_ctx=deepspeed.zero.Init(config_dict_or_path=ds_config)` so no rank ever
holds the whole model. `compose` relies on Hugging Face's own ZeRO-3 path instead: keep a
`transformers.integrations.HfDeepSpeedConfig(ds_config)` object alive before calling it and
`from_pretrained` partitions while loading (init_ctx then only wraps the new projector).
"""

import contextlib
import importlib.util
import json
import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PretrainedConfig, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from trainer.config import PROJECTORS, TRAINABLE_PARTS
from trainer.distill.loss import KDSettings, answer_token_loss, chunk_bounds, combine
from trainer.models.adapters import adapter_for
from trainer.models.processing import OmniProcessor

OMNI_CONFIG = "omni_config.json"
OMNI_SPEC = "omni_spec.json"  # omni_spec(model) in every trainer checkpoint: what export_hf builds
WEIGHTS = "model.safetensors"


def resolve_attn_impl(attn_impl: str) -> str:
    """auto -> flash_attention_2 when flash-attn is importable and CUDA is present, else sdpa."""
    if attn_impl == "auto":
        has_flash = importlib.util.find_spec("flash_attn") is not None
        return "flash_attention_2" if has_flash and torch.cuda.is_available() else "sdpa"
    if attn_impl not in ("sdpa", "eager", "flash_attention_2"):
        raise ValueError(f"attn_impl must be auto|sdpa|eager|flash_attention_2, got {attn_impl!r}")
    return attn_impl


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Create parameters directly in `dtype` (no fp32 copy first, also under zero.Init)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


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
    """VLM (through its adapter) + Whisper encoder + projector. See the module docstring."""

    def __init__(self, vlm: nn.Module, audio_encoder: WhisperEncoder, projector: AudioProjector, processor: OmniProcessor):
        super().__init__()
        self.vlm = vlm
        self.audio_encoder = audio_encoder
        self.projector = projector
        self.adapter = adapter_for(vlm.config.model_type)(vlm)
        self.processor = processor
        self.audio_pad_id = processor.audio_pad_id
        self.image_token_id = self.adapter.image_token_id
        if processor.image_pad_id != self.image_token_id:
            raise ValueError(
                f"tokenizer <|image_pad|> id {processor.image_pad_id} != VLM image_token_id {self.image_token_id}"
            )
        if projector.stack != processor.audio_stack:
            raise ValueError(f"projector stacks {projector.stack} frames, processor.audio_stack is {processor.audio_stack}")
        self.trainable_parts = frozenset()
        set_trainable(self, {"llm", "projector"})

    # --- encoders --------------------------------------------------------------------
    def _grad_if(self, part: str):
        return contextlib.nullcontext() if part in self.trainable_parts else torch.no_grad()

    def encode_images(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        """-> (image tokens (N_img_tok, H) or None, zero-valued term tying a dummy pass to the loss)."""
        pixel_values, grid_thw = batch.get("pixel_values"), batch.get("image_grid_thw")
        device = self.adapter.input_embeddings().weight.device
        with self._grad_if("vision"):
            if pixel_values is None:
                dummy_pixels, dummy_grid = self.adapter.dummy_image(device)
                dummy = self.adapter.image_features(dummy_pixels, dummy_grid)
                return None, 0.0 * dummy.float().sum()
            features = self.adapter.image_features(pixel_values.to(device), grid_thw.to(device))
        return features, features.new_zeros((), dtype=torch.float32)

    def encode_audio(self, batch: dict) -> tuple[torch.Tensor | None, torch.Tensor]:
        """-> (audio tokens of all samples in order (sum counts, H) or None, zero term)."""
        input_features, counts = batch.get("input_features"), batch.get("audio_token_counts")
        device = self.adapter.input_embeddings().weight.device
        encoder_dtype = self.audio_encoder.conv1.weight.dtype
        if input_features is None:
            window = self.audio_encoder.config.max_source_positions * 2
            input_features = torch.zeros(1, self.audio_encoder.config.num_mel_bins, window, device=device)
        with self._grad_if("audio"):
            frames = self.audio_encoder(input_features.to(device, encoder_dtype)).last_hidden_state  # B, n_mels, W -> B, W/2, C
        with self._grad_if("projector"):
            tokens = self.projector(frames)  # B, W/2, C -> B, W/2/S, H
        if batch.get("input_features") is None:
            return None, 0.0 * tokens.float().sum()
        # Only each clip's valid frames: the first counts[i] stacked tokens of sample i.
        keep = torch.arange(tokens.shape[1], device=device)[None, :] < counts.to(device)[:, None]  # B, W/2/S
        return tokens[keep], tokens.new_zeros((), dtype=torch.float32)

    # --- sequence assembly -------------------------------------------------------------
    def embed(self, keys, input_ids, image_tokens, audio_tokens, audio_counts, role: str) -> torch.Tensor:
        """Token embeddings with image / audio placeholders replaced, checked per sample."""
        embeds = self.adapter.embed_tokens(input_ids)  # B, T -> B, T, H
        image_mask = input_ids == self.image_token_id
        audio_mask = input_ids == self.audio_pad_id
        n_image = int(image_mask.sum())
        expected_image = 0 if image_tokens is None else image_tokens.shape[0]
        if n_image != expected_image:
            per_sample = {k: int(n) for k, n in zip(keys, image_mask.sum(1).tolist())}
            raise ValueError(
                f"{role}_input_ids hold {n_image} <|image_pad|> tokens but the images give {expected_image} "
                f"features; per sample key: {per_sample}"
            )
        if audio_tokens is None:
            if audio_mask.any():
                bad = [k for k, n in zip(keys, audio_mask.sum(1).tolist()) if n]
                raise ValueError(f"{role}_input_ids hold <|audio_pad|> tokens but the batch has no audio: samples {bad}")
        else:
            placeholders = audio_mask.sum(1).tolist()
            for key, n_placeholders, n_tokens in zip(keys, placeholders, audio_counts.tolist()):
                if n_placeholders != n_tokens:
                    raise ValueError(
                        f"sample {key}: {role}_input_ids hold {n_placeholders} <|audio_pad|> tokens but "
                        f"audio_token_counts says {n_tokens}"
                    )
        if image_tokens is not None:
            embeds = embeds.masked_scatter(image_mask[..., None], image_tokens.to(embeds.dtype))
        if audio_tokens is not None:
            embeds = embeds.masked_scatter(audio_mask[..., None], audio_tokens.to(embeds.dtype))
        return embeds

    def hidden_states(self, batch, role, image_tokens, audio_tokens) -> torch.Tensor:
        input_ids = batch[f"{role}_input_ids"]
        attention_mask = batch[f"{role}_attention_mask"]
        embeds = self.embed(batch["keys"], input_ids, image_tokens, audio_tokens, batch.get("audio_token_counts"), role)
        position_ids = self.adapter.position_ids(input_ids, batch.get("image_grid_thw"), attention_mask)
        hidden, _ = self.adapter.decode(embeds, position_ids, attention_mask)
        return hidden  # B, T, H

    @staticmethod
    def answer_positions(hidden, labels):
        """Hidden state at t predicts token t+1: (B, T, H), (B, T) -> (N, H), (N,), per-sample counts."""
        targets = labels[:, 1:]
        mask = targets != -100  # B, T-1
        return hidden[:, :-1][mask], targets[mask], mask.sum(1)

    # --- training step ---------------------------------------------------------------
    def forward(
        self,
        batch: dict,
        *,
        kd: KDSettings | None,
        normalizer: float,
        teacher_ctx=contextlib.nullcontext,
        answer_chunks: int | None = None,
        chunk_size: int = 1024,
    ) -> dict:
        """Loss of one micro-batch; see the contract. The LM head runs on chunks of at most
        `chunk_size` answer tokens (SFT and KD alike), or on exactly `answer_chunks` chunks
        when given; under ZeRO-3 pass the same `answer_chunks` on every rank
        (`answer_chunks_for(max over ranks of answer tokens, chunk_size)`), since every
        LM-head call is a collective gather."""
        keys = batch["keys"]
        device = self.adapter.input_embeddings().weight.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        image_tokens, vision_zero = self.encode_images(batch)
        audio_tokens, audio_zero = self.encode_audio(batch)

        use_teacher = kd is not None and kd.uses_teacher
        teacher_answers = teacher_logits = None
        if use_teacher:
            # A teacher with its own weights (frozen / EMA) must produce its logits inside its
            # context; the shared teacher's are recomputed per chunk from its hidden states.
            own_weights = _swaps_weights(teacher_ctx)
            with torch.no_grad(), teacher_ctx():
                detached_images = None if image_tokens is None else image_tokens.detach()
                teacher_hidden = self.hidden_states(batch, "teacher", detached_images, None)
                teacher_answers, teacher_targets, teacher_counts = self.answer_positions(
                    teacher_hidden, batch["teacher_labels"]
                )
                del teacher_hidden
                if own_weights:
                    n_teacher = teacher_answers.shape[0]
                    teacher_logits = torch.cat(
                        [self.adapter.lm_head(teacher_answers[a:b]) for a, b in chunk_bounds(n_teacher, chunk_size, answer_chunks)]
                    )  # N, H -> N, V (answer positions only)
                    teacher_answers = None

        student_hidden = self.hidden_states(batch, "student", image_tokens, audio_tokens)
        student_answers, student_targets, student_counts = self.answer_positions(student_hidden, batch["student_labels"])
        if use_teacher:
            self._check_pairing(keys, teacher_counts, student_counts, teacher_targets, student_targets)

        sums = answer_token_loss(
            student_answers,
            student_targets,
            self.adapter.lm_head,
            kd,
            teacher_hidden=teacher_answers,
            teacher_logits=teacher_logits,
            num_chunks=answer_chunks,
            chunk_size=chunk_size,
        )
        loss = combine(sums, kd, normalizer) + vision_zero + audio_zero
        return dict(
            loss=loss,
            ce_sum=sums["ce_sum"].detach(),
            kd_sum=sums["kd_sum"].detach(),
            teacher_ce_sum=sums["teacher_ce_sum"],
            agree_count=sums["agree_count"],
            n_tokens=sums["n_tokens"],
        )

    @staticmethod
    def _check_pairing(keys, teacher_counts, student_counts, teacher_targets, student_targets):
        if not torch.equal(teacher_counts, student_counts):
            bad = {k: (int(t), int(s)) for k, t, s in zip(keys, teacher_counts, student_counts) if t != s}
            raise ValueError(f"teacher and student answer-token counts differ (sample key: (teacher, student)): {bad}")
        if not torch.equal(teacher_targets, student_targets):
            offsets = [0] + torch.cumsum(student_counts, 0).tolist()
            bad = [k for k, a, b in zip(keys, offsets[:-1], offsets[1:]) if not torch.equal(teacher_targets[a:b], student_targets[a:b])]
            raise ValueError(f"teacher and student answer label ids differ for samples {bad}")

    # --- evaluation ------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: dict, mode: str, max_new_tokens: int, *, synced_gpus: bool = False) -> list[str]:
        """Greedy decoding with a KV cache from LEFT-padded prompts: mode "text" uses the
        teacher_* (typed) prompt, "audio" the student_* (spoken) one. With `synced_gpus`
        (ZeRO-3, several ranks) every rank runs all `max_new_tokens` steps so module calls
        stay in lockstep; otherwise decoding stops when every sample has ended."""
        if mode not in ("text", "audio"):
            raise ValueError(f"generate mode must be 'text' or 'audio', got {mode!r}")
        new_ids = self.generate_ids(batch, mode, max_new_tokens, synced_gpus=synced_gpus)
        return self.processor.tokenizer.batch_decode(new_ids, skip_special_tokens=True)

    @torch.no_grad()
    def generate_ids(self, batch: dict, mode: str, max_new_tokens: int, *, synced_gpus: bool = False) -> list[list[int]]:
        role = "teacher" if mode == "text" else "student"
        device = self.adapter.input_embeddings().weight.device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        input_ids, attention_mask = batch[f"{role}_input_ids"], batch[f"{role}_attention_mask"]
        if (attention_mask[:, -1] == 0).any():
            raise ValueError(f"generate needs LEFT-padded {role}_input_ids (a prompt ends in padding)")
        image_tokens, _ = self.encode_images(batch)
        audio_tokens, _ = self.encode_audio(batch)
        embeds = self.embed(batch["keys"], input_ids, image_tokens, audio_tokens if role == "student" else None,
                            batch.get("audio_token_counts"), role)
        position_ids = self.adapter.position_ids(input_ids, batch.get("image_grid_thw"), attention_mask)  # 3, B, T
        next_position = position_ids.amax(dim=(0, 2)) + 1  # B
        hidden, cache = self.adapter.decode(embeds, position_ids, attention_mask, use_cache=True)

        eos_ids = {self.processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.processor.tokenizer.eos_token_id}
        eos = torch.tensor(sorted(i for i in eos_ids if i is not None), device=device)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
        generated = []
        for step in range(max_new_tokens):
            next_ids = self.adapter.lm_head(hidden[:, -1]).argmax(-1)  # B, H -> B
            next_ids = torch.where(finished, torch.full_like(next_ids, self.processor.pad_id), next_ids)
            generated.append(next_ids)
            finished |= torch.isin(next_ids, eos)
            if step + 1 == max_new_tokens or (finished.all() and not synced_gpus):
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
            step_positions = (next_position + step).view(1, -1, 1).expand(3, -1, 1)  # 3, B, 1
            hidden, cache = self.adapter.decode(
                self.adapter.embed_tokens(next_ids[:, None]), step_positions, attention_mask, cache=cache, use_cache=True
            )
        new_ids = torch.stack(generated, dim=1).tolist() if generated else [[] for _ in range(input_ids.shape[0])]
        eos_list = eos.tolist()
        return [ids[: next((i + 1 for i, t in enumerate(ids) if t in eos_list), len(ids))] for ids in new_ids]


def _swaps_weights(teacher_ctx) -> bool:
    """Whether the teacher context brings its own weights: the teacher classes (or their
    bound `context` method) say so; any other non-null context is assumed to."""
    for owner in (teacher_ctx, getattr(teacher_ctx, "__self__", None)):
        if hasattr(owner, "swaps_weights"):
            return bool(owner.swaps_weights)
    return teacher_ctx is not contextlib.nullcontext


# --- trainability / checkpointing ---------------------------------------------------------
def set_trainable(model: OmniModel, parts) -> None:
    """Train exactly `parts` (subset of llm, projector, vision, audio); freeze the rest.
    "llm" = decoder + token embeddings + LM head. Frozen encoders then run under no_grad."""
    parts = frozenset(parts)
    unknown = parts - set(TRAINABLE_PARTS)
    if unknown:
        raise ValueError(f"unknown trainable part(s) {sorted(unknown)}; choose from {TRAINABLE_PARTS}")
    model.requires_grad_(False)
    if "llm" in parts:
        model.adapter.language_model.requires_grad_(True)
        model.adapter.lm_head.requires_grad_(True)
    if "vision" in parts:
        model.adapter.vision_tower.requires_grad_(True)
    if "audio" in parts:
        model.audio_encoder.requires_grad_(True)
        model.audio_encoder.embed_positions.requires_grad_(False)  # Whisper's fixed sinusoids
    if "projector" in parts:
        model.projector.requires_grad_(True)
    model.trainable_parts = parts


def enable_gradient_checkpointing(model: OmniModel) -> None:
    """Non-reentrant checkpointing of the decoder layers (and the vision tower if trained):
    correct with the no-grad teacher pass and with ZeRO-3's parameter hooks."""
    towers = [model.adapter.language_model]
    if "vision" in model.trainable_parts:
        towers.append(model.adapter.vision_tower)
    for tower in towers:
        tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# --- building ---------------------------------------------------------------------------
def _enter(init_ctx):
    """`init_ctx` may be a context manager (a deepspeed.zero.Init instance) or a factory of
    one (contextlib.nullcontext)."""
    return init_ctx() if isinstance(init_ctx, type) or not hasattr(init_ctx, "__enter__") else init_ctx


def _configure(config: PretrainedConfig, attn_impl: str) -> PretrainedConfig:
    config._attn_implementation = resolve_attn_impl(attn_impl)
    return config


def _vocab_fits(vlm: nn.Module, processor: OmniProcessor) -> None:
    """Resize token embeddings only if the tokenizer outgrew the matrix."""
    if len(processor.tokenizer) > vlm.get_input_embeddings().num_embeddings:
        vlm.resize_token_embeddings(len(processor.tokenizer))


def build_from_configs(
    vlm_config: PretrainedConfig,
    whisper_config: WhisperConfig,
    processor: OmniProcessor,
    *,
    projector: str = "mlp",
    dtype: torch.dtype = torch.float32,
    attn_impl: str = "auto",
    init_ctx=contextlib.nullcontext,
) -> OmniModel:
    """Random-init model of the given architectures (weights loaded by the caller).
    The VLM and Whisper encoder are built by Hugging Face's `_from_config`, which under
    ZeRO-3 (an HfDeepSpeedConfig alive) builds them inside zero.Init and initialises the
    partitioned weights itself; `init_ctx` wraps the new projector."""
    adapter_cls = adapter_for(vlm_config.model_type)
    _configure(vlm_config, attn_impl)
    _configure(whisper_config, attn_impl)
    _check_zero3_setup(init_ctx)
    vlm = adapter_cls.vlm_class._from_config(vlm_config, dtype=dtype)
    audio_encoder = ZeroSafeWhisperEncoder._from_config(whisper_config, dtype=dtype)
    with default_dtype(dtype), _enter(init_ctx):
        audio_projector = AudioProjector(
            whisper_config.d_model, processor.audio_stack, vlm_config.get_text_config().hidden_size, projector
        )
    _vocab_fits(vlm, processor)
    return OmniModel(vlm, audio_encoder, audio_projector, processor)


def _check_zero3_setup(init_ctx) -> None:
    """A zero.Init context without HfDeepSpeedConfig would leave the HF parts whole on
    every rank: refuse that loudly."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if type(init_ctx).__name__ == "Init" and not is_deepspeed_zero3_enabled():
        raise RuntimeError(
            "init_ctx is deepspeed.zero.Init but no transformers HfDeepSpeedConfig is alive: create "
            "`hf_ds = HfDeepSpeedConfig(ds_config)` (and keep a reference) before building the model"
        )


def build_tiny(processor: OmniProcessor, *, projector="mlp", dtype=torch.float32, attn_impl="auto",
               init_ctx=contextlib.nullcontext, seed: int = 0) -> OmniModel:
    """The `tiny` preset: real Qwen2-VL / Whisper classes at toy size, random weights."""
    from trainer.models.tiny import tiny_vlm_config, tiny_whisper_config

    torch.manual_seed(seed)
    return build_from_configs(
        tiny_vlm_config(len(processor.tokenizer)),
        tiny_whisper_config(processor.num_mel_bins, processor.window_frames),
        processor,
        projector=projector,
        dtype=dtype,
        attn_impl=attn_impl,
        init_ctx=init_ctx,
    )


def compose(vlm_path: str, audio_encoder_path: str, processor: OmniProcessor, *, projector="mlp",
            dtype=torch.bfloat16, attn_impl="auto", init_ctx=contextlib.nullcontext) -> OmniModel:
    """A new composition from pretrained weights: the VLM, Whisper's encoder only, and a
    fresh projector. Under ZeRO-3 keep an HfDeepSpeedConfig alive (module docstring)."""
    _check_zero3_setup(init_ctx)
    vlm_config = AutoConfig.from_pretrained(vlm_path)
    adapter_cls = adapter_for(vlm_config.model_type)
    impl = resolve_attn_impl(attn_impl)
    vlm = adapter_cls.vlm_class.from_pretrained(vlm_path, dtype=dtype, attn_implementation=impl)
    # Whisper checkpoints (WhisperModel / WhisperForConditionalGeneration) keep the encoder
    # under "encoder." / "model.encoder."; map those keys onto a bare WhisperEncoder.
    audio_encoder, loading_info = ZeroSafeWhisperEncoder.from_pretrained(
        audio_encoder_path,
        dtype=dtype,
        attn_implementation=impl,
        key_mapping={r"^model\.encoder\.": "", r"^encoder\.": ""},
        output_loading_info=True,
    )
    if loading_info["missing_keys"]:
        raise ValueError(f"{audio_encoder_path}: Whisper encoder weights missing: {sorted(loading_info['missing_keys'])[:8]}")
    with default_dtype(dtype), _enter(init_ctx):
        audio_projector = AudioProjector(
            audio_encoder.config.d_model, processor.audio_stack, vlm_config.get_text_config().hidden_size, projector
        )
    _vocab_fits(vlm, processor)
    return OmniModel(vlm, audio_encoder, audio_projector, processor)


def omni_spec(model: OmniModel) -> dict:
    """The architecture as JSON (no weights): omni_config.json of an export, and
    omni_spec.json (OMNI_SPEC) of a trainer checkpoint; `build_from_spec` rebuilds it."""
    return dict(
        vlm_config=model.vlm.config.to_dict(),
        whisper_config=model.audio_encoder.config.to_dict(),
        projector=model.projector.kind,
        audio_stack=model.projector.stack,
    )


def save_omni(model: OmniModel, processor: OmniProcessor, out_dir: str, state_dict: dict | None = None) -> None:
    """Write `out_dir`: omni_config.json, model.safetensors (fp32 unless the weights are
    lower precision), and the processor. `state_dict`: a consolidated one (export_hf)
    instead of the model's own (the model then only supplies the architecture)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    state_dict = model.state_dict() if state_dict is None else state_dict
    # Tied weights are stored once; load_omni re-ties them through the config.
    seen, tensors = {}, {}
    for name, tensor in state_dict.items():
        key = (tensor.data_ptr(), tensor.shape) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous().cpu()
    save_file(tensors, os.path.join(out_dir, WEIGHTS))
    with open(os.path.join(out_dir, OMNI_CONFIG), "w") as f:
        json.dump(omni_spec(model), f, indent=2)
    processor.save_pretrained(out_dir)


def configs_from_spec(spec: dict):
    """(VLM config, Whisper config) from an omni_config.json dict."""
    vlm_config_dict = dict(spec["vlm_config"])
    model_type = vlm_config_dict.pop("model_type")
    vlm_config = AutoConfig.for_model(model_type, **vlm_config_dict)
    whisper_dict = {k: v for k, v in spec["whisper_config"].items() if k != "model_type"}
    return vlm_config, WhisperConfig(**whisper_dict)


def build_from_spec(spec: dict, processor: OmniProcessor, *, dtype=torch.float32, attn_impl="auto",
                    init_ctx=contextlib.nullcontext) -> OmniModel:
    """Random-init model of the architecture `omni_spec` recorded (weights loaded by the caller)."""
    if spec.get("audio_stack", processor.audio_stack) != processor.audio_stack:
        raise ValueError(f"spec stacks {spec['audio_stack']} audio frames, the processor {processor.audio_stack}")
    vlm_config, whisper_config = configs_from_spec(spec)
    return build_from_configs(
        vlm_config, whisper_config, processor, projector=spec["projector"], dtype=dtype, attn_impl=attn_impl,
        init_ctx=init_ctx,
    )


def load_omni(model_dir: str, *, dtype=torch.float32, attn_impl="auto", init_ctx=contextlib.nullcontext):
    """-> (model, processor) from a directory written by save_omni / tools/export_hf.py.
    The weights file is read lazily, one tensor at a time. Under ZeRO-3 (init_ctx =
    zero.Init) they are copied in module by module under GatheredParameters(modifier_rank=0):
    only rank 0 reads them (the others receive its values when the module is re-partitioned),
    and only one module is ever whole at a time."""
    from safetensors import safe_open

    config_path = os.path.join(model_dir, OMNI_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: {model_dir} is not an exported omni model")
    with open(config_path) as f:
        spec = json.load(f)
    processor = OmniProcessor.from_pretrained(model_dir)
    model = build_from_spec(spec, processor, dtype=dtype, attn_impl=attn_impl, init_ctx=init_ctx)
    with safe_open(os.path.join(model_dir, WEIGHTS), framework="pt", device="cpu") as weights_file:
        load_weights(model, LazyWeights(weights_file), source=model_dir)
    return model, processor


class LazyWeights(Mapping):
    """Read-only mapping over an open safetensors file: names and shapes come from its
    header, a tensor is read from disk only when indexed."""

    def __init__(self, weights_file):
        self.weights_file = weights_file
        self.names = set(weights_file.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.weights_file.get_tensor(name)

    def __contains__(self, name) -> bool:  # Mapping's default would read the tensor
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, name: str) -> tuple:
        return tuple(self.weights_file.get_slice(name).get_shape())


def _stored_shape(state_dict, name: str) -> tuple:
    return state_dict.shape(name) if isinstance(state_dict, LazyWeights) else tuple(state_dict[name].shape)


def load_weights(model: OmniModel, state_dict, source: str) -> None:
    """Copy `state_dict` (a dict of tensors or LazyWeights) into `model` (plain or ZeRO-3
    partitioned). Keys missing from the file must be tied to a stored one; unexpected keys
    are an error. Names and shapes are checked on every rank before any gather, so a bad
    file fails everywhere at once; under ZeRO-3 only rank 0 reads parameter values."""
    params = dict(model.named_parameters())  # deduplicated: tied weights appear once
    buffers = dict(model.named_buffers())
    unexpected = sorted(set(state_dict) - set(model.state_dict()))
    missing = sorted(set(params) - set(state_dict))
    if unexpected or missing:
        raise ValueError(f"{source}: weights do not match the architecture: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, tensor in {**params, **buffers}.items():
        if name in state_dict:
            expected = tuple(getattr(tensor, "ds_shape", tensor.shape))  # ZeRO-3: the whole shape
            if _stored_shape(state_dict, name) != expected:
                raise ValueError(f"{source}: {name} has shape {_stored_shape(state_dict, name)}, model {expected}")
    zero3 = any(hasattr(p, "ds_id") for p in params.values())
    if zero3:
        import deepspeed
    # Under ZeRO-3 rank 0 is the modifier_rank: its values are broadcast when a module is released.
    reads_params = not zero3 or deepspeed.comm.get_rank() == 0
    with torch.no_grad():
        for module_name, module in model.named_modules():
            prefix = f"{module_name}." if module_name else ""
            own = [(n, p) for n, p in module.named_parameters(recurse=False)]
            if not own:
                continue
            gather = (
                deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0) if zero3 else contextlib.nullcontext()
            )
            with gather:
                for name, param in own:
                    key = prefix + name
                    if reads_params and key in state_dict:
                        param.copy_(state_dict[key].to(param.dtype))
        for name, buffer in buffers.items():
            if name in state_dict:
                buffer.copy_(state_dict[name].to(buffer.dtype))


def build_model(cfg, *, dtype=torch.float32, init_ctx=contextlib.nullcontext, ds_config: dict | None = None):
    """The trainer's entry: `cfg` has model, vlm, audio_encoder, audio_stack, projector,
    trainable, attn_impl, gradient_checkpointing (trainer.config.ModelConfig).
    Under ZeRO-3 pass init_ctx=deepspeed.zero.Init(config_dict_or_path=ds_config) AND the
    filled `ds_config` dict: Hugging Face builds/loads its modules partitioned only while a
    transformers HfDeepSpeedConfig is alive, so one is created here and kept on the model
    (`model.hf_deepspeed_config`) for the rest of the run. -> (model, processor)."""
    hf_deepspeed_config = _hf_zero3_config(init_ctx, ds_config)
    if cfg.model == "tiny":
        from trainer.models.tiny import build_tiny_processor

        processor = build_tiny_processor(audio_stack=cfg.audio_stack)
        model = build_tiny(processor, projector=cfg.projector, dtype=dtype, attn_impl=cfg.attn_impl, init_ctx=init_ctx)
    elif cfg.model is not None:
        model, processor = load_omni(cfg.model, dtype=dtype, attn_impl=cfg.attn_impl, init_ctx=init_ctx)
    else:
        processor = OmniProcessor.compose(cfg.vlm, cfg.audio_encoder, cfg.audio_stack)
        model = compose(cfg.vlm, cfg.audio_encoder, processor, projector=cfg.projector, dtype=dtype,
                        attn_impl=cfg.attn_impl, init_ctx=init_ctx)
    model.hf_deepspeed_config = hf_deepspeed_config
    set_trainable(model, cfg.trainable)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model, processor


def _hf_zero3_config(init_ctx, ds_config):
    """An HfDeepSpeedConfig for a zero.Init build unless one is already alive (needs the
    `accelerate` package, as all of transformers' DeepSpeed integration does)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if type(init_ctx).__name__ != "Init" or is_deepspeed_zero3_enabled():
        return None
    if ds_config is None:
        raise RuntimeError("build_model under deepspeed.zero.Init needs ds_config=<the filled DeepSpeed config dict>")
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def answer_chunks_for(max_answer_tokens: int, chunk_size: int) -> int:
    """Chunk count for `forward(answer_chunks=...)` given the max answer-token count over
    ranks (the trainer all-reduces it with the normaliser), SFT and KD alike."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return max(1, math.ceil(max_answer_tokens / chunk_size))
