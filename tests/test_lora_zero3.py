"""LoRA under 2-rank ZeRO-3 (CPU, gloo), in the shared launch: runs with each teacher lower the
loss (composed tiny model and the Qwen2.5-Omni thinker; the frozen one also under ZeRO-2);
the EMA run resumes exactly; the
engine's adapters-off logits are the start model's; the merged export and the peft adapter
directory give the engine's logits. Every parameter is partitioned ({partitioned}: persistence
threshold 0), adapters included, in the composed frozen and EMA runs; the others use
ds_configs/zero3.json, where ZeRO-3 keeps such small parameters whole on every rank."""

import os

import pytest
import torch

from tests.shared_launch import Check, call, main
from tests.test_native_zero3 import partitioned
from tools import export_hf

pytestmark = pytest.mark.slow

LORA = ("--lora_r", "8", "--lora_alpha", "16", "--lr", "1e-2", "--kd_alpha", "0.75")
STEPS = 6


def start_model(data: dict, check_dir: str) -> dict:
    """{start}: a tiny composed model saved as an export (the start every run loads), and {partitioned}."""
    from trainer.models.build import build_tiny
    from trainer.models.serialize import save_omni
    from trainer.models.tiny import build_tiny_processor

    processor = build_tiny_processor()
    path = os.path.join(check_dir, "start")
    save_omni(build_tiny(processor, attn_impl="sdpa", seed=3), processor, path)
    return {"start": path, **partitioned(data, check_dir)}


def lora_run(name, *args):
    return main(name, *LORA, "--max_steps", str(STEPS), *args)


RESUME = ("--model", "{start}", "--ds_config", "{partitioned}", "--teacher", "ema", "--ema_decay", "0.5",
          "--save_every", "3", "--keep_last", "2")
CHECKS = [
    Check("lora_frozen", [
        lora_run("run", "--model", "{start}", "--ds_config", "{partitioned}", "--teacher", "frozen",
                 "--save_dir", "{dir}/ckpt"),
        call("tests.dist_logits:main", "--checkpoint", f"{{dir}}/ckpt/step_{STEPS:08d}", "--shards", "{heldout_shards}",
             "--out", "{dir}/engine_logits.pt", "--adapters_off_out", "{dir}/off_logits.pt")], prepare=start_model),
    Check("lora_shared", [lora_run("run", "--model", "{start}"),
                          lora_run("zero2_frozen", "--model", "{start}", "--ds_config", "ds_configs/zero2.json",
                                   "--teacher", "frozen")], prepare=start_model),
    Check("lora_ema_resume", [
        lora_run("full", *RESUME, "--save_dir", "{dir}/ckpt_full"),
        call("tests.test_train_zero3:copy_checkpoint", "{dir}/ckpt_full/step_00000003", "{dir}/ckpt_resumed",
             rank0_only=True),
        lora_run("resumed", *RESUME, "--save_dir", "{dir}/ckpt_resumed", "--resume", "auto")], prepare=start_model),
    Check("lora_qwen2_5_omni", [
        *(lora_run(teacher, "--model", "tiny-qwen2_5_omni", "--teacher", teacher,
                   "--ema_decay", "0.5", *(["--save_dir", "{dir}/frozen/ckpt"] if teacher == "frozen" else []))
          for teacher in ("shared", "frozen", "ema")),
        call("tests.dist_logits:main", "--checkpoint", f"{{dir}}/frozen/ckpt/step_{STEPS:08d}", "--shards",
             "{heldout_shards}", "--out", "{dir}/engine_logits.pt")]),
]


def falls(metrics: dict, key: str = "train/loss") -> tuple:
    values = [metrics[step][key] for step in range(1, STEPS + 1)]
    return sum(values[:3]) / 3, sum(values[-3:]) / 3


@pytest.mark.launch_checks("lora_frozen", "lora_shared", "lora_ema_resume", "lora_qwen2_5_omni")
@pytest.mark.parametrize("check,step", [("lora_frozen", "run"), ("lora_shared", "run"), ("lora_shared", "zero2_frozen"),
                                        ("lora_ema_resume", "full"),
                                        ("lora_qwen2_5_omni", "shared"), ("lora_qwen2_5_omni", "frozen"),
                                        ("lora_qwen2_5_omni", "ema")])
def test_lora_runs_lower_the_loss_with_each_teacher(launch, check, step):
    run = launch.ok(check, step)
    assert sorted(run.metrics) == list(range(1, STEPS + 1))
    first, last = falls(run.metrics)
    print(f"{check}/{step}: loss first 3 {first:.4f}, last 3 {last:.4f}")
    assert last < first, [run.metrics[s]["train/loss"] for s in run.metrics]
    assert all(run.metrics[s]["train/kd_loss"] >= 0 for s in run.metrics)
    assert "LoRA r=8 alpha=16 on " in run.output


