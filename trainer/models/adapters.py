"""Adapters: the few operations the omni model needs from a Hugging Face model family.

`OmniModel` never reaches into a model's internals itself; it asks its adapter to embed
tokens, encode images (and, for a native omni model, audio), compute (M-RoPE) position ids,
run the decoder on input embeddings, name the LM head and the trainable parts. Supporting
another family means writing one more adapter and registering its `model_types`.

  QwenVLAdapter, Qwen25VLAdapter   VLMs composed with Whisper + a projector (trainer/models/omni.py)
  Qwen3VLAdapter                   Qwen3-VL composed the same way: DeepStack image features, interleaved M-RoPE
  InternVLAdapter                  InternVL 2.5 / 3 / 3.5 (-hf layout) composed the same way: tiles, pixel shuffle, 1-D positions
  QwenOmniAdapter                  the Qwen2.5-Omni thinker: its own audio tower and placeholders
  Qwen3OmniAdapter                 the Qwen3-Omni thinker: MoE LLM, DeepStack image features
  Phi4MMAdapter                    Phi-4-multimodal: HD image crops, a conformer audio encoder, 1-D positions

The adapters use only APIs present from transformers 5.17 on; where signatures moved
between releases (`get_rope_index` gained `mm_token_type_ids`, the KV-cache keyword
became `cache`), they inspect the installed signature instead of pinning one.
"""

import inspect

import torch
from torch import nn
from transformers import (InternVLForConditionalGeneration, Phi4MultimodalForCausalLM, Qwen2_5_VLForConditionalGeneration,
                          Qwen2_5OmniThinkerForConditionalGeneration, Qwen2VLForConditionalGeneration,
                          Qwen3OmniMoeThinkerForConditionalGeneration, Qwen3VLForConditionalGeneration)


class QwenVLAdapter:
    """Qwen2-VL: ViT with 2x2 patch merging, a Qwen2 decoder with 3-D (M-RoPE) positions."""

    model_types = ("qwen2_vl",)
    vlm_class = Qwen2VLForConditionalGeneration
    family = None  # a native omni family (trainer/models/processing.py FAMILIES), or None: composed with Whisper
    deepstack = 0  # DeepStack layers: image features carry this many per-layer additions
    z3_leaf_classes = ()  # modules ZeRO-3 must gather whole on entry (data-dependent calls inside)
    prefix_sharing_limit = None  # longest sequence whose cached prefix another pass may reuse (None: any)

    def __init__(self, vlm: nn.Module):
        self.vlm = vlm
        self.config = vlm.config
        self.image_token_id = int(vlm.config.image_token_id)
        rope_params = inspect.signature(self.core.get_rope_index).parameters
        self._rope_takes_token_types = "mm_token_type_ids" in rope_params
        decode_params = inspect.signature(self.language_model.forward).parameters
        self._cache_keyword = "cache" if "cache" in decode_params else "past_key_values"

    # --- modules -----------------------------------------------------------------
    @property
    def core(self) -> nn.Module:
        """The VLM body (vision tower + decoder), without the LM head."""
        return self.vlm.model

    @property
    def vision_tower(self) -> nn.Module:
        return self.core.visual

    @property
    def language_model(self) -> nn.Module:
        return self.core.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.vlm.lm_head

    @property
    def text_config(self):
        return self.config.get_text_config()

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    def input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    # --- operations ----------------------------------------------------------------
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_tokens(input_ids)  # B, T -> B, T, H

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """All images of the batch -> merged LLM-space tokens (sum_i t*h*w/4, H)."""
        vision = self.vision_tower
        dtype = next(vision.parameters()).dtype
        out = vision(pixel_values.to(dtype), grid_thw=image_grid_thw)
        # transformers >= 5.x returns the merged tokens as pooler_output; earlier a tensor.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def image_inputs(self, batch, device) -> dict:
        """The batch's image tensors as `image_features` takes them."""
        return {"pixel_values": batch.pixel_values.to(device), "image_grid_thw": batch.image_grid_thw.to(device)}

    def dummy_image(self, device) -> dict:
        """The smallest image the tower accepts: one 2x2 merge group, (1, m, m) patches."""
        vision_config = self.config.vision_config
        merge = vision_config.spatial_merge_size
        patch_dim = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2
        pixel_values = torch.zeros(merge * merge, patch_dim, device=device)
        grid_thw = torch.tensor([[1, merge, merge]], dtype=torch.long, device=device)
        return {"pixel_values": pixel_values, "image_grid_thw": grid_thw}

    def position_ids(self, input_ids, image_grid_thw, attention_mask) -> torch.Tensor:
        """M-RoPE positions (3, B, T); padding positions are ignored via attention_mask."""
        kwargs = dict(image_grid_thw=image_grid_thw, attention_mask=attention_mask)
        if self._rope_takes_token_types:
            kwargs["mm_token_type_ids"] = (input_ids == self.image_token_id).int()
        position_ids, _ = self.core.get_rope_index(input_ids, **kwargs)
        return position_ids

    def parts(self) -> dict:
        """Trainable part name -> the modules it unfreezes (the composed model adds "audio" and
        "projector": Whisper's encoder and our projector)."""
        return {"llm": [self.language_model, self.lm_head], "vision": [self.vision_tower]}

    def decoder_outputs(self, inputs_embeds, position_ids, attention_mask, cache=None, use_cache=False, **extra):
        """The decoder's own output object on input embeddings (positions (3, B, T)). `extra`:
        family inputs beyond the embeddings (Qwen3-Omni's DeepStack features), or flags such as
        output_attentions."""
        return self.language_model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=use_cache,
            **{self._cache_keyword: cache},
            **extra,
        )

    def decode(self, inputs_embeds, position_ids, attention_mask, cache=None, use_cache=False, **extra):
        """Decoder on input embeddings -> (last hidden states (B, T, H), cache or None)."""
        out = self.decoder_outputs(inputs_embeds, position_ids, attention_mask, cache=cache, use_cache=use_cache, **extra)
        new_cache = getattr(out, "cache", None) if hasattr(out, "cache") else getattr(out, "past_key_values", None)
        return out.last_hidden_state, new_cache


