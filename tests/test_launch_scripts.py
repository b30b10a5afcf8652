"""DRY_RUN output of the launch scripts for a made-up 4-node SLURM allocation, the requeued
start's --resume auto, and the launch scripts finding the project's environment."""

import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config", "launch_scripts/recipes/selfkd_qwen2vl7b.yaml", "--train_shards", "/data/a b/{000..009}.tar", "--lr", "1e-5"]


def run(script, env, *args):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env.update(env, DRY_RUN="1")
    out = subprocess.run(["bash", script, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, check=True)
    return out.stdout


def parse_launch(command):
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "trainer.supervise", "--"], "every launch runs under the supervisor"
    argv = argv[4:]
    assert argv[0] == "deepspeed"
    main = argv.index("trainer/main.py")
    launcher = argv[1:main]
    opts = {launcher[i]: launcher[i + 1] for i in range(len(launcher)) if launcher[i].startswith("--") and i + 1 < len(launcher) and not launcher[i + 1].startswith("--")}
    return launcher, opts, argv[main + 1 :]


def test_slurm_dry_run_4_nodes(tmp_path):
    env = {"SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu-[007-009,012]", "SLURM_JOB_ID": "4242",
           "SLURM_GPUS_ON_NODE": "8", "HOSTFILE": str(tmp_path / "hostfile")}
    out = run("launch_scripts/slurm_train.sbatch", env, *ARGS)
    lines = [line for line in out.splitlines() if line.startswith("node ")]
    assert len(lines) == 4
    masters, ranks = set(), []
    for i, line in enumerate(lines):
        label, command = line.split(": ", 1)
        assert label == f"node {i}"
        launcher, opts, trainer_args = parse_launch(command)
        assert "--no_ssh" in launcher
        ranks.append(int(opts["--node_rank"]))
        masters.add((opts["--master_addr"], opts["--master_port"]))
        assert opts["--num_nodes"] == "4" and opts["--num_gpus"] == "8"
        assert trainer_args == ARGS, "the recipe's own ds_config must not be overridden"
    assert ranks == [0, 1, 2, 3]
    assert masters == {("gpu-007", str(29500 + 4242 % 1000))}
    hosts = (tmp_path / "hostfile").read_text().split("\n")
    assert hosts[:4] == ["gpu-007 slots=8", "gpu-008 slots=8", "gpu-009 slots=8", "gpu-012 slots=8"]


def test_a_requeued_slurm_job_resumes_on_the_nodes_it_got(tmp_path):
    """A job submitted with a node range (--nodes=3-4), first started on 4 nodes, requeued onto 3:
    the start launches 3 nodes from the allocation and resumes (the trainer reshards a checkpoint
    of another world size: tests/test_resize.py)."""
    env = {"SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "gpu-[007-008,012]", "SLURM_JOB_ID": "4244",
           "SLURM_RESTART_COUNT": "2", "SLURM_GPUS_ON_NODE": "8", "HOSTFILE": str(tmp_path / "hostfile")}
    lines = [line for line in run("launch_scripts/slurm_train.sbatch", env, *ARGS).splitlines()
             if line.startswith("node ")]
    assert len(lines) == 3
    for line in lines:
        _, opts, trainer_args = parse_launch(line.split(": ", 1)[1])
        assert opts["--num_nodes"] == "3" and opts["--master_addr"] == "gpu-007"
        assert trainer_args == [*ARGS, "--resume", "auto"], "the last --resume wins: a requeued start continues"
    assert (tmp_path / "hostfile").read_text().split() == ["gpu-007", "slots=8", "gpu-008", "slots=8", "gpu-012",
                                                          "slots=8"]


