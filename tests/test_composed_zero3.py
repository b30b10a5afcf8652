"""Real 2-rank ZeRO-3 runs on the CPU (checks of the session's shared launch,
tests/shared_launch.py) of the composed Qwen3-VL and InternVL bases (`--model tiny-qwen3vl`,
`tiny-internvl`: the VLM + Whisper + projector), every parameter partitioned (persistence threshold 0, as a real model's large ones
are): the loss falls with the frozen, the EMA and the shared teacher; the shared-teacher run
mixes a shard of image questions with one of text-only questions, so at every step one rank
runs the vision tower (Qwen3-VL: and its DeepStack mergers) on a dummy image; the frozen run's
export reloads to the engine's logits."""

import os

import pytest
import torch

from tests.shared_launch import Check, call, main
from tests.test_native_zero3 import mixed_partitioned, partitioned
from tools import export_hf

pytestmark = pytest.mark.slow

STEPS = 6
PRESETS = {"qwen3vl": "tiny-qwen3vl", "internvl": "tiny-internvl"}
ADAPTERS = {"qwen3vl": "Qwen3VLAdapter", "internvl": "InternVLAdapter"}


def run_check(name: str, preset: str, teacher: str, *extra, prepare=partitioned, logits: bool = False) -> Check:
    steps = [main("run", "--model", preset, "--ds_config", "{partitioned}", "--max_steps", str(STEPS), "--teacher",
                  teacher, "--save_dir", "{dir}/run/ckpt", *extra)]
    if logits:
        steps.append(call("tests.dist_logits:main", "--checkpoint", f"{{dir}}/run/ckpt/step_{STEPS:08d}", "--shards",
                          "{heldout_shards}", "--out", "{dir}/engine_logits.pt"))
    return Check(name, steps, prepare=prepare)


RUNS = {f"{family}_{name}": teacher for family in PRESETS
        for name, teacher in (("frozen", "frozen"), ("ema", "ema"), ("shared_mix", "shared"))}
CHECKS = [check for family, preset in PRESETS.items() for check in (
    run_check(f"{family}_frozen", preset, "frozen", logits=True),
    run_check(f"{family}_ema", preset, "ema"),
    run_check(f"{family}_shared_mix", preset, "shared", "--train_shards", "{mixed_shards}", "--num_workers", "1",
              prepare=mixed_partitioned),
)]


@pytest.mark.parametrize("check", list(RUNS))
@pytest.mark.launch_checks(*RUNS)
def test_loss_falls_with_each_teacher(launch, check):
    metrics = launch.ok(check, "run").metrics
    assert sorted(metrics) == list(range(1, STEPS + 1))
    for key in ("train/loss", "train/ce_loss"):
        values = [metrics[step][key] for step in range(1, STEPS + 1)]
        first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
        print(f"{check} --teacher {RUNS[check]} {key}: first 3 {first:.4f}, last 3 {last:.4f}")
        assert last < first, f"{key} did not fall: {values}"
    assert metrics[STEPS]["train/nonfinite_steps"] == 0


@pytest.mark.parametrize("family", list(PRESETS))
@pytest.mark.launch_checks(*(f"{family}_frozen" for family in PRESETS))
def test_export_reloads_to_the_engine_logits(launch, demo_shards, family):
    """tools/export_hf.py consolidates the ZeRO-3 checkpoint; load_omni gives the 2-rank engine's
    answer logits on the same batch (fp32, 1e-5)."""
    from trainer.data import build_train_loader
    from trainer.models.serialize import load_omni
    from tests.dist_logits import answer_logits

    run, check_dir = launch.ok(f"{family}_frozen", "run"), launch.dir(f"{family}_frozen")
    export = os.path.join(check_dir, "export")
    export_hf.main(["--checkpoint", os.path.join(run.dir, "ckpt", f"step_{STEPS:08d}"), "--out", export])
    model, processor = load_omni(export, dtype=torch.float32, attn_impl="sdpa")
    assert type(model.adapter).__name__ == ADAPTERS[family]
    batch = next(iter(build_train_loader(demo_shards["heldout_shards"], processor, stage="selfkd", micro_batch_size=2,
                                         max_seq_len=512, rank=0, world_size=1, num_workers=0, seed=0, shuffle=False)))
    exported = answer_logits(model.eval(), batch)
    reference = torch.load(os.path.join(check_dir, "engine_logits.pt"))
    assert exported.shape == reference.shape and exported.shape[0] > 0
    torch.testing.assert_close(exported, reference, rtol=1e-5, atol=1e-5)
