"""Resume on another number of ranks (trainer/resize.py), on real ZeRO-3 runs on the CPU.

One check of the shared launch: a 2-rank run of 8 steps (EMA teacher, no data workers, saving at
steps 3 and 6); rank 0 resumes its step-3 checkpoint on 1 rank to step 8 (a subprocess launch,
--grad_accum 1 -> 2); both ranks build a trainer from that 1-rank checkpoint and compare what it
loaded with what was saved; then 2 ranks resume the 1-rank step-6 checkpoint to step 8.
"""

import dataclasses
import glob
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from tests.shared_launch import BASE, Check, call, main
from trainer import checkpoint, resize
from trainer.config import ConfigError, load_config
from trainer.distill.teachers import reshard_flat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ("--num_workers", "0", "--teacher", "ema", "--ema_decay", "0.9", "--save_every", "3")

CHECKS = [
    Check("resize", [
        main("full", *RUN, "--max_steps", "8", "--save_dir", "{dir}/ckpt_full"),
        call("tests.test_resize:shrink", "{dir}/ckpt_full/step_00000003", "{dir}", "{train_shards}", rank0_only=True),
        call("tests.test_resize:check_loaded", "{dir}/ckpt_shrunk/step_00000006", "{dir}/ckpt_check",
             "{train_shards}"),
        call("tests.test_train_zero3:copy_checkpoint", "{dir}/ckpt_shrunk/step_00000006", "{dir}/ckpt_grown",
             rank0_only=True),
        main("grown", *RUN, "--max_steps", "8", "--save_dir", "{dir}/ckpt_grown", "--resume", "auto")]),
]


def _flags(train_shards: str, *extra: str) -> list:
    return [arg.replace("{train_shards}", train_shards) for arg in BASE] + list(RUN) + list(extra)


def shrink(args: list) -> None:
    """[checkpoint, check dir, shards]: the 2-rank checkpoint resumed on 1 rank to step 8, saving
    at 6 (rank 0 launches it; the other rank waits for the check's next step)."""
    source, check_dir, shards = args
    into = os.path.join(check_dir, "ckpt_shrunk")
    shutil.copytree(source, os.path.join(into, os.path.basename(source)))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "CROSS_RANK", "CROSS_SIZE")}
    with socket.socket() as s:  # a port the OS has free now
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", port,
           os.path.join(ROOT, "trainer", "main.py"), *_flags(shards, "--max_steps", "8", "--save_dir", into,
                                                            "--resume", "auto", "--log_dir",
                                                            os.path.join(check_dir, "shrunk", "tb"))]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    with open(os.path.join(check_dir, "shrunk.log"), "w") as f:
        f.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"the 1-rank resume exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")


def check_loaded(args: list) -> None:
    """[1-rank checkpoint, save dir, shards]: a 2-rank trainer resumed from it holds exactly the
    saved weights (trained and frozen) and EMA teacher: each parameter gathered over the ranks,
    each teacher partition concatenated over the ranks, compared with the 1-rank files."""
    import deepspeed

    from trainer.loop import Trainer

    path, save_dir, shards = args
    trainer = Trainer(load_config(_flags(shards, "--max_steps", "6", "--save_dir", save_dir, "--resume", path)))
    try:
        assert trainer.resized and trainer.config.optim.grad_accum == 1, "1 rank x 2 -> 2 ranks x 1"
        saved = torch.load(os.path.join(path, "trainer_state_rank0.pt"), weights_only=True)
        assert trainer.step == saved["step"] == 6
        world = torch.distributed.get_world_size()
        for mine, whole in zip(trainer.objective.teacher.copies, saved["teacher"]["copies"], strict=True):
            parts = [torch.empty_like(mine) for _ in range(world)]
            torch.distributed.all_gather(parts, mine)
            assert torch.equal(torch.cat(parts)[:whole.numel()], whole), "EMA teacher resharded bit for bit"
        model_states = torch.load(os.path.join(path, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                                  weights_only=False)
        frozen = model_states["frozen_param_fragments"]
        compared = {"trained": 0, "frozen": 0}
        for name, param in trainer.objective.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                value = param.detach().reshape(-1).clone()
            if param.requires_grad:
                expected = torch.load(os.path.join(path, "universal", "zero", name, "fp32.pt"),
                                      weights_only=True).detach().reshape(-1)
                compared["trained"] += 1
            else:
                expected = frozen[name].reshape(-1)[:value.numel()]
                compared["frozen"] += 1
            assert torch.equal(value, expected.to(value.dtype)), name
        assert compared["trained"] and compared["frozen"], compared
    finally:
        trainer.close()


def _metrics(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "tb", "metrics.jsonl")) as f:
        return {record["step"]: record for record in map(json.loads, f)}


