"""tools/zero3_plan.py: the paper plan's arithmetic against a case computed by hand, and its
command line on the real presets (meta device, no weights)."""

import pytest

from tools.zero3_plan import main, plan

TRAINS = {"vision": False, "audio": False, "projector": False, "llm": True}


def test_one_row_by_hand():
    """A 1B decoder, nothing else, 2 nodes x 1 GPU (ring factor 1/2), 800 Gb/s between nodes
    (100 GB/s a GPU), 100 TFLOP/s at MFU 0.5, one sample of 456 student and 114 teacher tokens:
      traffic  1/2 x 2 bytes x (3 gathers + 1 reduce-scatter) x 1e9 = 4 GB  -> 0.04 s flat
      hpZ      the gathers stay in the node (1 GPU: nothing to gather), the reduce crosses: 0.01 s
      compute  (6 x 456 + 2 x 114) x 1e9 = 2.964 TFLOP -> 0.05928 s: compute-bound both ways."""
    params = {"decoder": 1e9, "lm_head": 0, "vision": 0, "audio": 0, "projector": 0, "trains": TRAINS}
    row = plan(params, nodes=2, gpus=1, inter_gbps=800, nvlink_gbs=100, peak_tflops=100, mfu=0.5, micro_batch=1)
    assert row["traffic_gb"] == 4.0
    assert row["flat"]["comm_s"] == pytest.approx(0.04) and row["hpz"]["comm_s"] == pytest.approx(0.01)
    assert row["compute_s"] == pytest.approx(0.0593, abs=1e-4)
    assert row["flat"]["bound"] == row["hpz"]["bound"] == "compute"
    assert row["flat"]["step_s_no_overlap"] == pytest.approx(0.0993, abs=1e-4)
    slow = plan(params, nodes=2, gpus=1, inter_gbps=80, nvlink_gbs=100, peak_tflops=100, mfu=0.5, micro_batch=1)
    assert slow["flat"]["bound"] == "communication" and slow["flat"]["comm_s"] == pytest.approx(0.4)


def test_the_presets_on_four_nodes_of_eight():
    out = main(["--json"])
    for name in ("synthetic-2b", "synthetic-8b"):
        result = out["presets"][name]
        assert [r["micro_batch"] for r in result["rows"]] == [1, 2, 4, 8, 16, 32, 64]
        flat, hpz = result["compute_bound_from"]["flat"], result["compute_bound_from"]["hpz"]
        assert hpz is not None and (flat is None or hpz <= flat), "hpZ keeps the gathers inside the node"
    assert out["presets"]["synthetic-8b"]["params_b"]["decoder"] > out["presets"]["synthetic-2b"]["params_b"]["decoder"]
