"""Real 2-rank ZeRO-3 run (CPU, gloo) of the frozen and EMA teachers (dist_teacher_check.py, a
check of the session's shared launch), then tools/export_hf.py on the checkpoint it wrote: the
export must reload to exactly the weights the ranks gathered."""

import os

import pytest
import torch

from tests.shared_launch import Check, call
from tools import export_hf
from trainer.models.serialize import load_omni

CHECKS = [Check("teachers_and_export", [call("tests.dist_teacher_check:main", "{dir}/ckpt")])]


@pytest.mark.slow
@pytest.mark.launch_checks("teachers_and_export")
def test_frozen_and_ema_teachers_and_export_under_zero3_two_ranks(launch, tmp_path):
    launch.records("teachers_and_export")
    output = launch.log("teachers_and_export", "tests.dist_teacher_check:main")
    assert "DIST_TEACHER_CHECK_OK" in output, output[-6000:]
    save_dir = os.path.join(launch.dir("teachers_and_export"), "ckpt")

    out_dir = tmp_path / "exported"
    export_hf.main(["--checkpoint", os.path.join(save_dir, "step_00000003"), "--out", str(out_dir)])  # in this process
    gathered = torch.load(os.path.join(save_dir, "gathered_weights.pt"), weights_only=True)
    model, _ = load_omni(str(out_dir), attn_impl="sdpa")
    exported = dict(model.named_parameters())
    assert set(exported) == set(gathered)
    for name, weight in gathered.items():
        assert torch.equal(exported[name].detach(), weight), name
