"""Checkpoints a week-long run can trust, on real 2-rank ZeRO-3 checkpoints (CPU, gloo):
every file listed with size and CRC-32 in the COMPLETE manifest and fsynced before it; a
corrupt newest checkpoint skipped with a warning naming the file, the previous one resumed
to the uninterrupted run's losses; a pickle payload in any checkpoint file refused by the
trainer and by tools/export_hf.py with no code run; export from a save directory; a run
that diverges stops before a save can replace good weights. The 2-rank runs are checks of the
session's shared launch (tests/shared_launch.py)."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from tests.shared_launch import Check, call, main
from tests.test_data_bad_inputs import TouchOnUnpickle
from trainer import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
COMMON = ("--max_steps", "4", "--save_every", "2", "--keep_last", "3", "--teacher", "ema", "--ema_decay", "0.9")
RESUME = (*COMMON, "--save_dir", "{dir}/ckpt", "--resume", "auto")
FULL = "{out}/ckpt_full/run/ckpt"  # the reference run's save directory


def truncate_newest(args: list) -> None:
    """[full run's save dir, into]: a copy whose step-4 model states are cut to 1000 bytes."""
    source, into = args
    shutil.copytree(source, into)
    truncated = Path(into) / "step_00000004" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    truncated.write_bytes(truncated.read_bytes()[:1000])


def plant_in_newest(args: list) -> None:
    """[full run's save dir, into, marker]: a copy whose step-4 rank-1 model states carry a
    payload that touches `marker`, the manifest rewritten to match."""
    source, into, marker = args
    shutil.copytree(source, into)
    ckpt = Path(into) / "step_00000004"
    plant_payload(ckpt / "zero_pp_rank_1_mp_rank_00_model_states.pt", Path(marker))
    rewrite_manifest(ckpt)


def strip_model_prefix(args: list) -> None:
    """[full run's save dir, into]: a copy holding only step 2, its engine states written as
    before the engine wrapped the objective (parameter names without "model.")."""
    source, into = args
    shutil.copytree(source, into)
    shutil.rmtree(Path(into) / "step_00000004")
    ckpt = Path(into) / "step_00000002"
    for path in ckpt.glob("zero_pp_rank_*_model_states.pt"):
        with checkpoint.safe_loading():
            state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("module", "frozen_param_fragments"):
            if state.get(key):
                state[key] = {name.removeprefix("model."): value for name, value in state[key].items()}
        torch.save(state, path)
    rewrite_manifest(ckpt)


CHECKS = [
    # 4 steps, checkpoints at steps 2 and 4; its per-step losses are the reference.
    Check("ckpt_full", [main("run", *COMMON, "--save_dir", "{dir}/run/ckpt")]),
    Check("ckpt_corrupt_newest", [call("tests.test_checkpoint_safety:truncate_newest", FULL, "{dir}/ckpt", rank0_only=True),
                                  main("resumed", *RESUME)], needs=("ckpt_full",)),
    Check("ckpt_payload", [call("tests.test_checkpoint_safety:plant_in_newest", FULL, "{dir}/ckpt", "{dir}/payload_ran",
                                rank0_only=True),
                           main("resumed", *RESUME)], needs=("ckpt_full",)),
    Check("ckpt_diverges", [main("run", "--max_steps", "30", "--lr", "1e9", "--warmup_steps", "0",
                                 "--max_nonfinite_steps", "2", "--save_every", "1", "--save_dir", "{dir}/ckpt")]),
    Check("ckpt_before_objective", [call("tests.test_checkpoint_safety:strip_model_prefix", FULL, "{dir}/ckpt",
                                         rank0_only=True),
                                    main("resumed", *RESUME)], needs=("ckpt_full",)),
]


@pytest.fixture(scope="module")
def full_run(launch):
    """4 steps, checkpoints at steps 2 and 4; its per-step losses are the reference (a test
    using it names "ckpt_full" in its launch_checks)."""
    run = launch.ok("ckpt_full")
    return {"ckpt": Path(run.dir) / "ckpt", "metrics": run.metrics}


def copy_checkpoints(full_run, dest: Path) -> Path:
    shutil.copytree(full_run["ckpt"], dest)
    return dest


def plant_payload(path: Path, marker: Path) -> None:
    """Rewrite a .pt file with the same content plus an object whose unpickling touches
    `marker`, so a weights_only=False load would both work and run the payload."""
    with checkpoint.safe_loading():
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = {"original": state, "payload": TouchOnUnpickle(marker)} if not isinstance(state, dict) else \
        {**state, "payload": TouchOnUnpickle(marker)}
    torch.save(state, path)


def rewrite_manifest(ckpt: Path) -> None:
    """What an attacker who can write files can also do: make the manifest match."""
    manifest = json.loads((ckpt / checkpoint.COMPLETE).read_text())
    (ckpt / checkpoint.COMPLETE).write_text(json.dumps(checkpoint.build_manifest(str(ckpt), manifest["step"])))


@pytest.mark.launch_checks("ckpt_full")
def test_manifest_lists_every_file_with_size_and_crc(full_run):
    ckpt = full_run["ckpt"] / "step_00000004"
    manifest = json.loads((ckpt / checkpoint.COMPLETE).read_text())
    on_disk = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "COMPLETE")
    assert sorted(manifest["files"]) == on_disk and manifest["step"] == 4
    assert any(name.startswith("zero_pp_rank_1_") for name in on_disk) and "trainer_state_rank1.pt" in on_disk
    for rel, entry in manifest["files"].items():
        data = (ckpt / rel).read_bytes()
        assert entry["size"] == len(data) and entry["crc32"] == f"{zlib.crc32(data):08x}", rel
    assert checkpoint.verify(str(ckpt)) is None