KEYS = ("train/loss", "train/ce_loss", "train/kd_loss", "train/grad_norm", "train/lr")


@pytest.mark.slow
@pytest.mark.launch_checks("resize")
def test_resize_two_ranks_to_one_and_back(launch):
    """2 ranks -> 1 (--grad_accum 1 -> 2, the global batch kept) at step 3, and that run's step-6
    checkpoint back on 2 ranks (--grad_accum 2 -> 1). With no data workers the steps after a
    resize see the saved run's micro-batches until the epoch ends, so their loss (EMA teacher's
    KD term included), gradient norm and LR equal the uninterrupted run's up to the order of the
    gradient reduction (rel 1e-5); the loaded weights and teacher are the saved ones bit for bit
    (check_loaded)."""
    full = launch.ok("resize", "full").metrics
    shrunk_log = open(os.path.join(launch.dir("resize"), "shrunk.log")).read()
    assert "--grad_accum 1 -> 2 keeps the global batch of 8 samples" in shrunk_log
    assert "written by 2 ranks) on 1" in shrunk_log
    shrunk = _metrics(os.path.join(launch.dir("resize"), "shrunk"))
    grown = launch.ok("resize", "grown")
    assert "written by 1 ranks) on 2" in grown.output
    assert sorted(shrunk) == [4, 5, 6, 7, 8] and sorted(grown.metrics) == [7, 8]
    # Steps 4-6 finish epoch 0 (48 samples): the two saved readers' rest, in the saved micro-batches.
    # From step 7 the shrunk run reads epoch 1 in its own (1-rank) split: other micro-batches than
    # the 2-rank run's, so only close to it; the grown run shares that 1-rank reader between its two
    # ranks, so it equals the shrunk run.
    for step in (4, 5, 6):
        for key in KEYS:
            assert shrunk[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-6), (step, key)
    for step in (7, 8):
        for key in KEYS:
            assert grown.metrics[step][key] == pytest.approx(shrunk[step][key], rel=1e-5, abs=1e-6), (step, key)
        assert shrunk[step]["train/lr"] == pytest.approx(full[step]["train/lr"], rel=1e-6)
        assert shrunk[step]["train/loss"] == pytest.approx(full[step]["train/loss"], rel=0.05)
    for step, record in [*shrunk.items(), *grown.metrics.items()]:
        assert record["progress/samples_seen"] == full[step]["progress/samples_seen"] == 8 * step


@pytest.mark.slow
@pytest.mark.launch_checks("resize")
def test_a_corrupt_or_partial_conversion_is_never_loaded(launch, tmp_path):
    """The universal folder is written to universal.tmp and renamed after its manifest: a leftover
    .tmp, a missing manifest, an altered file or a conversion of another version of the
    checkpoint is converted again, never loaded; a checkpoint that is not ZeRO-3 is refused."""
    source = os.path.join(launch.dir("resize"), "ckpt_full", "step_00000006")
    path = str(tmp_path / "step_00000006")
    shutil.copytree(source, path, ignore=shutil.ignore_patterns("universal*"))
    assert "no COMPLETE" in resize.universal_problem(path)
    os.makedirs(os.path.join(path, "universal.tmp", "zero"))  # a crash in the middle of a conversion
    assert resize.universal_problem(path) is not None
    folder = resize.convert(path)
    assert resize.universal_problem(path) is None and not os.path.exists(folder + ".tmp")
    fp32 = sorted(glob.glob(os.path.join(folder, "zero", "*", "fp32.pt")))[0]
    with open(fp32, "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\xff" * 8)
    assert "CRC-32" in resize.universal_problem(path)
    resize.convert(path)
    assert resize.universal_problem(path) is None
    with open(os.path.join(path, checkpoint.COMPLETE), "a") as f:  # the checkpoint itself rewritten
        f.write(" ")
    assert "another version" in resize.universal_problem(path)


def _config(tmp_path, saved: dict, world: int, *flags: str):
    path = tmp_path / f"ckpt{len(list(tmp_path.iterdir()))}"
    path.mkdir()
    (path / "run_config.json").write_text(json.dumps(saved))
    c = load_config(["--model", "tiny", "--train_shards", "x.tar", *flags])
    return resize.plan_batch(c, str(path), saved.pop("world"), world)


