"""Stop signals and dead launchers on real 2-rank ZeRO-3 runs (CPU, gloo): SIGUSR1 to one rank
and SIGTERM to the deepspeed launcher each stop every rank after the same step with one
complete checkpoint and exit 75, and `--resume auto` then reproduces the uninterrupted run's
losses; SIGTERM to a rank under the plain `deepspeed` command does the same; a launcher or
supervisor killed with SIGKILL leaves no rank running. Each signalled run is a launch of its
own (its process tree is what is tested); the uninterrupted reference is a check of the
session's shared launch (tests/shared_launch.py), the same trainer/main.py command line."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from tests.shared_launch import Check, main
from trainer.preemption import EXIT_STOPPED
from trainer.supervise import ranks_below

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
MAX_STEPS = 20  # a signal sent at step 2 stops the run well before: the launcher watch polls every 2 s


def free_port() -> int:
    """A port the OS has free now. Not a fixed range: --dist loadgroup spreads this module's tests
    over the workers, each with its own copy of a module-level counter, so two could take the same
    port at once (seen: EADDRINUSE on 29743 in a clean-clone run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

CHECKS = [Check("preemption_reference", [main("run", "--max_steps", str(MAX_STEPS), "--save_every", "1000",
                                              "--save_dir", "{dir}/run/ckpt")])]


@pytest.fixture(scope="module")
def shards(demo_shards):
    return demo_shards


def command(shards, run_dir, *extra, supervised=True):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "trainer/main.py", "--ds_config", "ds_configs/zero3.json", "--model", "tiny",
           "--train_shards", shards["train_shards"], "--micro_batch_size", "4", "--num_workers", "2",
           "--max_seq_len", "512", "--lr", "3e-3", "--warmup_steps", "2", "--max_steps", str(MAX_STEPS),
           "--save_every", "1000", "--save_dir", str(run_dir / "ckpt"), "--log_dir", str(run_dir / "tb"), *extra]
    return [sys.executable, "-m", "trainer.supervise", "--", *cmd] if supervised else cmd


