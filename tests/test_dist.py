"""The hang watchdog on a real 2-rank gloo job: a collective that one rank never joins ends
with every rank's stack in the log and a non-zero exit, not a job burning its allocation."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_hang_dumps_all_stacks_and_exits_nonzero():
    proc = subprocess.run(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29719", "tests/dist_hang_check.py"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert log.count("Timeout (0:00:05)!") == 2, "both ranks must dump"
    assert "in all_reduce_sum" in log, "rank 0's stack (inside the collective) is missing"
    assert "in stuck_elsewhere" in log, "rank 1's stack is missing"
