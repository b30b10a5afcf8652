"""Real 2-rank ZeRO-3 runs on the CPU (`deepspeed --num_gpus 2`, gloo) of the native omni
models (tiny-qwen2_5_omni, tiny-qwen3_omni, tiny-phi4mm) on spoken-question shards: the loss falls with
each teacher kind, an export loads with the family's own class to the engine's logits, ranks
with different modality mixes finish, and the mixture-of-experts layers give every expert
the gradient of the tokens routed to it on either rank. The runs are checks of the session's
shared launch (tests/shared_launch.py).

At these toy sizes every parameter is below ds_configs/zero3.json's
stage3_param_persistence_threshold (1e5 elements): persistent, gathered at its first use and
regathered, all at once, after each optimizer step, so from step 2 on no module gathers in
the forward pass. The Qwen3-Omni and Phi-4 runs use a copy of the file with the threshold at
0: every parameter partitioned, gathered whenever its module runs and released after, as a
real model's large parameters are (Phi-4's image embedding as one leaf module)."""

import json
import os

import pytest
import torch

from tests.shared_launch import Check, call, main
from tools import export_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# Each family trains with a teacher that keeps its own weights; the rank-mix run uses the shared one.
TEACHERS = {"tiny-qwen2_5_omni": "ema", "tiny-qwen3_omni": "frozen", "tiny-phi4mm": "frozen"}
# Phi-4's images are 448 px crops: 545 tokens each.
MAX_SEQ_LEN = {"tiny-phi4mm": 1024}
STEPS = 6


def partitioned(data: dict, check_dir: str) -> dict:
    """{partitioned}: ds_configs/zero3.json with every parameter partitioned (persistence threshold 0)."""
    with open(os.path.join(ROOT, "ds_configs", "zero3.json")) as f:
        ds = json.load(f)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = os.path.join(check_dir, "zero3_partitioned.json")
    with open(path, "w") as f:
        json.dump(ds, f, indent=2)
    return {"partitioned": path}


def mixed_partitioned(data: dict, check_dir: str) -> dict:
    from tests.test_train_zero3 import mixed_modality_shards

    return {**partitioned(data, check_dir), **mixed_modality_shards(data, check_dir)}


def family_check(preset: str) -> Check:
    """A STEPS-step Self-KD run of one family with its teacher, checkpointed at the end, then the
    2-rank engine's answer logits of that checkpoint on a held-out batch (tests/dist_logits.py)."""
    ds_config = "ds_configs/zero3.json" if preset == "tiny-qwen2_5_omni" else "{partitioned}"
    return Check(preset, [
        main("run", "--model", preset, "--ds_config", ds_config, "--max_seq_len", str(MAX_SEQ_LEN.get(preset, 512)),
             "--max_steps", str(STEPS), "--teacher", TEACHERS[preset], "--save_dir", "{dir}/run/ckpt"),
        call("tests.dist_logits:main", "--checkpoint", f"{{dir}}/run/ckpt/step_{STEPS:08d}", "--shards",
             "{heldout_shards}", "--out", "{dir}/engine_logits.pt")], prepare=partitioned)


CHECKS = [
    *(family_check(preset) for preset in TEACHERS),
    Check("qwen3_omni_modality_mix", [main("run", "--model", "tiny-qwen3_omni", "--ds_config", "{partitioned}",
                                           "--train_shards", "{mixed_shards}", "--max_steps", "4", "--num_workers", "1")],
          prepare=mixed_partitioned),
    Check("qwen3_omni_moe_grads", [call("tests.dist_moe_check:main", "--shards", "{train_shards}", "--ds_config",
                                        "{partitioned}", "--out", "{dir}/moe.json")], prepare=partitioned),
]


@pytest.fixture(scope="module", params=list(TEACHERS))
def trained(request, launch):
    """(preset, run, the check's folder): the family's STEPS-step run, checkpointed at the end."""
    preset = request.param
    return preset, launch.ok(preset, "run"), launch.dir(preset)


@pytest.mark.launch_checks(*TEACHERS)
def test_loss_falls_with_the_family_teacher(trained):
    preset, run, _ = trained
    metrics = run.metrics
    assert sorted(metrics) == list(range(1, STEPS + 1))
    for key in ("train/loss", "train/ce_loss"):
        values = [metrics[step][key] for step in range(1, STEPS + 1)]
        first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
        print(f"{preset} --teacher {TEACHERS[preset]} {key}: first 3 {first:.4f}, last 3 {last:.4f}")
        assert last < first, f"{key} did not fall: {values}"
    assert all(metrics[step]["train/kd_loss"] >= 0.0 for step in metrics)
    assert metrics[STEPS]["train/nonfinite_steps"] == 0