class Run:
    """A training launch in its own session, its output in run_dir/out.log."""

    def __init__(self, cmd, run_dir, log_dir=None):
        run_dir.mkdir(exist_ok=True)
        self.run_dir = run_dir
        self.log_dir = log_dir or run_dir / "tb"  # the --log_dir the command writes metrics.jsonl to
        self.log = open(run_dir / "out.log", "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.tree = psutil.Process(self.proc.pid)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.run_dir / "out.log").read_text(errors="replace")

    def steps(self) -> dict:
        path = self.log_dir / "metrics.jsonl"
        if not path.exists():
            return {}
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {r["step"]: r for r in records if "train/loss" in r}

    def wait_for_step(self, step: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while max(self.steps(), default=0) < step:
            assert self.proc.poll() is None, f"run ended early:\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"no step {step} after {timeout_s}s:\n{self.output()[-4000:]}"
            time.sleep(0.1)

    def ranks(self) -> list:
        launchers = [p for p in self.tree.children(recursive=True) if "deepspeed.launcher.launch" in " ".join(p.cmdline())]
        return ranks_below(launchers[0]) if launchers else []

    def launcher(self) -> psutil.Process:
        return next(p for p in self.tree.children(recursive=True) if "deepspeed.launcher.launch" in " ".join(p.cmdline()))

    def wait(self, timeout_s: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        finally:
            self.kill()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()


@pytest.fixture(scope="module")
def reference(launch):
    """The uninterrupted run's metrics by step (a test using it names "preemption_reference")."""
    steps = {step: m for step, m in launch.ok("preemption_reference").metrics.items() if "train/loss" in m}
    assert sorted(steps) == list(range(1, MAX_STEPS + 1))
    return steps


def stopped_step(run: Run) -> int:
    out = run.output()
    line = next((line for line in out.splitlines() if line.startswith("stopped at step")), None)
    assert line is not None, out[-4000:]
    step = int(line.split()[3])
    assert f"step_{step:08d} is complete" in line
    return step


def assert_resume_matches(shards, run_dir, stopped_at, reference):
    resumed = Run(command(shards, run_dir, "--resume", "auto"), run_dir / "resumed", log_dir=run_dir / "tb")
    code = resumed.wait(600)
    out = resumed.output()
    assert code == 0, out[-4000:]
    assert f"resumed from {run_dir / 'ckpt' / f'step_{stopped_at:08d}'} at step {stopped_at}" in out
    steps = resumed.steps()
    assert min(s for s in steps if s > stopped_at) == stopped_at + 1 and max(steps) == MAX_STEPS
    for step in range(stopped_at + 1, MAX_STEPS + 1):
        for key in ("train/loss", "train/ce_loss", "train/kd_loss", "train/agreement"):
            assert steps[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)


@pytest.mark.launch_checks("preemption_reference")
def test_sigusr1_to_one_rank_stops_every_rank_and_resumes_exactly(shards, tmp_path, reference):
    run = Run(command(shards, tmp_path), tmp_path)
    run.wait_for_step(2)
    run.ranks()[1].send_signal(signal.SIGUSR1)
    code = run.wait()
    assert code == EXIT_STOPPED, run.output()[-4000:]
    stopped_at = stopped_step(run)
    assert stopped_at < MAX_STEPS and "SIGUSR1 received" in run.output()
    assert "[supervise] exit 75: all 2 rank(s) stopped after saving a complete checkpoint" in run.output()
    assert_resume_matches(shards, tmp_path, stopped_at, reference)


@pytest.mark.launch_checks("preemption_reference")
def test_sigterm_to_the_deepspeed_launcher_stops_saves_and_resumes_exactly(shards, tmp_path, reference):
    """The launcher answers SIGTERM by sending SIGTERM to its ranks and their data workers:
    the ranks finish the step and save; the workers stay until their rank lets them go."""
    run = Run(command(shards, tmp_path), tmp_path)
    run.wait_for_step(2)
    run.launcher().send_signal(signal.SIGTERM)
    code = run.wait()
    assert code == EXIT_STOPPED, run.output()[-4000:]
    stopped_at = stopped_step(run)
    assert "SIGTERM received" in run.output()
    assert_resume_matches(shards, tmp_path, stopped_at, reference)


def test_sigterm_to_a_rank_under_plain_deepspeed(shards, tmp_path):
    run = Run(command(shards, tmp_path, supervised=False), tmp_path)
    run.wait_for_step(2)
    ranks = [p for p in run.launcher().children() if "trainer/main.py" in " ".join(p.cmdline())]
    ranks[0].send_signal(signal.SIGTERM)
    code = run.wait()
    assert code == EXIT_STOPPED, run.output()[-4000:]
    stopped_step(run)


def wait_gone(procs: list, timeout_s: float) -> list:
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    return alive


def test_ranks_never_outlive_a_killed_launcher(shards, tmp_path):
    """SIGKILL to the deepspeed launcher: plain `deepspeed` reports success (its own bug), but
    the ranks see their launcher die, save and exit; under the supervisor the run reports 75."""
    plain = Run(command(shards, tmp_path / "plain", supervised=False), tmp_path / "plain")
    plain.wait_for_step(2)
    ranks = [p for p in plain.launcher().children() if "trainer/main.py" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    plain.launcher().kill()
    assert wait_gone(ranks, 120) == [], "ranks still running after their launcher was killed"
    plain.wait()
    stopped_step(plain)

    supervised = Run(command(shards, tmp_path / "supervised"), tmp_path / "supervised")
    supervised.wait_for_step(2)
    ranks = supervised.ranks()
    supervised.launcher().kill()
    code = supervised.wait(180)
    assert wait_gone(ranks, 5) == []
    assert code == EXIT_STOPPED, supervised.output()[-4000:]
    assert "launcher python" in supervised.output() and "exited: stopping after the current step" in supervised.output()


def test_ranks_never_outlive_a_killed_supervisor(shards, tmp_path):
    run = Run(command(shards, tmp_path), tmp_path)
    run.wait_for_step(2)
    everything = run.tree.children(recursive=True)
    ranks = run.ranks()
    run.tree.kill()  # SIGKILL: no handler runs in the supervisor
    assert wait_gone(ranks, 120) == [], "ranks still running after the supervisor was killed"
    assert wait_gone(everything, 60) == [], "launcher processes or data workers still running"
    run.kill()
    stopped_step(run)
