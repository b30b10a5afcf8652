"""Adapters: the few operations the omni model needs from a Hugging Face VLM family.

`OmniModel` never reaches into a VLM's internals itself; it asks its adapter to embed
tokens, encode images, compute (M-RoPE) position ids, run the decoder on input
embeddings and name the LM head. Supporting another family (InternVL, the Qwen2.5-Omni
thinker) means writing one more adapter and registering its `model_types`.

The adapters use only APIs present from transformers 5.17 on; where signatures moved
between releases (`get_rope_index` gained `mm_token_type_ids`, the KV-cache keyword
became `cache`), they inspect the installed signature instead of pinning one.
"""

import inspect

import torch
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration


class QwenVLAdapter:
    """Qwen2-VL: ViT with 2x2 patch merging, a Qwen2 decoder with 3-D (M-RoPE) positions."""

    model_types = ("qwen2_vl",)
    vlm_class = Qwen2VLForConditionalGeneration

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

    def dummy_image(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest image the tower accepts: one 2x2 merge group, (1, m, m) patches."""
        vision_config = self.config.vision_config
        merge = vision_config.spatial_merge_size
        patch_dim = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2
        pixel_values = torch.zeros(merge * merge, patch_dim, device=device)
        grid_thw = torch.tensor([[1, merge, merge]], dtype=torch.long, device=device)
        return pixel_values, grid_thw

    def position_ids(self, input_ids, image_grid_thw, attention_mask) -> torch.Tensor:
        """M-RoPE positions (3, B, T); padding positions are ignored via attention_mask."""
        kwargs = dict(image_grid_thw=image_grid_thw, attention_mask=attention_mask)
        if self._rope_takes_token_types:
            kwargs["mm_token_type_ids"] = (input_ids == self.image_token_id).int()
        position_ids, _ = self.core.get_rope_index(input_ids, **kwargs)
        return position_ids

    def decode(self, inputs_embeds, position_ids, attention_mask, cache=None, use_cache=False):
        """Decoder on input embeddings -> (last hidden states (B, T, H), cache or None)."""
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=use_cache,
            **{self._cache_keyword: cache},
        )
        new_cache = getattr(out, "cache", None) if hasattr(out, "cache") else getattr(out, "past_key_values", None)
        return out.last_hidden_state, new_cache


class Qwen25VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: same interface; its vision tower uses windowed attention internally."""

    model_types = ("qwen2_5_vl",)
    vlm_class = Qwen2_5_VLForConditionalGeneration


ADAPTERS = {model_type: cls for cls in (QwenVLAdapter, Qwen25VLAdapter) for model_type in cls.model_types}


def adapter_for(model_type: str):
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported VLM model_type {model_type!r}; supported: {sorted(ADAPTERS)}")
    return ADAPTERS[model_type]
