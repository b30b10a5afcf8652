"""Attention shares: how much of its attention a group of query positions spends on a
group of key positions, per layer (the paper's typed-vs-spoken attention analysis).

For one sample, layer l, head h and query position q, the attention row a[l,h,q,:] sums
to 1 over the keys. The share of a key set K is sum_{k in K} a[l,h,q,k], averaged over the
heads and over the query positions selected by `query_mask`. Shares of key sets that
partition the keys therefore sum to 1.
"""

import torch

from trainer.data import build_eval_loader
from trainer.models.serialize import load_omni

MODE_NAMES = {"text": "typed", "audio": "spoken"}


def attention_shares(attn, query_mask: torch.Tensor, key_masks: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per-layer attention share of each key set, for one sample.

    attn: Float[L, H, T, T], or a list of L tensors Float[H, T, T] (or Float[1, H, T, T]
        as a language model returns with output_attentions=True and batch size 1).
    query_mask: Bool[T], the query positions averaged over.
    key_masks: name -> Bool[T], the key positions of each group.
    Returns name -> [share of layer 0, ..., share of layer L-1].
    """
    layers = list(attn) if not isinstance(attn, torch.Tensor) else list(attn.unbind(0))
    query_mask = query_mask.bool()
    if not query_mask.any():
        raise ValueError("attention_shares: query_mask selects no position")
    shares = {name: [] for name in key_masks}
    for layer_attn in layers:
        if layer_attn.dim() == 4:
            if layer_attn.shape[0] != 1:
                raise ValueError(f"attention_shares takes one sample at a time, got batch {layer_attn.shape[0]}")
            layer_attn = layer_attn[0]
        # H, T, T -> Tq, T: average over heads, keep the selected query rows.
        rows = layer_attn.float().mean(dim=0)[query_mask]
        for name, key_mask in key_masks.items():
            if key_mask.shape[-1] != rows.shape[-1]:
                raise ValueError(f"key mask {name!r} has length {key_mask.shape[-1]}, attention has {rows.shape[-1]} keys")
            # Tq, T -> Tq -> scalar
            shares[name].append(rows[:, key_mask.bool()].sum(dim=-1).mean().item())
    return shares


def mean_shares(per_sample: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Average per-layer shares over samples (every sample weighs the same)."""
    if not per_sample:
        return {}
    names = per_sample[0].keys()
    return {name: [sum(layer) / len(per_sample) for layer in zip(*(s[name] for s in per_sample))] for name in names}


# --- measuring a model ------------------------------------------------------------------
# Query group -> key group pairs reported, as in the paper's analysis.
SHARE_PAIRS = (("question", "image"), ("answer", "image"), ("answer", "question"))


def token_groups(input_ids: torch.Tensor, processor, mode: str, num_answer_tokens: int) -> dict[str, torch.Tensor]:
    """Bool[T] masks partitioning one unpadded sequence (prompt + answer):
    image (the image placeholders), question (typed: the text between the image, or its end
    marker, and the user turn's end; spoken: the audio placeholders), answer (the last
    `num_answer_tokens`), other (system prompt, chat markup)."""
    tokenizer = processor.tokenizer
    positions = torch.arange(input_ids.shape[0])
    answer = positions >= input_ids.shape[0] - num_answer_tokens
    image = input_ids == processor.image_pad_id
    if mode == "audio":
        question = input_ids == processor.audio_pad_id
    else:
        image_at = image.nonzero().flatten()
        im_end = (input_ids == tokenizer.convert_tokens_to_ids(processor.turn_end)).nonzero().flatten()
        if len(image_at) == 0:
            raise ValueError(f"typed prompt has no {processor.image_pad}: not an image question")
        start = int(image_at[-1]) + 1
        if start < len(input_ids) and int(input_ids[start]) in tokenizer.all_special_ids:
            start += 1  # the family's image end marker (<|vision_end|>, <|vision_eos|>; Phi-4 has none)
        end = int(im_end[im_end > start][0])
        question = (positions >= start) & (positions < end)
    question &= ~answer
    other = ~(image | question | answer)
    return {"image": image, "question": question, "answer": answer, "other": other}


@torch.no_grad()
def sample_attention_shares(model, batch: dict, mode: str, answer: str) -> dict[str, list[float]]:
    """Teacher-forced attention shares of one eval sample (a batch of size 1 from
    build_eval_loader) with the question typed (mode "text") or spoken ("audio").
    The model must run eager attention (load_omni(..., attn_impl="eager")): fused kernels
    never materialise the weights. Returns "query->key" -> [share per layer] for queries
    question and answer and keys image, question, answer, other (each query's keys
    partition the sequence, so its shares sum to 1 per layer); SHARE_PAIRS are the ones
    the paper plots."""
    processor = model.processor
    role = "teacher" if mode == "text" else "student"
    device = model.adapter.input_embeddings().weight.device
    model.check_placeholders(batch, role)
    prompt, prompt_mask, _ = batch.side(role)
    if prompt_mask.shape[0] != 1 or not prompt_mask.all():
        raise ValueError(f"attention analysis takes unpadded batches of one sample, got keys {batch.keys}")
    answer_ids = processor.tokenizer(answer + processor.turn_end, add_special_tokens=False)["input_ids"]
    prompt_ids = prompt[0].to(device)
    input_ids = torch.cat([prompt_ids, torch.tensor(answer_ids, device=device)])[None]  # 1, T_prompt + T_answer
    attention_mask = torch.ones_like(input_ids)
    image_tokens, _ = model.encode_images(batch)
    audio_tokens = model.encode_audio(batch)[0] if role == "student" else None
    embeds = model.embed(input_ids, image_tokens, audio_tokens)
    grids = [] if batch.image_grid_thw is None else list(batch.image_grid_thw)
    position_ids = processor.rope_positions(input_ids[0].tolist(), grids)[:, None].to(device)  # 3, 1, T
    out = model.adapter.decoder_outputs(embeds, position_ids, attention_mask, output_attentions=True,
                                        **model.decoder_extras(input_ids, image_tokens))
    if not out.attentions or out.attentions[0] is None:
        raise RuntimeError("the language model returned no attention weights; load it with attn_impl='eager'")
    groups = token_groups(input_ids[0].cpu(), processor, mode, len(answer_ids))
    attn = [a.float().cpu() for a in out.attentions]
    shares = {}
    for query in ("question", "answer"):
        for key, values in attention_shares(attn, groups[query], groups).items():
            shares[f"{query}->{key}"] = values
    return shares


def model_attention(model_dir: str, shards: str, *, limit: int, max_seq_len: int, dtype: torch.dtype, device) -> dict:
    """Mean shares over the first `limit` samples: {"dir", "n", "shares": {"typed": ..., "spoken": ...}}."""
    model, processor = load_omni(model_dir, dtype=dtype, attn_impl="eager")
    model.to(device).eval()
    loader = build_eval_loader(shards, processor, micro_batch_size=1, max_seq_len=max_seq_len, rank=0, world_size=1)
    per_mode = {mode: [] for mode in MODE_NAMES}
    for batch in loader:
        if len(per_mode["text"]) >= limit:
            break
        batch = batch.to(device, dtype)
        answer = batch.answers[0][0]
        for mode in MODE_NAMES:
            per_mode[mode].append(sample_attention_shares(model, batch, mode, answer))
    if not per_mode["text"]:
        raise ValueError(f"{shards}: no usable evaluation sample")
    return {"dir": model_dir, "n": len(per_mode["text"]),
            "shares": {MODE_NAMES[mode]: mean_shares(samples) for mode, samples in per_mode.items()}}
