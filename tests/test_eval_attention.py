"""Attention shares on synthetic causal softmax attention, against a per-element loop."""

import pytest
import torch

from trainer.eval.attention import attention_shares, mean_shares


def _causal_softmax_attention(layers, heads, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(layers, heads, length, length, generator=g) * 3
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def _masks(length):
    # 0-1 system, 2-6 image, 7-10 question, 11-13 answer
    group = torch.tensor([0] * 2 + [1] * 5 + [2] * 4 + [3] * 3)
    assert len(group) == length
    return {name: group == i for i, name in enumerate(["system", "image", "question", "answer"])}


def test_shares_partition_and_range():
    attn = _causal_softmax_attention(3, 4, 14)
    masks = _masks(14)
    for query in ("question", "answer"):
        shares = attention_shares(attn, masks[query], masks)
        for layer in range(3):
            total = sum(shares[name][layer] for name in masks)
            assert total == pytest.approx(1.0, abs=1e-5)
            assert all(0.0 <= shares[name][layer] <= 1.0 for name in masks)
        if query == "question":
            # Causal attention: question tokens cannot see the answer.
            assert shares["answer"] == [0.0] * 3


def test_shares_match_loop_and_accept_layer_lists():
    attn = _causal_softmax_attention(2, 3, 14, seed=1)
    masks = _masks(14)
    query = masks["answer"]
    expected = []
    for layer in range(2):
        total, count = 0.0, 0
        for h in range(3):
            for q in range(14):
                if query[q]:
                    total += sum(attn[layer, h, q, k].item() for k in range(14) if masks["image"][k])
                    count += 1
        expected.append(total / count)
    as_tensor = attention_shares(attn, query, {"image": masks["image"]})["image"]
    # The HF form: a tuple of per-layer [1, H, T, T] tensors.
    as_list = attention_shares(tuple(a.unsqueeze(0) for a in attn), query, {"image": masks["image"]})["image"]
    assert as_tensor == pytest.approx(expected, abs=1e-6)
    assert as_list == pytest.approx(expected, abs=1e-6)


def test_bad_inputs_raise():
    attn = _causal_softmax_attention(1, 1, 14)
    masks = _masks(14)
    with pytest.raises(ValueError, match="no position"):
        attention_shares(attn, torch.zeros(14, dtype=torch.bool), masks)
    with pytest.raises(ValueError, match="length"):
        attention_shares(attn, masks["answer"], {"image": torch.ones(5, dtype=torch.bool)})


def test_mean_shares():
    merged = mean_shares([{"image": [0.2, 0.4]}, {"image": [0.4, 0.0]}])
    assert merged["image"] == pytest.approx([0.3, 0.2])