def answer_positions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits at the positions that predict answer tokens: N, V."""
    from trainer.distill.objective import answer_index

    index, _, _ = answer_index(labels)
    return logits.reshape(-1, logits.shape[-1]).index_select(0, index).float()


@pytest.mark.launch_checks(*TEACHERS)
def test_export_loads_with_the_family_class_to_the_engine_logits(trained, demo_shards):
    """tools/export_hf.py consolidates the ZeRO-3 checkpoint into the family's layout;
    <Family>ThinkerForConditionalGeneration loads it with no missing or unexpected weights and
    its own forward gives the 2-rank engine's answer logits on the same batch."""
    from trainer.data import build_train_loader
    from trainer.models import native
    from trainer.models.processing import OmniProcessor

    preset, run, check_dir = trained
    ckpt = os.path.join(run.dir, "ckpt", f"step_{STEPS:08d}")
    export = os.path.join(check_dir, "export")
    export_hf.main(["--checkpoint", ckpt, "--out", export])  # its command line, in this process
    reference = torch.load(os.path.join(check_dir, "engine_logits.pt"))

    from tests.test_native_omni import hf_logits
    from trainer.models.adapters import adapter_for

    _, thinker_cls, _ = native.THINKERS[native.TINY[preset]]
    thinker, info = thinker_cls.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    adapter_for(thinker.config.model_type)(thinker)  # the upstream fixes the trainer applies (Phi-4's SigLIP)
    processor = OmniProcessor.from_pretrained(export)
    batch = next(iter(build_train_loader(demo_shards["heldout_shards"], processor, stage="selfkd", micro_batch_size=2,
                                         max_seq_len=MAX_SEQ_LEN.get(preset, 512), rank=0, world_size=1, num_workers=0,
                                         seed=0, shuffle=False)))
    logits = hf_logits(thinker.eval(), batch, "student")
    exported = answer_positions(logits, batch.student_labels)
    print(f"{preset}: {tuple(exported.shape)} answer logits, max |export - engine| "
          f"{(exported - reference).abs().max().item():.2e}")
    assert exported.shape == reference.shape and exported.shape[0] > 0
    torch.testing.assert_close(exported, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.launch_checks("qwen3_omni_modality_mix")
def test_ranks_with_different_modality_mixes_finish(launch):
    """One shard of image questions, one of text-only questions, two ranks with one worker
    each: at every step one rank has images and the other none, so the vision tower (and its
    DeepStack mergers) runs on a dummy image there. A rank that skipped it would fall out of
    step with the other's gathers: gloo stops at step 1 with "Received data size doesn't match
    expected size" (seen with this file's config and with ds_configs/zero3.json alike)."""
    metrics = launch.ok("qwen3_omni_modality_mix").metrics
    assert sorted(metrics) == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in metrics.values())


@pytest.mark.launch_checks("qwen3_omni_moe_grads")
def test_moe_experts_routed_on_one_rank_get_their_gradient(launch):
    """tests/dist_moe_check.py: the two ranks' tokens reach different experts of the Qwen3-Omni
    thinker. The step finishes, each fused expert parameter is gathered whole while its layer
    runs, and the engine's gradient of every expert equals a single-process reference on both
    ranks' batches: an expert reached on one rank only gets that rank's gradient, one reached
    on neither an exact zero."""
    launch.records("qwen3_omni_moe_grads")
    with open(os.path.join(launch.dir("qwen3_omni_moe_grads"), "moe.json")) as f:
        result = json.load(f)
    ranks = result["ranks"]
    reached = [{int(layer): set(experts) for layer, experts in rank["reached"].items()} for rank in ranks]
    routed = [{int(layer): set(experts) for layer, experts in rank["routed"].items()} for rank in ranks]
    print("seeds", result["seeds"], "reached", reached, "routed", routed)
    # The engine routed exactly as the reference did on the same batches.
    assert [{int(k): set(v) for k, v in r.items()} for r in result["reference_reached"]] == reached

    # Every expert parameter is partitioned, gathered whole for each call of its layer, released after.
    for rank in ranks:
        for numel, full in rank["partitioned"].values():
            assert numel < full
        assert {layer for when, layer, _ in rank["gathers"]} == set(reached[0])
        for when, layer, params in rank["gathers"]:
            for status, numel, full, _ in params.values():
                assert (status, numel) == (("AVAILABLE", full) if when == "during" else ("NOT_AVAILABLE", 0)), \
                    (when, layer, params)

    one_rank_only = neither = 0
    for grad in result["grads"]:
        layer, expert = grad["layer"], grad["expert"]
        on = [expert in r[layer] for r in reached]
        assert grad["engine_norm"] == pytest.approx(grad["reference_norm"], rel=1e-5, abs=1e-12), grad
        assert grad["max_abs_diff"] <= 1e-5 * grad["reference_norm"] + 1e-9, grad
        if any(on):
            assert grad["engine_norm"] > 0, f"expert {expert} of layer {layer} reached on ranks {on} got no gradient"
        else:
            assert grad["engine_exact_zero"], f"expert {expert} of layer {layer} reached on no rank: {grad}"
        one_rank_only += sum(on) == 1
        neither += not any(on)
    assert one_rank_only and neither, "the seeds picked give no expert reached on one rank only, or none on neither"