class Qwen25VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: same interface; its vision tower uses windowed attention internally."""

    model_types = ("qwen2_5_vl",)
    vlm_class = Qwen2_5_VLForConditionalGeneration


def deepstack_inputs(input_ids: torch.Tensor, image_tokens: torch.Tensor | None, image_token_id: int) -> dict:
    """A DeepStack decoder's inputs for a segment whose image placeholders `image_tokens`
    (N, 1 + D, H) fill, in order: the placeholder mask and the D per-layer additions."""
    if image_tokens is None:
        return {}
    return {"visual_pos_masks": input_ids == image_token_id, "deepstack_visual_embeds": list(image_tokens[:, 1:].unbind(1))}


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL (dense; Qwen3VLForConditionalGeneration), composed with Whisper + a projector like
    Qwen2-VL: a ViT of 16 px patches with learned position embeddings resampled to each image's
    grid, 2x2 merging, and DeepStack: the merged features of some ViT blocks are added to the
    hidden states at the image positions after the decoder's first layers, so image features are
    (N, 1 + D, H) as in Qwen3-Omni. Positions are M-RoPE ids computed like Qwen2-VL's for images
    (the collator's CPU positions, tested against get_rope_index); the decoder's rotary embedding
    interleaves the three axes' frequencies itself. Videos are not read (timestamps unsupported)."""

    model_types = ("qwen3_vl",)
    vlm_class = Qwen3VLForConditionalGeneration

    def __init__(self, vlm: nn.Module):
        super().__init__(vlm)
        self.deepstack = len(vlm.config.vision_config.deepstack_visual_indexes)

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        vision = self.vision_tower
        out = vision(pixel_values.to(next(vision.parameters()).dtype), grid_thw=image_grid_thw)
        return torch.stack([out.pooler_output, *out.deepstack_features], dim=1)  # N, 1 + D, H

    def deepstack_inputs(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None) -> dict:
        return deepstack_inputs(input_ids, image_tokens, self.image_token_id)


