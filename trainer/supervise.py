"""Supervise one node's training launch: a stop signal anywhere becomes "finish the step,
save, exit 75", no rank outlives the launch, and the exit code says what really happened.

    python -m trainer.supervise -- deepspeed --num_gpus 8 trainer/main.py --config run.yaml
    python -m trainer.supervise --outcome logs/status-1234     # "CODE STEP RESUMED_STEP" of rank 0, or "none"
    (launch_scripts/train.sh and slurm_train.sbatch run every launch through it)

Why: the deepspeed launcher dies of SIGUSR1 (no handler) and leaves its ranks running; on
SIGTERM it kills them after 30 s; and when its per-node launcher is killed it exits 0. Here:
  - the launcher processes start with SIGUSR1 ignored, so the SIGUSR1 that SLURM sends to
    every process of the step reaches only the ranks (which stop after their step and save);
  - SIGUSR1 or SIGTERM sent to this process is passed on as SIGUSR1 to the ranks (the
    processes started by a launcher below it, or by it directly), and recorded in the status
    directory for ranks still starting, which ignore SIGUSR1 until they listen (a warning
    that comes during start-up is not lost);
  - this process is a child subreaper: ranks orphaned by a dead launcher are re-parented
    here, and it returns only once every process below it has exited; the ranks themselves
    stop when a launcher above them dies (trainer/preemption.py), and the launcher below
    this process gets SIGTERM if this process dies;
  - the exit code comes from the ranks' status files (TRAINER_STATUS_DIR, set here when
    unset): 75 when every rank stopped after a complete save, 0 only when every rank that
    started finished, otherwise the first failing rank's code (1 for a rank that was killed
    and never reported), or the launcher's own non-zero code.
"""

import argparse
import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile

import psutil

from trainer.preemption import (EXIT_CRASH, EXIT_STOPPED, STATUS_DIR_ENV, SUPERVISOR_ENV, is_launcher, read_statuses,
                                stop_file)

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def _start_launcher() -> None:
    """In the launcher's process, before exec: ignore SIGUSR1 (inherited through exec by the
    deepspeed runner and launcher; the ranks install their own handler) and get SIGTERM if
    the supervisor dies."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def ranks_below(root: psutil.Process) -> list:
    """The training processes below `root`: children of a launcher (or of root itself) that
    are not launchers themselves. Their data workers and helpers are left alone."""
    ranks = []
    for proc in root.children(recursive=True):
        try:
            parent = proc.parent()
            if parent is not None and (parent.pid == root.pid or is_launcher(parent)) and not is_launcher(proc):
                ranks.append(proc)
        except psutil.Error:
            pass
    return ranks


_status_dir = None  # the launch's TRAINER_STATUS_DIR, for _forward_stop


def _forward_stop(signum, frame) -> None:
    name = signal.Signals(signum).name
    # os.write, not print: a handler must not re-enter a buffered stream the main code may be using.
    os.write(2, f"[supervise] {name} received: asking every rank to stop after its step and save\n".encode())
    if _status_dir is not None:  # for ranks not listening yet (preemption.stop_file)
        try:
            os.makedirs(_status_dir, exist_ok=True)
            fd = os.open(stop_file(_status_dir, os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, name.encode())
            os.close(fd)
        except OSError as exc:
            os.write(2, f"[supervise] cannot record the stop in {_status_dir}: {exc}\n".encode())
    for proc in ranks_below(psutil.Process()):
        try:
            proc.send_signal(signal.SIGUSR1)
        except psutil.Error:
            pass


def outcome(records: list, launcher_code: int) -> tuple[int, str]:
    """(exit code, explanation) from the ranks' status records and the launcher's exit code."""
    if not records:
        return launcher_code, f"launcher exited {launcher_code}; no rank reported"
    unreported = [r for r in records if r["state"] != "exited"]
    codes = [r["exit_code"] for r in records if r["state"] == "exited"]
    if unreported:
        ranks = ", ".join(str(r["rank"]) for r in unreported)
        return (launcher_code if launcher_code not in (0, EXIT_STOPPED) else EXIT_CRASH,
                f"rank(s) {ranks} ended without reporting an exit code (killed)")
    if all(code == EXIT_STOPPED for code in codes):
        return EXIT_STOPPED, f"all {len(codes)} rank(s) stopped after saving a complete checkpoint"
    failed = [r for r in records if r["exit_code"] not in (0, EXIT_STOPPED)]
    if failed:
        return failed[0]["exit_code"], f"rank {failed[0]['rank']} exited {failed[0]['exit_code']}"
    if any(code == EXIT_STOPPED for code in codes):
        return EXIT_STOPPED, "some ranks finished, others stopped after saving"
    if launcher_code != 0:
        return launcher_code, f"every rank finished, but the launcher exited {launcher_code}"
    return 0, f"all {len(codes)} rank(s) finished"


def _reap_all(child: subprocess.Popen) -> int:
    """Wait for the launcher and then for every orphan re-parented here; the launcher's code."""
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid == child.pid:
            code = os.waitstatus_to_exitcode(status)
            child.returncode = code
    if code is None:
        code = child.wait()
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, as a shell reports it


def supervise(command: list) -> int:
    global _status_dir
    status_dir = _status_dir = os.environ.get(STATUS_DIR_ENV) or tempfile.mkdtemp(prefix="trainer-status-")
    env = {**os.environ, STATUS_DIR_ENV: status_dir, SUPERVISOR_ENV: str(os.getpid())}
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _forward_stop)
    try:
        child = subprocess.Popen(command, env=env, preexec_fn=_start_launcher)
    except OSError as exc:
        print(f"[supervise] cannot start {command[0]}: {exc}", file=sys.stderr, flush=True)
        return 127 if exc.errno == errno.ENOENT else 126
    launcher_code = _reap_all(child)
    host = socket.gethostname()
    mine = [r for r in read_statuses(status_dir) if r.get("supervisor") == os.getpid() and r.get("host") == host]
    code, why = outcome(mine, launcher_code)
    print(f"[supervise] exit {code}: {why}", file=sys.stderr, flush=True)
    return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outcome", metavar="STATUS_DIR",
                        help="print rank 0's exit code, step and resumed step from a status directory "
                             "(or 'none' when rank 0 did not report) and exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the launch command")
    args = parser.parse_args(argv)
    if args.outcome:
        rank0 = [r for r in read_statuses(args.outcome) if r["rank"] == 0 and r["state"] == "exited"]
        fields = (rank0[0]["exit_code"], rank0[0].get("step"), rank0[0].get("resumed_step")) if rank0 else None
        print(" ".join("-1" if v is None else str(v) for v in fields) if fields else "none")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the launch command after --")
    return supervise(command)


if __name__ == "__main__":
    sys.exit(main())
