"""Real 2-rank ZeRO-3 run (CPU, gloo) of the frozen and EMA teachers (dist_teacher_check.py),
then tools/export_hf.py on the checkpoint it wrote: the export must reload to exactly the
weights the ranks gathered."""

import os
import subprocess
import sys

import pytest
import torch

from trainer.models.serialize import load_omni

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_frozen_and_ema_teachers_and_export_under_zero3_two_ranks(tmp_path):
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    proc = subprocess.run(
        [launcher, "--num_gpus", "2", "--master_port", "29531", os.path.join("tests", "dist_teacher_check.py")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "DIST_CHECK_DIR": str(tmp_path)},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "DIST_TEACHER_CHECK_OK" in output, output[-6000:]

    out_dir = tmp_path / "exported"
    export = subprocess.run(
        [sys.executable, os.path.join("tools", "export_hf.py"), "--checkpoint", str(tmp_path / "step_00000003"),
         "--out", str(out_dir)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert export.returncode == 0, (export.stdout + export.stderr)[-6000:]
    gathered = torch.load(tmp_path / "gathered_weights.pt", weights_only=True)
    model, _ = load_omni(str(out_dir), attn_impl="sdpa")
    exported = dict(model.named_parameters())
    assert set(exported) == set(gathered)
    for name, weight in gathered.items():
        assert torch.equal(exported[name].detach(), weight), name
