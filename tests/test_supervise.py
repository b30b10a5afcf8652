"""trainer.supervise with a real child process: a stop signal that reaches the supervisor while
its rank is still starting (ignoring SIGUSR1, as ranks do until the trainer listens) is not
lost; the rank reads it when it starts listening. A run that was not asked to stop is not
stopped by another run's record in the same status directory."""

import os
import signal
import subprocess
import sys
import time

RANK = r"""
import os, sys, time
from trainer.preemption import StopRequest
assert __import__("signal").getsignal(__import__("signal").SIGUSR1) == __import__("signal").SIG_IGN
open(sys.argv[1], "w").close()                      # started, not listening yet
while not os.path.exists(sys.argv[2]):              # the test says when to start listening
    time.sleep(0.05)
request = StopRequest(poll_s=3600)
request.install()
print("REASON", request.reason, flush=True)
"""


def supervised_rank(work, status_dir, signal_first: bool) -> str:
    work.mkdir()
    started, listen = work / "started", work / "listen"
    env = {**os.environ, "TRAINER_STATUS_DIR": str(status_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.supervise", "--", sys.executable, "-c", RANK, str(started),
                             str(listen)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        if signal_first:
            proc.send_signal(signal.SIGUSR1)
            while not any(name.startswith("stop_requested-") for name in os.listdir(status_dir)):
                assert time.monotonic() < deadline, "the supervisor recorded no stop"
                time.sleep(0.05)
        listen.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return next(line for line in out.splitlines() if line.startswith("REASON")) + "\n" + err


def test_a_stop_before_the_rank_listens_is_not_lost(tmp_path):
    status_dir = tmp_path / "status"
    status_dir.mkdir()
    (status_dir / "stop_requested-otherhost-1").write_text("SIGTERM")  # another run's record: ignored
    assert supervised_rank(tmp_path / "quiet", status_dir, signal_first=False).startswith("REASON None")
    report = supervised_rank(tmp_path / "stopped", status_dir, signal_first=True)
    assert report.startswith("REASON SIGUSR1 received by the supervisor before this rank was listening"), report
    assert "[supervise] SIGUSR1 received" in report