def test_plan_batch_keeps_the_global_batch_or_refuses_naming_the_numbers(tmp_path):
    saved = {"micro_batch_size": 4, "grad_accum": 2, "max_tokens_per_micro_batch": 0}
    assert _config(tmp_path, {**saved, "world": 4}, 2, "--micro_batch_size", "4").optim.grad_accum == 4
    assert _config(tmp_path, {**saved, "world": 2}, 4, "--micro_batch_size", "4", "--grad_accum", "2"
                   ).optim.grad_accum == 1
    assert _config(tmp_path, {**saved, "world": 4}, 2, "--micro_batch_size", "8").optim.grad_accum == 2
    with pytest.raises(ConfigError, match=r"2 ranks x 4 x --grad_accum 2 = 16 samples .* on 3 ranks x 4"):
        _config(tmp_path, {**saved, "world": 2}, 3, "--micro_batch_size", "4")
    kept = _config(tmp_path, {**saved, "world": 2}, 3, "--micro_batch_size", "4", "--grad_accum", "2",
                   "--allow_batch_change", "true")
    assert kept.optim.grad_accum == 2
    budget = {"micro_batch_size": 1, "grad_accum": 3, "max_tokens_per_micro_batch": 600}
    assert _config(tmp_path, {**budget, "world": 2}, 1, "--max_tokens_per_micro_batch", "600", "--max_seq_len",
                   "300").optim.grad_accum == 6
    with pytest.raises(ConfigError, match="max_tokens_per_micro_batch"):
        _config(tmp_path, {**budget, "world": 2}, 1, "--micro_batch_size", "2")


def test_reshard_flat_cuts_deepspeeds_partitions():
    """Partitions of n = ceil(numel / ranks) elements, zero-padded at the end (DeepSpeed's
    layout), re-cut for another number of ranks, against a direct slice of the whole tensor."""
    whole = torch.arange(1, 12, dtype=torch.float32)  # 11 elements

    def partitions(ranks):
        n = -(-whole.numel() // ranks)
        padded = torch.cat([whole, torch.zeros(n * ranks - whole.numel())])
        return [padded[r * n:(r + 1) * n] for r in range(ranks)]

    for old in (1, 2, 3, 4):
        for new in (1, 2, 3, 5):
            expected = partitions(new)
            for rank in range(new):
                got = reshard_flat(partitions(old), whole.numel(), expected[rank], rank)
                assert torch.equal(got, expected[rank]), (old, new, rank)
    with pytest.raises(ValueError, match="hold 6 elements, the parameter 11"):
        reshard_flat(partitions(2)[:1], whole.numel(), partitions(1)[0], 0)


def test_reshard_teacher_state_by_kind():
    """A shared teacher has nothing to cut; full copies (no ZeRO-3) are rank 0's; another kind's
    state is refused, naming both kinds."""
    from trainer.distill.teachers import EMATeacher, SharedTeacher, reshard_state

    shared = SharedTeacher()
    assert reshard_state([shared.state_dict(), shared.state_dict()], shared, 0) == {"kind": "shared"}
    model = torch.nn.Linear(3, 2)
    ema = EMATeacher(model, decay=0.9)
    saved = [ema.state_dict(), {"kind": "ema", "copies": [c + 1 for c in ema.copies]}]
    got = reshard_state(saved, ema, 1)
    assert all(torch.equal(a, b) for a, b in zip(got["copies"], saved[0]["copies"], strict=True))
    with pytest.raises(ValueError, match="kind 'shared' but this run's teacher is 'ema'"):
        reshard_state([shared.state_dict()], ema, 0)


def test_waiting_ranks_give_up_when_rank_0_stops_converting(tmp_path):
    """The other ranks wait for rank 0's conversion on the file system, kicking their hang watchdog
    only while rank 0's heartbeat is fresh: a finished or failed conversion ends the wait, a
    heartbeat gone stale (rank 0 killed mid-conversion) raises instead of waiting forever."""
    import threading
    import time

    path = str(tmp_path)
    heartbeat = os.path.join(path, "universal.heartbeat")
    open(heartbeat, "w").close()
    kicks = []

    def finish():
        time.sleep(0.3)
        os.makedirs(os.path.join(path, "universal"))
        open(os.path.join(path, "universal", checkpoint.COMPLETE), "w").close()

    threading.Thread(target=finish).start()
    resize.wait_for_conversion(path, kick=lambda: kicks.append(1), poll_s=0.05)
    assert kicks, "the watchdog is kicked while rank 0's heartbeat is fresh"
    os.remove(os.path.join(path, "universal", checkpoint.COMPLETE))
    open(os.path.join(path, "universal.failed"), "w").close()
    resize.wait_for_conversion(path, poll_s=0.05)  # a failure marker ends the wait too
    os.remove(os.path.join(path, "universal.failed"))
    old = time.time() - 1000
    os.utime(heartbeat, (old, old))
    kicks.clear()
    with pytest.raises(checkpoint.CheckpointError, match="rank 0 stopped converting"):
        resize.wait_for_conversion(path, kick=lambda: kicks.append(1), poll_s=0.05)
    assert not kicks