class FlatPositions:
    """1-D positions over the real tokens (row 0 of the collator's (3, B, T); the rows are equal),
    for families without M-RoPE (InternVL, Phi-4-multimodal)."""

    def position_ids(self, input_ids, image_grid_thw, attention_mask, audio_frames=None) -> torch.Tensor:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return positions[None].expand(3, -1, -1)

    def decoder_outputs(self, inputs_embeds, position_ids, attention_mask, cache=None, use_cache=False, **extra):
        return super().decoder_outputs(inputs_embeds, position_ids[0], attention_mask, cache=cache, use_cache=use_cache,
                                       **extra)


class InternVLAdapter(FlatPositions, QwenVLAdapter):
    """InternVL in transformers' native layout (InternVLForConditionalGeneration: the `-hf`
    checkpoints of InternVL 2.5, 3 and 3.5 with a dense LLM): `model.{vision_tower,
    multi_modal_projector, language_model}` + `lm_head`. Images arrive as 448 px tiles (the
    image processor's crops plus a thumbnail), flat in the batch (tiles, 3 * s * s); InternViT
    encodes each tile, pixel shuffle (0.5) and the MLP projector make `image_seq_length` tokens
    of it (256 at 448 px). Positions are 1-D (row 0 of the collator's (3, B, T)).
    Trainable parts: llm, vision (InternViT + the pixel-shuffle projector), audio and projector
    (Whisper and ours, as for every composed base)."""

    model_types = ("internvl",)
    vlm_class = InternVLForConditionalGeneration

    def __init__(self, vlm: nn.Module):
        self.vlm = vlm
        self.config = vlm.config
        self.image_token_id = int(vlm.config.image_token_id)
        side = vlm.config.vision_config.image_size
        self.tile = int(side[0] if isinstance(side, (list, tuple)) else side)
        decode_params = inspect.signature(self.language_model.forward).parameters
        self._cache_keyword = "cache" if "cache" in decode_params else "past_key_values"

    @property
    def vision_tower(self) -> nn.Module:
        return self.core.vision_tower

    def parts(self) -> dict:
        return {"llm": [self.language_model, self.lm_head], "vision": [self.vision_tower, self.core.multi_modal_projector]}

    def image_inputs(self, batch, device) -> dict:
        return {"pixel_values": batch.pixel_values.to(device)}

    def dummy_image(self, device) -> dict:
        """One black tile."""
        return {"pixel_values": torch.zeros(1, 3 * self.tile * self.tile, device=device)}

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3 * s * s) -> every tile's tokens in order (tiles * image_seq_length, H)."""
        tiles = pixel_values.view(-1, 3, self.tile, self.tile)
        out = self.core.get_image_features(pixel_values=tiles, vision_feature_layer=self.config.vision_feature_layer,
                                           vision_feature_select_strategy=self.config.vision_feature_select_strategy,
                                           return_dict=True)
        return out.pooler_output.reshape(-1, out.pooler_output.shape[-1])