def test_launch_scripts_use_the_project_environment(tmp_path):
    """Submitted from a shell without the environment activated, the scripts find .venv
    themselves (and give it its own torch extension cache); without any environment they say
    how to make one."""
    bare_path = "/usr/bin:/bin"
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "deepspeed").write_text("#!/bin/sh\necho fake-deepspeed \"$@\"\necho extensions=$TORCH_EXTENSIONS_DIR\n")
    (venv / "bin" / "deepspeed").chmod(0o755)
    real_venv = os.path.dirname(os.path.dirname(sys.executable))  # the test's own environment, for python
    (venv / "bin" / "activate").write_text(f'source "{real_venv}/bin/activate"\nexport PATH="{venv}/bin:$PATH"\n'
                                          f'export VIRTUAL_ENV="{venv}"\n')
    env = {"PATH": bare_path, "HOME": str(tmp_path), "VENV": str(venv), "NUM_GPUS": "1"}
    out = subprocess.run(["bash", "launch_scripts/train.sh", "--max_steps", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert "fake-deepspeed --num_nodes 1 --num_gpus 1" in out.stdout, out.stdout + out.stderr
    # DeepSpeed's JIT-built ops go to this environment's own cache, not one shared by every environment.
    assert f"extensions={venv}/torch_extensions\n" in out.stdout, out.stdout
    out = subprocess.run(["bash", "launch_scripts/train.sh", "--max_steps", "1"], cwd=ROOT, capture_output=True,
                         text=True, env={**env, "TORCH_EXTENSIONS_DIR": str(tmp_path / "mine")})
    assert f"extensions={tmp_path}/mine\n" in out.stdout, "a cache the user set is kept"
    out = subprocess.run(["bash", "launch_scripts/train.sh"], cwd=ROOT, capture_output=True, text=True,
                         env={"PATH": bare_path, "HOME": str(tmp_path), "VENV": str(tmp_path / "none")})
    assert out.returncode == 127 and "deepspeed not found" in out.stderr and "VENV=" in out.stderr


def test_train_sh_dry_run_multi_node(tmp_path):
    env = {"NUM_NODES": "4", "NUM_GPUS": "8", "HOSTFILE": "hostfile", "MASTER_PORT": "29600", "MASTER_ADDR": "gpu-007"}
    out = run("launch_scripts/train.sh", env, *ARGS).strip()
    launcher, opts, trainer_args = parse_launch(out)
    assert opts == {"--num_nodes": "4", "--num_gpus": "8", "--master_port": "29600", "--hostfile": "hostfile", "--master_addr": "gpu-007"}
    assert trainer_args == ARGS
    env["DS_CONFIG"] = "ds_configs/zero3_offload.json"
    _, _, trainer_args = parse_launch(run("launch_scripts/train.sh", env, *ARGS).strip())
    assert trainer_args == ["--ds_config", "ds_configs/zero3_offload.json", *ARGS]


def test_train_sh_dry_run_inside_4_node_slurm_allocation(tmp_path):
    env = {"SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu-[007-009,012]", "SLURM_JOB_ID": "4243", "NUM_GPUS": "8"}
    lines = run("launch_scripts/train.sh", env, *ARGS).strip().splitlines()
    assert lines[:4] == ["node 0: gpu-007", "node 1: gpu-008", "node 2: gpu-009", "node 3: gpu-012"]
    launcher, opts, trainer_args = parse_launch(lines[4])
    assert opts["--num_nodes"] == "4" and opts["--master_addr"] == "gpu-007" and opts["--hostfile"] == "logs/hostfile-4243"
    assert trainer_args == ARGS
    hostfile = os.path.join(ROOT, "logs", "hostfile-4243")
    assert open(hostfile).read().split("\n")[:4] == ["gpu-007 slots=8", "gpu-008 slots=8", "gpu-009 slots=8", "gpu-012 slots=8"]
    os.remove(hostfile)


def test_train_sh_refuses_multi_node_without_hostfile():
    full_env = {**os.environ, "NUM_NODES": "2", "DRY_RUN": "1"}
    full_env.pop("HOSTFILE", None)
    out = subprocess.run(["bash", "launch_scripts/train.sh"], cwd=ROOT, env=full_env, capture_output=True, text=True)
    assert out.returncode == 2 and "needs HOSTFILE" in out.stderr


def test_srun_environment_is_translated():
    """Under plain `srun` (one task per GPU) the torch variables come from SLURM's."""
    from trainer.dist import env_from_slurm

    env = {"SLURM_PROCID": "13", "SLURM_NTASKS": "32", "SLURM_LOCALID": "5", "SLURM_JOB_NODELIST": "n[10-13]", "SLURM_JOB_ID": "77"}
    assert env_from_slurm(env) == {"RANK": "13", "WORLD_SIZE": "32", "LOCAL_RANK": "5", "MASTER_ADDR": "n10", "MASTER_PORT": "29577"}
    assert env_from_slurm({**env, "RANK": "13"}) == {}, "launcher-provided variables win"


def test_supervisor_outcome_reports_killed_runs_as_failed():
    """The supervisor's exit code from the ranks' status records and the launcher's code."""
    from trainer.supervise import outcome

    def rank(r, state="exited", code=0):
        return {"rank": r, "state": state, "exit_code": code}

    assert outcome([rank(0), rank(1)], 0)[0] == 0
    assert outcome([rank(0, code=75), rank(1, code=75)], 0)[0] == 75, "deepspeed said 0: its launcher was killed"
    assert outcome([rank(0, code=75), rank(1, code=75)], 75)[0] == 75
    assert outcome([rank(0), rank(1, state="running")], 0)[0] == 1, "a rank killed before reporting"
    assert outcome([rank(0), rank(1, state="running")], 247)[0] == 247
    assert outcome([rank(0, code=3), rank(1, code=3)], 3)[0] == 3
    assert outcome([rank(0, code=75), rank(1, code=1)], 1)[0] == 1
    assert outcome([rank(0), rank(1)], 137)[0] == 137, "every rank finished but the launcher was killed"
    assert outcome([], 0)[0] == 0 and outcome([], 2)[0] == 2


def test_a_finished_rank_survives_a_late_stop_warning():
    """SLURM's warning (or the supervisor's forward of it) can reach a rank that has already
    finished; it must not kill the rank in its teardown (it did: Python's finalization resets
    handled signals to SIG_DFL, and the launcher then failed a completed run)."""
    child = ("import os, signal, time\n"
             "from trainer.preemption import StopRequest, finished\n"
             "stop = StopRequest(); stop.install(); finished()\n"
             "assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN, 'finished() keeps a handler that finalization resets'\n"
             "os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.2)\n"
             "assert stop.reason is None and signal.getsignal(signal.SIGTERM) == stop._on_signal\n"
             "print('alive')\n")
    out = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "alive", out.stderr


def test_v2_data_refuses_an_out_built_with_other_settings(tmp_path):
    """launch_scripts/v2_data.sh reuses $OUT's data only when it was built with the same settings."""
    out = tmp_path / "v2"
    out.mkdir()
    (out / "data.json").write_text('{"train_shards": "x"}')
    (out / "data_settings").write_text("train=8000 heldout=400 something else\n")
    script = f"set -euo pipefail; OUT={shlex.quote(str(out))}; source launch_scripts/v2_data.sh; echo reused"
    refused = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 1 and "was built with other settings" in refused.stderr
    assert "use another OUT" in refused.stderr and "reused" not in refused.stdout
    env = {**os.environ, "DESCRIBED_EXTRA": "3"}
    other = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, env=env)
    assert other.returncode == 1 and "not these (train=8000" in other.stderr and "described_extra=3/colour,count" in \
        other.stderr
    settings = other.stderr.split("not these (")[1].split("):")[0]
    (out / "data_settings").write_text(settings + "\n")
    reused = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, env=env)
    assert reused.returncode == 0 and reused.stdout.strip() == "reused", reused.stderr
