"""A private single-node SLURM cluster for tests: munged, slurmctld and slurmd from Debian's
packages (slurm-wlm 22.05: `apt-get install slurmctld slurmd slurm-client munge`), each
started with its own key, socket, ports, state and log files under one temporary directory,
so nothing of the host's own SLURM or munge set-up is touched.

    with SlurmCluster(tmp_dir) as cluster:
        job_id = cluster.sbatch(["--time=2", "launch_scripts/slurm_train.sbatch", ...], env=...)
        info = cluster.wait(job_id, timeout_s=900)      # scontrol's fields of the finished job

The daemons run as the current user, which must be root (slurmd starts job steps as the
submitting user). `missing()` says what is absent, for a skip message.
"""

import os
import shutil
import socket
import subprocess
import time

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None)


def missing() -> str | None:
    """Why no private cluster can start here, or None."""
    absent = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if absent:
        return (f"SLURM tier skipped: {', '.join(absent)} not installed "
                "(as root: apt-get install slurmctld slurmd slurm-client munge; .ci/run does this)")
    if os.geteuid() != 0:
        return "SLURM tier skipped: slurmd must run as root to start job steps (CI runs .ci/run as root)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """This machine's NodeName line as slurmd detects it (CPUs, sockets, memory)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("NodeName="))
    return line + " NodeAddr=127.0.0.1 State=UNKNOWN"


class SlurmCluster:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.conf = os.path.join(self.root, "slurm.conf")
        self.socket = os.path.join(self.root, "munge.sock")
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": self.conf}
        for name in list(self.env):
            if name.startswith("SLURM_") and name != "SLURM_CONF":
                del self.env[name]  # an outer allocation's variables must not leak into the private one

    # --- lifecycle ------------------------------------------------------------------------
    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self) -> None:
        for sub in ("state", "spool", "munge"):
            os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
        key = os.path.join(self.root, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn([_which("munged"), "--foreground", "--force", f"--socket={self.socket}", f"--key-file={key}",
                     f"--pid-file={self.root}/munge/munged.pid", f"--log-file={self.root}/munge/munged.log",
                     f"--seed-file={self.root}/munge/munged.seed"], "munged")
        self._wait_for(lambda: os.path.exists(self.socket), "munged socket", 30)
        self._write_conf()
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", self.conf], "slurmctld")
        self._wait_for(lambda: self._scontrol("ping").returncode == 0, "slurmctld", 60)
        self._spawn([_which("slurmd"), "-D", "-f", self.conf], "slurmd")
        self._wait_for(self._node_idle, "slurmd to register its node", 90)

    def stop(self) -> None:
        if self.procs and os.path.exists(self.conf):
            # Cancel what is left, so no job step outlives the test.
            subprocess.run([_which("scancel"), "--full", "--user", str(os.geteuid())] if _which("scancel") else ["true"],
                           env=self.env, capture_output=True, timeout=30)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []

    def _spawn(self, cmd: list, name: str) -> None:
        log = open(os.path.join(self.root, f"{name}.out"), "w")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _write_conf(self) -> None:
        r = self.root
        lines = [
            "ClusterName=omnitest",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={self.socket},cred_expire=10",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=5",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=30",
            "MinJobAge=3600",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            _node_line(),
            "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _wait_for(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a SLURM daemon exited ({dead[0].args[0]}, code {dead[0].returncode}) while "
                                   f"waiting for {what}; logs in {self.root}")
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"waiting for {what} for {timeout_s}s; logs in {self.root}")

    def _scontrol(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([_which("scontrol"), *args], env=self.env, capture_output=True, text=True, timeout=30)

    def _node_idle(self) -> bool:
        out = self._scontrol("show", "nodes").stdout
        return "State=IDLE" in out

    # --- jobs -----------------------------------------------------------------------------
    def sbatch(self, args: list, env: dict | None = None, cwd: str | None = None) -> int:
        full_env = {**self.env, **(env or {})}
        out = subprocess.run([_which("sbatch"), "--parsable", *args], env=full_env, cwd=cwd, capture_output=True,
                             text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """scontrol's Key=Value fields of the job (empty once it is forgotten)."""
        out = self._scontrol("show", "job", "-o", str(job_id))
        fields = {}
        for token in out.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def update(self, job_id: int, **fields) -> None:
        """`scontrol update JobId=... Key=Value...` (as the cluster's admin: root)."""
        out = self._scontrol("update", f"JobId={job_id}", *(f"{key}={value}" for key, value in fields.items()))
        if out.returncode != 0:
            raise RuntimeError(f"scontrol update of job {job_id} failed: {out.stderr}")

    def wait(self, job_id: int, timeout_s: float, poll_s: float = 2.0) -> dict:
        """Poll until the job is finished (not requeued, not pending); returns its fields."""
        deadline = time.monotonic() + timeout_s
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in FINISHED:
                return info
            time.sleep(poll_s)
        raise TimeoutError(f"job {job_id} not finished after {timeout_s}s: {info}; logs in {self.root}")
