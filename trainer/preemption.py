"""Stopping a run without losing work: stop signals, launcher death, exit codes, status files.

A rank turns SIGUSR1 and SIGTERM into a stop request; so does the death of its launcher
(the deepspeed launcher or runner, torchrun, or trainer.supervise above it). The training
loop agrees on the request at the end of every step (one flag in the step's existing
reduction), so every rank finishes the same step, saves one COMPLETE checkpoint together
and exits with EXIT_STOPPED. SIGUSR2 dumps every thread's stack and changes nothing.

Exit codes of trainer/main.py (and of the launch scripts, which pass them on):
  0   finished --max_steps
  1   crashed: an exception (traceback above it) or a hang caught by the watchdog
  2   configuration error
  3   diverged: --max_nonfinite_steps non-finite steps in a row (nothing saved after the first)
  4   data: more than --max_bad_fraction of the samples broken
  75  stopped on request after saving a complete checkpoint: run again with --resume auto
      (launch_scripts/slurm_train.sbatch requeues the job itself)
  76  stopped on request with nothing saved (no --save_dir, or the last step was non-finite)

Status files: when TRAINER_STATUS_DIR is set (trainer.supervise sets it), every rank writes
`rank{R}.json` there: "running" at start, then its exit code, step and checkpoint; the
supervisor records there a stop signal it received (`stop_file`). A rank
that was killed leaves "running" behind, which is how the launch scripts tell a killed run
from a finished one even when the deepspeed launcher itself reports success.
"""

import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time

import psutil

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_BAD_DATA = 4
EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: try again
EXIT_STOPPED_UNSAVED = 76
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STACKS_SIGNAL = signal.SIGUSR2
STATUS_DIR_ENV = "TRAINER_STATUS_DIR"
SUPERVISOR_ENV = "TRAINER_SUPERVISOR_PID"

# Command-line fragments of the processes that launch ranks: their death ends the run.
LAUNCHER_MARKERS = ("deepspeed.launcher", "bin/deepspeed", "torch.distributed.run", "bin/torchrun", "trainer.supervise")


def is_launcher(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(marker in cmdline for marker in LAUNCHER_MARKERS)


def launcher_ancestors(pid: int | None = None) -> list:
    """The launcher processes above `pid` (default: this process), nearest first. The direct
    parent counts when it is a launcher; under trainer.supervise, every process up to it."""
    supervisor = int(os.environ.get(SUPERVISOR_ENV, "0") or 0)
    found = []
    proc = psutil.Process(pid)
    for _ in range(8):
        try:
            proc = proc.parent()
        except psutil.Error:
            break
        if proc is None or proc.pid <= 1:
            break
        if proc.pid == supervisor or is_launcher(proc):
            found.append(proc)
        if proc.pid == supervisor:
            break
    return found


class StopRequest:
    """Why this rank was asked to stop (None while it was not). `install` hooks the signals
    and starts a thread that watches the launchers above this process."""

    def __init__(self, poll_s: float = 2.0):
        self.reason: str | None = None
        self._announced = False
        self.poll_s = poll_s
        self._watch: threading.Thread | None = None

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        """Record the first reason. Safe in a signal handler: it only assigns (printing there
        could re-enter a stream the interrupted code was writing to)."""
        if self.reason is None:
            self.reason = reason

    def announce(self) -> None:
        """Say once, outside any signal handler, that this rank was asked to stop."""
        if self.reason is not None and not self._announced:
            self._announced = True
            rank = os.environ.get("RANK", "0")
            print(f"[rank {rank}] {self.reason}: stopping after the current step (checkpoint, then exit)",
                  file=sys.stderr, flush=True)

    def _on_signal(self, signum, frame) -> None:
        self.request(f"{signal.Signals(signum).name} received")

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        faulthandler.register(STACKS_SIGNAL, all_threads=True)
        directory, supervisor = os.environ.get(STATUS_DIR_ENV), int(os.environ.get(SUPERVISOR_ENV, "0") or 0)
        if directory and supervisor and os.path.exists(stop_file(directory, supervisor)):
            with open(stop_file(directory, supervisor)) as f:
                self.request(f"{f.read().strip() or 'a stop signal'} received by the supervisor before this rank "
                             "was listening")
        launchers = launcher_ancestors()
        if launchers:
            self._watch = threading.Thread(target=self._watch_launchers, args=(launchers,), daemon=True,
                                           name="launcher-watch")
            self._watch.start()

    def _watch_launchers(self, launchers: list) -> None:
        parent = os.getppid()
        names = {p.pid: p.name() for p in launchers}  # a dead process has no name to ask for
        while self.reason is None:
            gone = [p.pid for p in launchers if not p.is_running()]  # is_running also catches a reused pid
            if gone or os.getppid() != parent:
                what = f"launcher {names[gone[0]]} (pid {gone[0]})" if gone else f"parent process (pid {parent})"
                self.request(f"{what} exited")
                return
            time.sleep(self.poll_s)


def finished() -> None:
    """Ignore SIGUSR1 from here on: the run is over, there is no step to finish and save. A
    late warning (SLURM's --signal, or one the supervisor forwards) would otherwise kill the
    rank during its teardown: Python's finalization resets handled signals to SIG_DFL, whose
    action for SIGUSR1 is to terminate. SIGTERM keeps its meaning."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def stop_file(directory: str, supervisor_pid: int) -> str:
    """Where trainer.supervise records the stop signal it received, for the ranks below it on
    this host (a directory reused by another run holds other supervisors' files). A rank still
    importing when the signal came ignores SIGUSR1 (the launcher's disposition, inherited) and
    reads this file when it starts listening, so a warning during start-up is not lost."""
    return os.path.join(directory, f"stop_requested-{socket.gethostname()}-{supervisor_pid}")


def write_status(state: str, **fields) -> None:
    """This rank's status file (atomically replaced), when TRAINER_STATUS_DIR is set."""
    directory = os.environ.get(STATUS_DIR_ENV)
    if not directory:
        return
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "state": state, "pid": os.getpid(), "host": socket.gethostname(),
              "supervisor": int(os.environ.get(SUPERVISOR_ENV, "0") or 0), "time": time.time(), **fields}
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def read_statuses(directory: str) -> list:
    """Every rank's status record in `directory`, by rank."""
    records = []
    if os.path.isdir(directory):
        for name in sorted(os.listdir(directory)):
            if name.startswith("rank") and name.endswith(".json"):
                with open(os.path.join(directory, name)) as f:
                    records.append(json.load(f))
    return sorted(records, key=lambda r: r["rank"])