class QwenOmniAdapter(QwenVLAdapter):
    """The Qwen2.5-Omni thinker: `model.{audio_tower, visual, language_model}` + `lm_head`.
    Audio: the valid mel frames of every clip, concatenated, through the thinker's own
    audio tower (2 s attention windows, stride-2 conv and 2x pooling: a token per 40 ms).
    Trainable parts: llm (decoder, embeddings, LM head), vision (the ViT and its merger),
    audio (the whole audio tower), projector (the audio tower's last projection into the
    LLM width, `audio_tower.proj`; the analogue of the composed model's projector)."""

    model_types = ("qwen2_5_omni_thinker",)
    vlm_class = Qwen2_5OmniThinkerForConditionalGeneration
    family = "qwen2_5_omni"

    def __init__(self, vlm: nn.Module):
        self.vlm = vlm
        self.config = vlm.config
        self.image_token_id = int(vlm.config.image_token_id)
        self.audio_token_id = int(vlm.config.audio_token_id)
        decode_params = inspect.signature(self.language_model.forward).parameters
        self._cache_keyword = "cache" if "cache" in decode_params else "past_key_values"

    @property
    def audio_tower(self) -> nn.Module:
        return self.core.audio_tower

    def projector_modules(self) -> list:
        return [self.audio_tower.proj]

    def parts(self) -> dict:
        return {**super().parts(), "audio": [self.audio_tower], "projector": self.projector_modules()}

    def frozen_always(self) -> list:
        """Parameters no forward pass uses (a trainable one would wait for a gradient)."""
        bos_eos = getattr(self.audio_tower, "audio_bos_eos_token", None)
        return [bos_eos] if bos_eos is not None else []

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        out = self.core.get_image_features(pixel_values, image_grid_thw)
        return torch.cat(out.pooler_output)  # per-image chunks -> sum_i t*h*w/4, H

    def audio_inputs(self, batch, device) -> dict:
        """The batch's audio as `audio_features` takes it (the frame counts stay on the CPU)."""
        return {"input_features": batch.input_features.to(device), "mel_frames": batch.audio_frames.cpu()}

    def audio_features(self, input_features: torch.Tensor, mel_frames: torch.Tensor) -> torch.Tensor:
        """(B, M, W) padded log-mel windows + each clip's valid frame count (CPU) -> the clips'
        tokens in order (sum of audio_token_count, H)."""
        width = input_features.shape[-1]
        mask = (torch.arange(width)[None] < mel_frames[:, None]).long()  # B, W: built where the counts live
        dtype = next(self.audio_tower.parameters()).dtype
        out = self.core.get_audio_features(input_features.to(dtype), feature_attention_mask=mask.to(input_features.device))
        return out.last_hidden_state

    def dummy_audio(self, device) -> dict:
        """One clip of one attention window (2 * n_window mel frames) of silence-level input."""
        frames = 2 * self.audio_tower.config.n_window
        return {"input_features": torch.zeros(1, self.audio_tower.config.num_mel_bins, frames, device=device),
                "mel_frames": torch.tensor([frames])}

    def position_ids(self, input_ids, image_grid_thw, attention_mask, audio_frames=None) -> torch.Tensor:
        position_ids, _ = self.core.get_rope_index(input_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask,
                                                   audio_seqlens=audio_frames)
        return position_ids


class Qwen3OmniAdapter(QwenOmniAdapter):
    """The Qwen3-Omni thinker: the same layout with a mixture-of-experts decoder, an audio
    tower of 8x conv downsampling (13 tokens per 100 mel frames), and DeepStack: the vision
    tower also returns features of some of its blocks, added to the hidden states at the
    image positions after the decoder's first layers. Image features are therefore
    (N, 1 + D, H): the token and its D per-layer additions, selected and detached together.
    Experts are one fused parameter per layer (gate_up_proj, down_proj), gathered whole by
    ZeRO-3 whatever the routing, so ranks routing to different experts never diverge in their
    collectives, and an expert no token chose gets an exact zero gradient. Projector: the
    audio tower's output MLP (`proj1`, `proj2`)."""

    model_types = ("qwen3_omni_moe_thinker",)
    vlm_class = Qwen3OmniMoeThinkerForConditionalGeneration
    family = "qwen3_omni_moe"

    def __init__(self, vlm: nn.Module):
        super().__init__(vlm)
        self.deepstack = len(vlm.config.vision_config.deepstack_visual_indexes)

    def projector_modules(self) -> list:
        return [self.audio_tower.proj1, self.audio_tower.proj2]

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        out = self.core.get_image_features(pixel_values, image_grid_thw)
        layers = [torch.cat(out.pooler_output)] + [torch.cat(chunks) for chunks in out.deepstack_features]
        return torch.stack(layers, dim=1)  # N, 1 + D, H

    def deepstack_inputs(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None) -> dict:
        return deepstack_inputs(input_ids, image_tokens, self.image_token_id)


