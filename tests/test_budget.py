"""trainer/data/budget.py: the token-budget plan against a naive reference; tools/bench_padding.py."""

import json

import numpy as np
import pytest

from trainer.data.budget import padded_tokens, plan_micro_batches, sample_lengths


def naive_plan(lengths, max_tokens):
    """Longest total first; a micro-batch takes the next sample while the padded size of the
    micro-batch with it, computed from scratch, stays within the budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-sum(lengths[i]), i))
    groups = [[]]
    for i in order:
        candidate = groups[-1] + [i]
        rows = [lengths[j] for j in candidate]
        size = len(rows) * (max(r[0] for r in rows) + max(r[1] for r in rows))
        if groups[-1] and size > max_tokens:
            groups.append([i])
        else:
            groups[-1] = candidate
    return groups


@pytest.mark.parametrize("seed", range(5))
def test_plan_equals_the_naive_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    with_teacher = seed % 2 == 0
    lengths = [(int(s), int(t) if with_teacher else 0)
               for s, t in zip(rng.lognormal(4, 1, n).astype(int) + 1, rng.lognormal(3.5, 1, n).astype(int) + 1)]
    budget = int(rng.integers(200, 3000))
    plan = plan_micro_batches(lengths, budget, np.random.default_rng(0))
    assert sorted(i for g in plan for i in g) == list(range(n)), "every sample exactly once"
    assert sorted(map(tuple, plan)) == sorted(map(tuple, naive_plan(lengths, budget)))
    for group in plan:
        assert len(group) == 1 or padded_tokens([lengths[i] for i in group]) <= budget
    assert plan == plan_micro_batches(lengths, budget, np.random.default_rng(0)), "seeded order"


def test_plan_edge_cases():
    rng = np.random.default_rng(0)
    assert plan_micro_batches([], 100, rng) == []
    assert plan_micro_batches([(500, 400)], 100, rng) == [[0]], "a sample over the budget goes alone"
    assert sorted(plan_micro_batches([(10, 0)] * 10, 50, rng)) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    with pytest.raises(ValueError):
        plan_micro_batches([(1, 1)], 0, rng)


def test_sample_lengths_counts_prompt_and_answer_per_side():
    sample = {"student_prompt_ids": [1] * 7, "teacher_prompt_ids": [1] * 4, "answer_ids": [2] * 3}
    assert sample_lengths(sample, with_teacher=True) == (10, 7)
    assert sample_lengths(sample, with_teacher=False) == (10, 0)
    assert sample_lengths({"student_prompt_ids": [1] * 5, "answer_ids": [2]}, with_teacher=True) == (6, 0)


def test_bench_padding_measures_both_ways_on_the_same_samples(tmp_path):
    """tools/bench_padding.py at a small size: every arm sees every sample, the token budget pads
    less than a fixed count, and its micro-batches stay within the budget but the lone ones."""
    from tools import bench_padding

    out = tmp_path / "padding.json"
    result = bench_padding.main(["--samples", "40", "--budgets", "6000", "--buffers", "40", "--json", str(out)])
    fixed, budget = result["arms"]
    assert fixed["samples"] == budget["samples"] == 40 and not fixed["skipped"]
    assert budget["token_padding_share"] < fixed["token_padding_share"]
    assert 0 < budget["fill_of_budget"]["mean"] <= 1.0 and budget["buffers"] == 1
    assert json.loads(out.read_text())["arms"][1]["max_tokens"] == 6000
