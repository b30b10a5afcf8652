"""End to end through launch_scripts/demo.sh at a small size: demo data with TTS, typed-question
training, evaluation, 2-rank ZeRO-3 Self-KD, export, typed-vs-spoken evaluation, summary."""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_script_small(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OUT": str(out), "TRAIN_SAMPLES": "48", "HELDOUT_SAMPLES": "10", "VL_STEPS": "3", "KD_STEPS": "4",
           "MASTER_PORT": "29731"}
    proc = subprocess.run(["bash", "launch_scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "Demo finished." in proc.stdout
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["n"] == 10 and report["gap"] == pytest.approx(report["vl_score"] - report["va_score"])
    assert (out / "eval" / "report.png").is_file() and (out / "export" / "omni_config.json").is_file()
    before = json.loads((out / "eval_before" / "report.json").read_text())
    assert before["n"] == 10 and "before Self-KD   : VL" in proc.stdout
    metrics = [json.loads(line) for line in (out / "tensorboard" / "selfkd" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/va_score" in m for m in metrics) and any(m.get("step") == 4 and "train/loss" in m for m in metrics)
