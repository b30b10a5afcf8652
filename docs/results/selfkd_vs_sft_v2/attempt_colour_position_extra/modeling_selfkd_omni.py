"""A composed omni model (a Hugging Face VLM + Whisper's encoder + an audio projector) as a
transformers model, for `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`.

This file is copied into every composed export by the selfkd trainer (tools/export_hf.py) and
imports nothing of it: only torch and transformers. It reproduces the trainer's forward exactly:
Whisper reads each batch's longest clip (or the 30 s window, `whisper_input`), the projector
stacks `audio_stack` encoder frames into one LLM token, the clips' valid tokens replace the
`<|audio_pad|>` placeholders in order, and the VLM's own forward runs on those embeddings
(images through its own vision tower) with the trainer's positions: M-RoPE for the Qwen VLMs,
1-D for InternVL, counted over the real tokens of left-padded prompts. Inputs come from the
processor beside it (processing_selfkd_omni.py). A later turn with its own pictures or speech can be
given with the cache of the earlier ones (its positions continue from theirs). Not supported:
concurrent generate() calls on one model object (where positions continue lives on it), a cache
this model did not fill (refused), videos.

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
    inputs = processor(images=[image], audios=[waveform_16k])          # or questions=["What colour ...?"]
    answer = processor.batch_decode(model.generate(**inputs, max_new_tokens=16)[:, inputs["input_ids"].shape[1]:],
                                    skip_special_tokens=True)
"""

import inspect

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoConfig, GenerationMixin, PretrainedConfig, PreTrainedModel, WhisperConfig
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.whisper.modeling_whisper import WhisperEncoder

VLM_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
               "qwen3_vl": "Qwen3VLForConditionalGeneration", "internvl": "InternVLForConditionalGeneration"}


class SelfKDOmniConfig(PretrainedConfig):
    """The VLM's and the Whisper encoder's configs (dicts), the projector and the audio
    placeholder id."""

    model_type = "selfkd_omni"

    def __init__(self, vlm_config=None, whisper_config=None, projector="mlp", audio_stack=4, whisper_input="clip",
                 audio_pad_id=None, **kwargs):
        self.vlm_config = dict(vlm_config or {})
        self.whisper_config = dict(whisper_config or {})
        self.projector = projector
        self.audio_stack = int(audio_stack)
        self.whisper_input = whisper_input
        self.audio_pad_id = audio_pad_id
        super().__init__(**kwargs)

    def vlm(self) -> PretrainedConfig:
        fields = {k: v for k, v in self.vlm_config.items() if k not in ("dtype", "torch_dtype")}  # from_pretrained's
        return AutoConfig.for_model(fields.pop("model_type"), **fields)

    def get_text_config(self, *args, **kwargs):
        return self.vlm().get_text_config(*args, **kwargs)