class Phi4MMAdapter(FlatPositions, QwenVLAdapter):
    """Phi-4-multimodal (Phi4MultimodalForCausalLM): `model.{embed_tokens, layers, norm}` is the
    LLM, `model.embed_tokens_extend.{image_embed, audio_embed}` hold the SigLIP vision tower
    with its HD-crop projection and the conformer audio encoder with its two projection
    pairs (speech alone / speech with an image, chosen per batch as the model's own forward
    does). Positions are 1-D (row 0 of the collator's (3, B, T)).
    Upstream issues handled here (transformers 5.24):
      - the SigLIP attention is marked causal, so under sdpa a batch without padded crops
        runs causal image attention: set bidirectional (the checkpoint's SigLIP is);
      - image_embed calls its projection once per image: ZeRO-3 gathers it as one leaf module
        (so with --trainable vision under ZeRO-3 it is refused: DeepSpeed 0.19 frees a leaf
        module's parameters before their gradients are accumulated); the audio projections
        are called by the adapter itself, both pairs on every clip (per-clip choice below);
      - LongRoPE switches factors at original_max_position_embeddings: a cached prefix is
        reused only below it.
    Known and left: the audio encoder adds its padding mask as 0/1 instead of masking, so a
    clip's features depend slightly on the batch's longest clip (as in the model's own forward).
    Trainable parts: llm, vision (SigLIP + the image projection and its separators), audio
    (the conformer), projector (the audio projections). The released checkpoint's vision and
    speech LoRA adapters (PEFT) must be merged into the weights before training."""

    model_types = ("phi4_multimodal",)
    vlm_class = Phi4MultimodalForCausalLM
    family = "phi4_multimodal"

    def __init__(self, vlm: nn.Module):
        from transformers.models.phi4_multimodal import modeling_phi4_multimodal as phi4

        self.vlm = vlm
        self.config = vlm.config
        self.image_token_id = int(vlm.config.vision_config.image_token_id)
        self.audio_token_id = int(vlm.config.audio_config.audio_token_id)
        self._cache_keyword = "cache" if "cache" in inspect.signature(vlm.model.forward).parameters else "past_key_values"
        for module in vlm.modules():
            if isinstance(module, phi4.Phi4MultimodalVisionAttention):
                module.is_causal = False
        self.z3_leaf_classes = (phi4.Phi4MultimodalImageEmbedding,)
        # SigLIP's features come from transformers' output capturing (hidden state -2). Its hooks are
        # installed lazily per submodel; a later output_attentions call on the decoder installs them
        # a second time on the vision layers, after which the feature comes back None. Installing
        # them once, from the top, now, keeps every later call consistent.
        try:
            from transformers.utils.output_capturing import maybe_install_capturing_hooks
        except ImportError:  # releases without lazy capturing hooks
            maybe_install_capturing_hooks = None
        if maybe_install_capturing_hooks is not None:
            maybe_install_capturing_hooks(vlm.model)
        rope = getattr(vlm.config, "rope_parameters", None) or {}
        self.prefix_sharing_limit = rope.get("original_max_position_embeddings") or getattr(
            vlm.config, "original_max_position_embeddings", None)

    @property
    def core(self) -> nn.Module:
        return self.vlm.model

    @property
    def language_model(self) -> nn.Module:
        return self.vlm.model  # the decoder; its multimodal embedding branch is skipped on inputs_embeds

    @property
    def image_embed(self) -> nn.Module:
        return self.core.embed_tokens_extend.image_embed

    @property
    def audio_embed(self) -> nn.Module:
        return self.core.embed_tokens_extend.audio_embed

    @property
    def vision_tower(self) -> nn.Module:
        return self.image_embed

    @property
    def audio_tower(self) -> nn.Module:
        return self.audio_embed.encoder

    def parts(self) -> dict:
        core, audio = self.core, self.audio_embed
        return {"llm": [core.embed_tokens, core.layers, core.norm, self.vlm.lm_head], "vision": [self.image_embed],
                "audio": [self.audio_tower],
                "projector": [audio.up_proj_for_speech, audio.down_proj_for_speech, audio.up_proj_for_vision_speech,
                              audio.down_proj_for_vision_speech]}

    def frozen_always(self) -> list:
        """SigLIP past its feature layer (-2): the last block, post norm and pooling head never run."""
        tower = self.image_embed.img_processor
        unused = [tower.encoder.layers[-1], getattr(tower, "post_layernorm", None), getattr(tower, "head", None)]
        return [p for module in unused if module is not None for p in module.parameters()]

    def _fake(self, token_id: int, count: int, weight: torch.Tensor) -> tuple:
        """The embedding modules scatter into a token sequence: give them one of placeholders only."""
        ids = torch.full((1, count), token_id, dtype=torch.long, device=weight.device)
        return ids, torch.zeros(1, count, self.hidden_size, dtype=weight.dtype, device=weight.device)

    def image_inputs(self, batch, device) -> dict:
        return {"image_pixel_values": batch.pixel_values.to(device), "image_sizes": batch.image_sizes.to(device),
                "image_attention_mask": batch.image_attention_mask.to(device),
                "num_tokens": int(batch.image_token_counts.sum())}

    def dummy_image(self, device) -> dict:
        """A global view and one 2x2-patch crop (one crop alone is refused upstream): 5 tokens."""
        vision = self.config.vision_config
        side = 2 * vision.patch_size
        return {"image_pixel_values": torch.zeros(1, 2, 3, side, side, device=device),
                "image_sizes": torch.tensor([[vision.crop_size, vision.crop_size]], device=device),
                "image_attention_mask": torch.ones(1, 2, 2, 2, dtype=torch.bool, device=device), "num_tokens": 5}

    def image_features(self, image_pixel_values, image_sizes, image_attention_mask, num_tokens: int) -> torch.Tensor:
        weight = self.image_embed.img_projection_up.weight
        ids, embeds = self._fake(self.image_token_id, num_tokens, weight)
        out = self.image_embed(ids, embeds, image_pixel_values=image_pixel_values.to(weight.dtype),
                               image_sizes=image_sizes, image_attention_mask=image_attention_mask)
        return out[0]  # all images' tokens in order: N, H

    def audio_inputs(self, batch, device) -> dict:
        frames = batch.audio_frames.cpu()
        width = batch.input_features.shape[-1]
        mask = (torch.arange(width)[None] < frames[:, None]) if len(frames) > 1 else None
        # Which clips are asked about an image: their speech goes through the vision-speech projection.
        input_ids = batch.student_input_ids.to(device)
        return {"audio_input_features": batch.input_features.to(device).transpose(1, 2),  # B, W, M
                "audio_embed_sizes": batch.audio_token_counts.cpu(),
                "audio_attention_mask": None if mask is None else mask.to(device),
                "with_image": (input_ids == self.image_token_id).any(1)}

    def dummy_audio(self, device) -> dict:
        """One fbank frame: one token."""
        return {"audio_input_features": torch.zeros(1, 1, self.config.audio_config.input_size, device=device),
                "audio_embed_sizes": torch.tensor([1]), "audio_attention_mask": None,
                "with_image": torch.zeros(1, dtype=torch.bool, device=device)}

    def audio_features(self, audio_input_features, audio_embed_sizes, audio_attention_mask, with_image) -> torch.Tensor:
        """The conformer, then both projection pairs on every clip, each clip keeping the pair
        for its prompt: with an image (vision-speech) or without (speech). The model's own
        forward picks one pair for the whole batch (from whether any image was passed), which
        is what it does for a single sample; per clip keeps that in mixed batches, and every
        rank calls the same modules (no data-dependent call under ZeRO-3)."""
        embed = self.audio_embed
        dtype = embed.up_proj_for_speech.weight.dtype
        hidden = embed.encoder(audio_input_features.to(dtype), audio_attention_mask)  # B, W/8, C
        speech = embed.down_proj_for_speech(nn.functional.gelu(embed.up_proj_for_speech(hidden)))
        vision = embed.down_proj_for_vision_speech(nn.functional.gelu(embed.up_proj_for_vision_speech(hidden)))
        tokens = torch.where(with_image[:, None, None], vision, speech)  # B, W/8, H
        index = torch.cat([i * tokens.shape[1] + torch.arange(int(n)) for i, n in enumerate(audio_embed_sizes.tolist())])
        return tokens.reshape(-1, tokens.shape[-1]).index_select(0, index.to(tokens.device))  # sum(sizes), H



ADAPTERS = {model_type: cls for cls in (QwenVLAdapter, Qwen25VLAdapter, Qwen3VLAdapter, InternVLAdapter, QwenOmniAdapter,
                                        Qwen3OmniAdapter, Phi4MMAdapter)
            for model_type in cls.model_types}


def adapter_for(model_type: str):
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported VLM model_type {model_type!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type]
