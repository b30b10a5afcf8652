"""End to end through launch_scripts/demo.sh at the smallest size that runs every stage: demo
data with TTS (one micro-batch of 8 per rank), typed-question training, evaluation, 2-rank
ZeRO-3 Self-KD with its end-of-run evaluation, export, typed-vs-spoken evaluation, summary."""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_script_small(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OUT": str(out), "TRAIN_SAMPLES": "16", "HELDOUT_SAMPLES": "5", "VL_STEPS": "2", "KD_STEPS": "2",
           "MASTER_PORT": "29731", "NUM_GPUS": "2"}
    proc = subprocess.run(["bash", "launch_scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "Demo finished." in proc.stdout
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["n"] == 5 and report["gap"] == pytest.approx(report["vl_score"] - report["va_score"])
    assert (out / "eval" / "report.png").is_file() and (out / "export" / "omni_config.json").is_file()
    before = json.loads((out / "eval_before" / "report.json").read_text())
    assert before["n"] == 5 and "before Self-KD   : VL" in proc.stdout
    metrics = [json.loads(line) for line in (out / "tensorboard" / "selfkd" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/va_score" in m for m in metrics) and any(m.get("step") == 2 and "train/loss" in m for m in metrics)