class ClipWhisperEncoder(WhisperEncoder):
    """Whisper's encoder on the 30 s window, or on any shorter even number of mel frames with the
    first frames / 2 rows of its position table (the trainer's ZeroSafeWhisperEncoder.forward)."""

    def forward(self, input_features, attention_mask=None, **kwargs):
        window = self.config.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
        if input_features.shape[-1] == window:
            return super().forward(input_features, attention_mask=attention_mask, **kwargs)
        hidden = F.gelu(self.conv2(F.gelu(self.conv1(input_features)))).permute(0, 2, 1)
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        hidden = F.dropout(hidden + self.embed_positions(positions), p=self.dropout, training=self.training)
        for layer in self.layers:
            hidden = layer(hidden, None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return BaseModelOutput(last_hidden_state=self.layer_norm(hidden))


class AudioProjector(nn.Module):
    """Stack `stack` encoder frames (a partial last group zero-filled), then Linear-GELU-Linear or one Linear."""

    def __init__(self, audio_dim: int, stack: int, hidden_size: int, kind: str = "mlp"):
        super().__init__()
        self.stack = stack
        if kind == "mlp":
            self.net = nn.Sequential(nn.Linear(audio_dim * stack, hidden_size), nn.GELU(),
                                     nn.Linear(hidden_size, hidden_size))
        else:
            self.net = nn.Linear(audio_dim * stack, hidden_size)

    def forward(self, frames):
        batch, num_frames, channels = frames.shape
        pad = (-num_frames) % self.stack
        if pad:
            frames = F.pad(frames, (0, 0, 0, pad))
        return self.net(frames.reshape(batch, (num_frames + pad) // self.stack, channels * self.stack))


def mrope_positions(token_ids: list, grids: list, image_token_id: int, merge: int) -> torch.Tensor:
    """Qwen M-RoPE positions (3, T) of one unpadded sequence: text advances all three axes, an
    image's placeholders take (start + t, start + row, start + col) over its merged grid, and the
    text after it resumes at start + max(rows, cols)."""
    positions, start, i, grids = [], 0, 0, iter(grids)
    while i < len(token_ids):
        if token_ids[i] == image_token_id:
            t, h, w = (int(x) for x in next(grids))
            rows, cols = h // merge, w // merge
            block = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(rows), torch.arange(cols),
                                               indexing="ij")).reshape(3, -1) + start
            positions.append(block)
            i += block.shape[1]
            start += max(rows, cols)
        else:
            run = i
            while run < len(token_ids) and token_ids[run] != image_token_id:
                run += 1
            positions.append(torch.arange(start, start + run - i).expand(3, -1))
            start += run - i
            i = run
    return torch.cat(positions, dim=1) if positions else torch.zeros(3, 0, dtype=torch.long)


class SelfKDOmniForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SelfKDOmniConfig
    base_model_prefix = "omni"
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: SelfKDOmniConfig):
        super().__init__(config)
        vlm_config = config.vlm()
        vlm_config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        self.family = vlm_config.model_type
        # In the dtype from_pretrained was asked for (it sets the default dtype while the model is built).
        self.vlm = getattr(transformers, VLM_CLASSES[self.family])._from_config(vlm_config, dtype=torch.get_default_dtype())
        whisper = WhisperConfig(**{k: v for k, v in config.whisper_config.items() if k != "model_type"})
        whisper._attn_implementation = vlm_config._attn_implementation
        self.audio_encoder = ClipWhisperEncoder(whisper)
        self.projector = AudioProjector(whisper.d_model, config.audio_stack, vlm_config.get_text_config().hidden_size,
                                        config.projector)
        if vlm_config.get_text_config().tie_word_embeddings:
            self._tied_weights_keys = {"vlm.lm_head.weight": "vlm.model.language_model.embed_tokens.weight"}
        self.image_token_id = int(vlm_config.image_token_id)
        # the VLM's keyword for the KV cache (`cache` from transformers 5.2x, `past_key_values` before)
        self._cache_keyword = "cache" if "cache" in inspect.signature(self.vlm.forward).parameters else "past_key_values"
        self._decode = None  # (next position per sample, tokens the cache then held): where positions continue
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from the export

    def get_input_embeddings(self):
        return self.vlm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.vlm.get_output_embeddings()

    # --- the trainer's audio path --------------------------------------------------
    def audio_tokens(self, input_features, audio_frames, counts):
        """(B, n_mels, W) log-mel windows, valid mel frames per clip (B), tokens per clip (B) ->
        the clips' valid projector outputs in order (sum counts, H)."""
        window = self.audio_encoder.config.max_source_positions * 2
        if self.config.whisper_input == "clip":
            group = 2 * self.projector.stack
            longest = int(audio_frames.max())
            input_features = input_features[..., : min(window, max(group, -(-longest // group) * group))]
        dtype = self.audio_encoder.conv1.weight.dtype
        frames = self.audio_encoder(input_features.to(dtype)).last_hidden_state
        tokens = self.projector(frames)
        width = tokens.shape[1]
        index = torch.cat([i * width + torch.arange(int(n)) for i, n in enumerate(counts.tolist())])
        return tokens.reshape(-1, tokens.shape[-1]).index_select(0, index.to(tokens.device))

    def positions(self, input_ids, attention_mask, image_grid_thw):
        """Positions of a run of tokens counted from 0 over its real tokens: M-RoPE (3, B, T) for the
        Qwen VLMs (its images' grids in order), 1-D (B, T) for InternVL."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if self.family == "internvl":
            return (mask.long().cumsum(-1) - 1).clamp(min=0)
        merge = self.config.vlm_config["vision_config"]["spatial_merge_size"]
        grids = iter([] if image_grid_thw is None else image_grid_thw.tolist())
        out = torch.zeros(3, *input_ids.shape, dtype=torch.long)
        for row, (ids, keep) in enumerate(zip(input_ids.tolist(), mask.bool().cpu())):
            real = [t for t, k in zip(ids, keep.tolist()) if k]
            images = sum(1 for j, t in enumerate(real) if t == self.image_token_id
                         and (j == 0 or real[j - 1] != self.image_token_id))
            out[:, row, keep] = mrope_positions(real, [next(grids) for _ in range(images)], self.image_token_id, merge)
        return out.to(input_ids.device)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, image_grid_thw=None, input_features=None,
                audio_frames=None, cache=None, past_key_values=None, use_cache=None, logits_to_keep=0, **kwargs):
        """`input_ids`: the tokens after those the cache holds (all of them without a cache: the
        prompt, a decoding step, or a later turn with its own pictures and speech);
        `attention_mask`: over every token, cached ones included."""
        cache = cache if cache is not None else past_key_values
        done = 0 if cache is None else cache.get_seq_length()
        batch, length = input_ids.shape
        if done == 0:
            offset = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        elif self._decode is None:
            raise ValueError("a filled cache this model did not fill: positions continue from the model's own calls")
        else:
            next_position, consumed = self._decode
            offset = next_position + (done - consumed)  # B: where this run of tokens starts
        embeds = self.get_input_embeddings()(input_ids)
        audio = input_ids == self.config.audio_pad_id
        if input_features is not None and bool(audio.any()):
            tokens = self.audio_tokens(input_features, audio_frames.cpu(), audio.sum(1).cpu())
            embeds = embeds.masked_scatter(audio[..., None], tokens.to(embeds.dtype))
        mask = None if attention_mask is None else attention_mask[:, -length:]
        relative = self.positions(input_ids, mask, image_grid_thw)
        shift = offset[:, None] if relative.dim() == 2 else offset[None, :, None]
        positions = relative + shift.to(relative.device)
        last = positions.amax(dim=-1) if positions.dim() == 2 else positions.amax(dim=(0, 2))
        real = torch.ones(batch, dtype=torch.bool) if mask is None else mask.bool().any(-1)
        self._decode = (torch.where(real.to(last.device), last + 1, offset.to(last.device)), done + length)
        extra = {}
        if pixel_values is not None:
            if self.family == "internvl":
                side = self.vlm.config.vision_config.image_size
                side = side[0] if isinstance(side, (list, tuple)) else side
                extra["pixel_values"] = pixel_values.view(-1, 3, side, side)
            else:
                extra.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        return self.vlm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=use_cache,
                        logits_to_keep=logits_to_keep, **{self._cache_keyword: cache}, **extra, **kwargs)  # labels, output_* ...

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, cache=None, past_key_values=None,
                                      use_cache=True, pixel_values=None, image_grid_thw=None, input_features=None,
                                      audio_frames=None, logits_to_keep=None, **kwargs):
        """The tokens the cache does not hold yet; pictures and speech only with the run that holds
        their placeholders (the prompt, or a later turn given with the cache of the earlier ones)."""
        cache = cache if cache is not None else past_key_values
        done = 0 if cache is None else cache.get_seq_length()
        new = input_ids[:, done:]
        inputs = {"input_ids": new, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        if bool((new == self.image_token_id).any()):
            inputs.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
        if bool((new == self.config.audio_pad_id).any()):
            inputs.update(input_features=input_features, audio_frames=audio_frames)
        return inputs

    def _image_starts(self, input_ids):
        """B, T: True where an image's placeholder run begins."""
        image = (input_ids == self.image_token_id).int()
        return (image - F.pad(image, (1, -1))) == 1

    def _image_rows(self, input_ids, pixel_values, image_grid_thw) -> list:
        """pixel_values split per sample (a sample's patches or tiles may be none), in order."""
        if self.family == "internvl":
            seq = self.vlm.config.image_seq_length
            counts = [int((row == self.image_token_id).sum()) // seq for row in input_ids]  # tiles per sample
        else:
            images = self._image_starts(input_ids).sum(1).tolist()  # images per sample; each its grid's t*h*w patch rows
            per_image = image_grid_thw.prod(-1).tolist() if image_grid_thw is not None else []
            counts, at = [], 0
            for n in images:
                counts.append(int(sum(per_image[at:at + n])))
                at += n
        return list(torch.split(pixel_values, counts)) if pixel_values is not None else [None] * len(counts)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beams and num_return_sequences: every per-sample input repeated expand_size times, the
        images' patches (or tiles) and grids as whole samples, not row by row."""
        if expand_size == 1:
            return input_ids, model_kwargs
        pixel_values, grids = model_kwargs.get("pixel_values"), model_kwargs.get("image_grid_thw")
        if pixel_values is not None:
            chunks = self._image_rows(input_ids, pixel_values, grids)
            model_kwargs["pixel_values"] = torch.cat([c for c in chunks for _ in range(expand_size)])
            if grids is not None:
                per_sample = torch.split(grids, self._image_starts(input_ids).sum(1).tolist())
                model_kwargs["image_grid_thw"] = torch.cat([g for g in per_sample for _ in range(expand_size)])
        for key, value in list(model_kwargs.items()):
            if key not in ("pixel_values", "image_grid_thw", "cache", "past_key_values") and torch.is_tensor(value) \
                    and value.dim() > 0 and value.shape[0] == input_ids.shape[0]:
                model_kwargs[key] = value.repeat_interleave(expand_size, dim=0)
        return input_ids.repeat_interleave(expand_size, dim=0), model_kwargs