@pytest.mark.launch_checks("lora_frozen", "lora_shared", "lora_qwen2_5_omni")
@pytest.mark.parametrize("check,step", [("lora_frozen", "run"), ("lora_shared", "zero2_frozen"),
                                        ("lora_qwen2_5_omni", "frozen")])
def test_the_frozen_teacher_under_lora_holds_no_weights(launch, check, step):
    """The start-of-run line: with LoRA the frozen teacher is the adapters-off model, 0 bytes."""
    output = launch.ok(check, step).output
    assert "frozen teacher holds 0.0 MiB of its own weights" in output
    assert "% ) " not in output and "M trained of" in output


@pytest.mark.launch_checks("lora_ema_resume")
def test_lora_resume_reproduces_the_uninterrupted_run(launch):
    """Adapters, optimizer, scheduler, the EMA of the adapters, loader and RNG come back."""
    full = launch.ok("lora_ema_resume", "full").metrics
    resumed = launch.ok("lora_ema_resume", "resumed")
    assert "resumed from" in resumed.output and sorted(resumed.metrics) == list(range(4, STEPS + 1))
    for step in range(4, STEPS + 1):
        for key in ("train/loss", "train/kd_loss", "train/ce_loss"):
            assert resumed.metrics[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)


def heldout_batch(processor, demo_shards):
    from trainer.data import build_train_loader

    return next(iter(build_train_loader(demo_shards["heldout_shards"], processor, stage="selfkd", micro_batch_size=2,
                                        max_seq_len=512, rank=0, world_size=1, num_workers=0, seed=0, shuffle=False)))


@pytest.mark.launch_checks("lora_frozen")
def test_adapters_off_is_the_start_and_both_exports_give_the_engine_logits(launch, demo_shards, tmp_path):
    """On the same held-out batch: the 2-rank engine's typed-side logits with the adapters off
    (the frozen teacher's) equal the start model's (1e-5); training changed the spoken side's
    (adapters and projector); the merged export (standard layout,
    loaded by load_omni) gives the engine's logits, and so does the start model with the
    adapter directory loaded by peft."""
    from peft import PeftModel

    from tests.dist_logits import answer_logits
    from trainer.models.serialize import load_omni

    launch.ok("lora_frozen", "run")
    check_dir = launch.dir("lora_frozen")
    engine = torch.load(os.path.join(check_dir, "engine_logits.pt"))
    off = torch.load(os.path.join(check_dir, "off_logits.pt"))
    start, processor = load_omni(os.path.join(check_dir, "start"))
    batch = heldout_batch(processor, demo_shards)
    torch.testing.assert_close(off, answer_logits(start, batch, "teacher"), rtol=1e-5, atol=1e-5)
    assert (answer_logits(start, batch) - engine).abs().max() > 1e-3, "training should change the spoken logits"

    ckpt = os.path.join(check_dir, "ckpt", f"step_{STEPS:08d}")
    export_hf.main(["--checkpoint", ckpt, "--out", str(tmp_path / "merged")])
    merged, _ = load_omni(str(tmp_path / "merged"))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(answer_logits(merged, batch), engine, rtol=1e-5, atol=1e-5)

    export_hf.main(["--checkpoint", ckpt, "--out", str(tmp_path / "adapter"), "--adapter_only"])
    base, _ = load_omni(os.path.join(check_dir, "start"))
    PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    torch.testing.assert_close(answer_logits(base, batch), engine, rtol=1e-5, atol=1e-5)


@pytest.mark.launch_checks("lora_qwen2_5_omni")
def test_the_merged_native_export_loads_with_the_family_class_to_the_engine_logits(launch, demo_shards):
    """Qwen2.5-Omni + LoRA: the merged export is the thinker's own layout, which
    Qwen2_5OmniThinkerForConditionalGeneration loads with no missing or unexpected weight and
    whose own forward gives the 2-rank engine's answer logits (1e-5)."""
    from tests.test_native_omni import hf_logits
    from tests.test_native_zero3 import answer_positions
    from trainer.models import native
    from trainer.models.processing import OmniProcessor

    launch.ok("lora_qwen2_5_omni", "frozen")
    check_dir = launch.dir("lora_qwen2_5_omni")
    export = os.path.join(check_dir, "export")
    export_hf.main(["--checkpoint", os.path.join(check_dir, "frozen", "ckpt", f"step_{STEPS:08d}"), "--out", export])
    _, thinker_cls, _ = native.THINKERS["qwen2_5_omni"]
    thinker, info = thinker_cls.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    batch = heldout_batch(OmniProcessor.from_pretrained(export), demo_shards)
    exported = answer_positions(hf_logits(thinker.eval(), batch, "student"), batch.student_labels)
    torch.testing.assert_close(exported, torch.load(os.path.join(check_dir, "engine_logits.pt")), rtol=1e-5, atol=1e-5)
