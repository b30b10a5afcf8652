"""tools/bench_step.py measures the path users run: the trainer's DeepSpeed engine, loader,
objective and step (1 process, and 2 CPU ranks as a check of the session's shared launch),
with the plain-PyTorch reference beside it. Timings are printed, never asserted; the report's
shape and counts are."""

import json
import os
import subprocess
import sys

import pytest

from tests.shared_launch import Check, call

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
SHORT = ["--model", "tiny", "--json", "--steps", "2", "--warmup", "1", "--rounds", "1", "--samples", "16"]
# 2 ranks, the frozen teacher under LoRA (the adapters-off model); tools/bench_step.py --lora_r 0,4 would
# set the copy beside it (docs/performance.md), which here would double the check's time.
CHECKS = [Check("bench_two_ranks", [call("tests.test_bench_step:bench", *SHORT, "--engine", "deepspeed", "--teacher",
                                         "frozen", "--lora_r", "4", "--on_policy_tokens", "4")])]
BREAKDOWN = {"data_wait", "vision", "audio", "teacher", "student_forward", "loss_lm_head", "backward", "optimizer",
             "reduce", "host_blocked"}


def run(cmd):
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_one_process_deepspeed_and_plain_reference():
    """Two DeepSpeed configs benched in turn (--ds_config list), then the plain loop."""
    engine, zero2, plain = run([sys.executable, "tools/bench_step.py", *SHORT, "--ds_config",
                                "ds_configs/zero3.json,ds_configs/zero2.json"])
    assert engine["engine"] == "deepspeed-zero3" and zero2["engine"] == "deepspeed-zero2" and plain["engine"] == "none"
    assert (engine["ds_config"], zero2["ds_config"], plain["ds_config"]) == ("ds_configs/zero3.json",
                                                                            "ds_configs/zero2.json", None)
    assert zero2["overhead_s"] == round(zero2["kd_step_s"] - plain["kd_step_s"], 4) and zero2["fetches_per_step"] is None
    for report in (engine, plain):
        assert report["sft_step_s"] > 0 and report["kd_step_s"] > 0 and report["ratio"] > 0
        assert report["student_tokens"] > report["teacher_tokens"] > 0
        assert report["mfu"] is None and report["kd_peak_mem_gib"] is None  # CPU: no peak FLOPs, no CUDA peak
    assert set(engine["breakdown"]) == BREAKDOWN and engine["breakdown"]["teacher"] > 0
    assert isinstance(engine["host_syncs_per_step"], int) and engine["host_syncs_per_step"] > 0
    assert "breakdown" not in plain
    for report in (engine, plain):
        assert (report["lora_r"], report["teacher"], report["teacher_resident_mib"]) == (0, "shared", 0)
        assert report["whisper_input"] == "auto"
    assert engine["overhead_s"] == round(engine["kd_step_s"] - plain["kd_step_s"], 4) and "overhead_s" not in plain
    assert engine["fetches_per_step"]["modules"] > 0 and "fetches_per_step" not in plain


def bench(args: list) -> None:
    """tools/bench_step.py's command line in a rank of the shared launch (its JSON lines go to the step's log)."""
    from tools import bench_step

    bench_step.main(args)


@pytest.mark.launch_checks("bench_two_ranks")
def test_two_ranks_under_the_deepspeed_launcher(launch):
    launch.records("bench_two_ranks")
    output = launch.log("bench_two_ranks", "tests.test_bench_step:bench")
    (report,) = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert report["engine"] == "deepspeed-zero3" and report["world_size"] == 2 and report["teacher"] == "frozen"
    assert report["kd_step_s"] > 0 and report["teacher_tokens"] > 0 and report["lora_r"] == 4
    assert report["teacher_resident_mib"] == 0, "LoRA's frozen teacher is the adapters-off model: no copy"
    # On-policy steps (the adapters-off teacher grading the student's own answers): timed, with the
    # generation's share and its parameter fetches: more than an off-policy step's (every decoding step
    # fetches the LLM's modules again).
    on_policy = report["on_policy"]
    assert on_policy["max_new_tokens"] == 4 and on_policy["step_s"] > 0 and 0 < on_policy["generate_frac"] < 1
    assert 0 < on_policy["gen_length"] <= 4
    assert on_policy["fetches_per_step"]["modules"] > report["fetches_per_step"]["modules"]
    from trainer.models.build import build_tiny
    from trainer.models.tiny import build_tiny_processor

    full = sum(p.numel() for p in build_tiny(build_tiny_processor()).parameters() if p.requires_grad)
    assert 0 < report["trained_params"] < full / 2, "the adapters and the projector train, not the LLM's weights"