@pytest.mark.launch_checks("ckpt_full")
def test_verify_names_the_bad_file(full_run, tmp_path):
    save_dir = copy_checkpoints(full_run, tmp_path / "ckpt")
    ckpt = save_dir / "step_00000004"
    states = ckpt / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = states.read_bytes()
    states.write_bytes(data[: len(data) // 2])
    assert str(states) in checkpoint.verify(str(ckpt)) and "bytes" in checkpoint.verify(str(ckpt))
    states.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert "CRC-32" in checkpoint.verify(str(ckpt))
    states.unlink()
    assert "missing" in checkpoint.verify(str(ckpt))
    (ckpt / checkpoint.COMPLETE).write_text('{"format": 1, "st')
    assert "not a manifest" in checkpoint.verify(str(ckpt))


@pytest.mark.launch_checks("ckpt_full", "ckpt_corrupt_newest")
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(launch, full_run):
    save_dir = Path(launch.dir("ckpt_corrupt_newest")) / "ckpt"
    truncated = save_dir / "step_00000004" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    resumed = launch.ok("ckpt_corrupt_newest", "resumed")
    assert f"skipping {save_dir / 'step_00000004'}: {truncated} has 1000 bytes" in resumed.output
    assert f"resumed from {save_dir / 'step_00000002'} at step 2" in resumed.output
    for step in (3, 4):
        for key in ("train/loss", "train/kd_loss", "train/ce_loss"):
            assert resumed.metrics[step][key] == pytest.approx(full_run["metrics"][step][key], rel=1e-5, abs=1e-6)
    assert checkpoint.verify(str(save_dir / "step_00000004")) is None, "the re-run step 4 replaced the corrupt one"


@pytest.mark.launch_checks("ckpt_full")
def test_a_pickle_payload_in_any_checkpoint_file_is_refused(full_run, tmp_path):
    """Each .pt file of a real checkpoint (trainer states, DeepSpeed's model and optimizer
    partitions of both ranks), with a payload planted: the trainer's check names the file,
    and DeepSpeed's own checkpoint loader under safe_loading refuses it; nothing runs."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ckpt = copy_checkpoints(full_run, tmp_path / "ckpt") / "step_00000004"
    files = checkpoint.torch_files(str(ckpt))
    assert len(files) == 6
    marker = tmp_path / "payload_ran"
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(TouchOnUnpickle(control)))
    assert control.exists(), "the payload is real"
    for path in files:
        original = Path(path).read_bytes()
        plant_payload(Path(path), marker)
        with pytest.raises(checkpoint.CheckpointError, match=f"refusing to load {path}"):
            checkpoint.check_safe(files)
        with checkpoint.safe_loading(), pytest.raises(pickle.UnpicklingError):
            TorchCheckpointEngine().load(path, map_location="cpu")  # DeepSpeed asks for weights_only=False
        assert not marker.exists(), f"loading {path} ran code"
        Path(path).write_bytes(original)
    checkpoint.check_safe(files)  # the untouched files pass


@pytest.mark.launch_checks("ckpt_payload")
def test_resume_and_export_refuse_a_payload_without_running_it(launch, tmp_path):
    check_dir = Path(launch.dir("ckpt_payload"))
    ckpt = check_dir / "ckpt" / "step_00000004"
    target = ckpt / "zero_pp_rank_1_mp_rank_00_model_states.pt"
    marker = check_dir / "payload_ran"
    planted, resume = launch.steps("ckpt_payload")[0]
    assert planted["error"] is None, planted["error"]
    for rank, steps in enumerate(launch.steps("ckpt_payload")):  # the manifest matches: only the safe loader stops it
        assert steps[1]["error"] and f"refusing to load {target}" in steps[1]["error"], (rank, steps[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "tools/export_hf.py", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and f"refusing to load {target}" in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists(), "a checkpoint file ran code"


@pytest.mark.launch_checks("ckpt_full")
def test_export_takes_a_save_directory(full_run, tmp_path):
    """--checkpoint SAVE_DIR exports the newest checkpoint that verifies (step 4 is corrupt here)."""
    save_dir = copy_checkpoints(full_run, tmp_path / "ckpt")
    (save_dir / "step_00000004" / "trainer_state_rank0.pt").unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "tools/export_hf.py", "--checkpoint", str(save_dir), "--out",
                           str(tmp_path / "export")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"exported {save_dir / 'step_00000002'}" in proc.stdout
    assert "skipping" in proc.stderr and "trainer_state_rank0.pt is missing" in proc.stderr
    assert (tmp_path / "export" / "model.safetensors").exists()


@pytest.mark.launch_checks("ckpt_diverges")
def test_divergence_stops_the_run_before_a_save(launch):
    """--lr 1e9: the gradient norm goes non-finite and stays so; the run stops with exit code 3
    after --max_nonfinite_steps such steps, counted in TensorBoard, and never saves after one."""
    run = launch.run("ckpt_diverges")
    assert run.code == 3, run.output[-4000:]
    assert "non-finite steps in a row (--max_nonfinite_steps 2)" in run.output
    with open(os.path.join(run.dir, "tb", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f.read().splitlines()]
    finite = [r["step"] for r in records if r["train/nonfinite_steps"] == 0]
    last_good = max(finite)
    assert records[-1]["train/nonfinite_steps"] >= 1 and records[-1]["step"] == last_good + 1
    save_dir = Path(launch.dir("ckpt_diverges")) / "ckpt"
    saved = [int(p.name.split("_")[1]) for p in save_dir.iterdir() if p.name.startswith("step_")]
    assert max(saved) == last_good, "a checkpoint was written after a non-finite step"


FSYNC_ORDER = r"""
import json, os, sys
import deepspeed, torch
from trainer import checkpoint, dist
from trainer.models.tiny import build_tiny_processor

os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init(60)
model = torch.nn.Linear(4, 4)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
    "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 3}})
events = []
real_fsync, real_replace = os.fsync, os.replace
def fsync(fd):
    events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
    real_fsync(fd)
def replace(src, dst):
    events.append(("replace", str(dst)))
    real_replace(src, dst)
os.fsync, os.replace = fsync, replace
path = checkpoint.save(engine, sys.argv[1], 7, {"step": 7}, {}, {}, build_tiny_processor(), keep_last=2)
print(json.dumps({"path": path, "events": events}))
dist.shutdown()
"""


def test_every_file_is_fsynced_before_complete(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", FSYNC_ORDER, str(tmp_path / "ckpt"), "29871"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    events, path = result["events"], result["path"]
    complete = events.index(["replace", os.path.join(path, checkpoint.COMPLETE)])
    synced_before = {name for kind, name in events[:complete] if kind == "fsync"}
    files = {str(p) for p in Path(path).rglob("*") if p.is_file() and p.name != checkpoint.COMPLETE}
    assert files and files <= synced_before, f"written but not fsynced before COMPLETE: {files - synced_before}"
    assert path in synced_before, "the directory entries are fsynced too"
    assert ["fsync", path] in events[complete:], "COMPLETE's own directory entry is made durable"


@pytest.mark.launch_checks("ckpt_full", "ckpt_before_objective")
def test_a_checkpoint_from_before_the_objective_resumes(launch, full_run):
    """Engine checkpoints written before the engine wrapped the Self-KD objective name the
    model's parameters without "model.": they still resume, to the same losses."""
    ckpt = Path(launch.dir("ckpt_before_objective")) / "ckpt" / "step_00000002"
    resumed = launch.ok("ckpt_before_objective", "resumed")
    assert f"resumed from {ckpt} at step 2" in resumed.output
    for step in (3, 4):
        assert resumed.metrics[step]["train/loss"] == pytest.approx(full_run["metrics"][step]["train/loss"], rel=1e-5)
