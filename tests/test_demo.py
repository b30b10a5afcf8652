"""End to end through launch_scripts/demo.sh at a small size: demo data with TTS, 2-rank
ZeRO-3 Self-KD training, export, typed-vs-spoken evaluation, and the closing summary."""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_script_small(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OUT": str(out), "TRAIN_SAMPLES": "48", "HELDOUT_SAMPLES": "10", "MAX_STEPS": "4",
           "MASTER_PORT": "29731"}
    proc = subprocess.run(["bash", "launch_scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "Demo finished." in proc.stdout
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["n"] == 10 and report["gap"] == pytest.approx(report["vl_score"] - report["va_score"])
    assert (out / "eval" / "report.png").is_file() and (out / "export" / "omni_config.json").is_file()
    metrics = [json.loads(line) for line in (out / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/va_score" in m for m in metrics) and any(m.get("step") == 4 and "train/loss" in m for m in metrics)
