"""Many named 2-rank checks in one `deepspeed --num_gpus 2` launch (CPU ranks, gloo).

Each test that launched two ZeRO-3 ranks of its own paid about 17 s for two tiny steps: the
launcher chain, the ranks' imports, the engine's set-up and the shutdown. Here the launcher
starts the two ranks once and they run the checks the selected tests declare, one after the
other, in one process group; only the engine set-up is paid per run.

Rank side (what the `launch` fixture of tests/conftest.py runs):

    deepspeed --num_gpus 2 --module tests.shared_launch --plan OUT/plan.json

A check is a list of steps:
  main   trainer/main.py's command line, `trainer.main.main(argv)`, in the launcher's
         environment: the same parsing, checks, build, training and exit code as a launch of
         its own. The group exists already, so the trainer uses it and leaves it up.
  call   `module:function(args)` of a tests.* module, with the list of arguments: a 2-rank
         helper (tests/dist_logits.py's main) or, with rank0_only, a file operation that rank 0
         does between two runs.
Every step's output (file descriptors 1 and 2, data workers included) goes to
OUT/<check>/<step>.rank<r>.log, and each rank writes OUT/<check>/result.rank<r>.json: per
step its exit code or its traceback. The ranks agree after every step whether one of them
raised; if so the check ends on both (its remaining steps marked skipped) and the launch goes
on with the next check.

Test side: a test module lists its checks in CHECKS and each test names the ones it reads,

    CHECKS = [Check("sft", [main("run", "--max_steps", "2", "--kd_alpha", "0")])]

    @pytest.mark.launch_checks("sft")
    def test_sft(launch):
        run = launch.run("sft")          # fails naming the check if it failed or never ran
        run.metrics[2]["train/loss"], run.output, run.code, run.dir

Arguments are formatted with {out} (the launch's folder), {dir} (the check's), the shared
data's keys ({train_shards}, {heldout_shards}) and what the check's `prepare` returned.
A `main` step gets the common tiny-model flags (BASE) before its own, as the separate launches
had them; its run writes to {dir}/<step name>/ (tb/metrics.jsonl there).
"""

import argparse
import contextlib
import dataclasses
import datetime
import faulthandler
import gc
import importlib
import json
import os
import signal
import sys
import time
import traceback
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The flags every 2-rank training test used (tests/test_train_zero3.py before the shared launch).
BASE = ("--ds_config", "ds_configs/zero3.json", "--model", "tiny", "--train_shards", "{train_shards}",
        "--micro_batch_size", "4", "--num_workers", "2", "--max_seq_len", "512", "--lr", "3e-3", "--warmup_steps", "2",
        "--dist_timeout_s", "300")


@dataclasses.dataclass
class Step:
    kind: str  # "main" or "call"
    name: str  # main: the run's folder under the check's; call: module:function
    args: tuple
    rank0_only: bool = False
    base: bool = True


def main(name: str, *args: str, base: bool = True) -> Step:
    """trainer/main.py with BASE (unless base=False) and `args`, logging to {dir}/name/tb."""
    return Step("main", name, args, base=base)


def call(target: str, *args: str, rank0_only: bool = False) -> Step:
    """`module:function(list of args)`; module must be one of tests.*."""
    if not target.startswith("tests."):
        raise ValueError(f"call {target}: only functions of tests.* modules")
    return Step("call", target, args, rank0_only=rank0_only)


@dataclasses.dataclass
class Check:
    name: str
    steps: list
    needs: tuple = ()  # checks whose output this one reads ({out}/<name>/...): planned first
    prepare: Callable | None = None  # prepare(data, check_dir) -> extra format keys, run by pytest before the launch


# --- rank side --------------------------------------------------------------------------
@contextlib.contextmanager
def output_to(path: str):
    """File descriptors 1 and 2 (Python's streams, C code and forked data workers alike) into `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def run_step(step: dict, check_dir: str, rank: int) -> dict:
    log = os.path.join(check_dir, f"{step['name'].replace(':', '.')}.rank{rank}.log")
    started = time.monotonic()
    record = {"name": step["name"], "kind": step["kind"], "code": None, "error": None}
    try:
        with output_to(log):
            if step["kind"] == "main":
                from trainer.main import main as trainer_main

                record["code"] = trainer_main(step["argv"])
            elif not step["rank0_only"] or rank == 0:
                module, function = step["name"].split(":")
                getattr(importlib.import_module(module), function)(step["argv"])
    except BaseException as e:  # SystemExit included: the check fails, the launch goes on
        record["error"] = "".join(traceback.format_exception(e))
    finally:
        record["seconds"] = round(time.monotonic() - started, 2)
        # What a process exit would drop: a hang watchdog still armed (a run that failed before
        # its trainer existed never closed it), this run's ZeRO-3 settings, its engine and workers.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        faulthandler.cancel_dump_traceback_later()
        unset_hf_deepspeed_config()
        gc.collect()
    return record


def run_plan(plan: dict) -> None:
    import deepspeed
    import torch

    from trainer import dist

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(seconds=plan["timeout_s"]))
    rank = dist.rank()
    for check in plan["checks"]:
        check_dir = os.path.join(plan["out"], check["name"])
        os.makedirs(check_dir, exist_ok=True)
        records, failed = [], False
        for step in check["steps"]:
            if failed:
                records.append({"name": step["name"], "kind": step["kind"], "skipped": True})
                continue
            records.append(run_step(step, check_dir, rank))
            # Both ranks stop the check if either raised: a rank going on alone would wait in
            # the next run's first collective until the timeout.
            failed = bool(dist.all_reduce_max(torch.tensor([float(records[-1]["error"] is not None)]))[0])
        with open(os.path.join(check_dir, f"result.rank{rank}.json"), "w") as f:
            json.dump({"check": check["name"], "steps": records}, f, indent=1)
        if rank == 0:
            print(f"[shared launch] rank 0: {check['name']} "
                  f"{'failed' if any(r.get('error') for r in records) else 'done'} "
                  f"in {sum(r.get('seconds', 0) for r in records):.1f} s", flush=True)
        dist.barrier()
    torch.distributed.destroy_process_group()


# --- test side --------------------------------------------------------------------------
class Format(dict):
    def __missing__(self, key):
        raise KeyError(f"unknown placeholder {{{key}}} (known: {', '.join(sorted(self))})")


def plan_checks(checks: list, wanted: set) -> list:
    """`checks` in order, only those `wanted` and what they need (transitively), needs first."""
    by_name = {check.name: check for check in checks}
    unknown = sorted(wanted - set(by_name))
    if unknown:
        raise KeyError(f"no check named {', '.join(unknown)} in any test module's CHECKS")
    ordered, seen = [], set()

    def visit(name):
        if name in seen:
            return
        seen.add(name)
        for need in by_name[name].needs:
            visit(need)
        ordered.append(by_name[name])

    for check in checks:
        if check.name in wanted:
            visit(check.name)
    return ordered


def build_plan(checks: list, out: str, data: dict, timeout_s: int = 300) -> dict:
    planned = []
    for check in checks:
        check_dir = os.path.join(out, check.name)
        os.makedirs(check_dir, exist_ok=True)
        keys = Format({**data, "out": out, "dir": check_dir})
        if check.prepare is not None:
            keys.update(check.prepare(data, check_dir) or {})
        steps = []
        for step in check.steps:
            args = list(step.args)
            if step.kind == "main":
                args = [*(BASE if step.base else ()), *args, "--log_dir", os.path.join("{dir}", step.name, "tb")]
            steps.append({"kind": step.kind, "name": step.name, "rank0_only": step.rank0_only,
                          "argv": [arg.format_map(keys) for arg in args]})
        planned.append({"name": check.name, "steps": steps})
    return {"out": out, "timeout_s": timeout_s, "checks": planned}


@dataclasses.dataclass
class Run:
    """One `main` step of a check: its exit code, rank 0's output and metrics by step."""
    code: int
    output: str
    dir: str
    metrics: dict


class Results:
    """What the launch left, read by check name; every accessor fails naming the check."""

    def __init__(self, plan: dict, launch_output: str, returncode: int):
        self.plan = {check["name"]: check for check in plan["checks"]}
        self.out = plan["out"]
        self.launch_output = launch_output
        self.returncode = returncode

    def dir(self, check: str) -> str:
        return os.path.join(self.out, check)

    def steps(self, check: str) -> list:
        """Each rank's step records of `check`, failed steps included."""
        if check not in self.plan:
            raise AssertionError(f"check {check!r} was not planned: name it in the test's launch_checks marker")
        by_rank = []
        for rank in (0, 1):
            path = os.path.join(self.out, check, f"result.rank{rank}.json")
            if not os.path.exists(path):
                unfinished = next(name for name in self.plan if not all(
                    os.path.exists(os.path.join(self.out, name, f"result.rank{r}.json")) for r in (0, 1)))
                raise AssertionError(f"check {check!r} did not finish on rank {rank}: the shared launch ended (exit "
                                     f"{self.returncode}) during check {unfinished!r}:\n{self.launch_output[-6000:]}")
            with open(path) as f:
                by_rank.append(json.load(f)["steps"])
        return by_rank

    def records(self, check: str) -> list:
        """Rank 0's step records; an AssertionError naming the check when a step raised."""
        by_rank = self.steps(check)
        for rank, steps in enumerate(by_rank):
            for step in steps:
                if step.get("error"):
                    raise AssertionError(f"check {check!r}, step {step['name']} raised on rank {rank}:\n"
                                         f"{step['error']}\n{self.log(check, step['name'], rank)[-4000:]}")
        return by_rank[0]

    def log(self, check: str, step: str, rank: int = 0) -> str:
        path = os.path.join(self.out, check, f"{step.replace(':', '.')}.rank{rank}.log")
        return open(path, errors="replace").read() if os.path.exists(path) else ""

    def run(self, check: str, name: str | None = None) -> Run:
        """The check's `main` step `name` (default: its only one)."""
        mains = [step for step in self.records(check) if step["kind"] == "main"]
        if name is None:
            if len(mains) != 1:
                raise AssertionError(f"check {check!r} has runs {[s['name'] for s in mains]}: name one")
            name = mains[0]["name"]
        step = next((s for s in mains if s["name"] == name), None)
        if step is None:
            raise AssertionError(f"check {check!r} has no run {name!r}")
        run_dir = os.path.join(self.out, check, name)
        metrics = {}
        path = os.path.join(run_dir, "tb", "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    record = json.loads(line)
                    metrics.setdefault(record["step"], {}).update(record)
        return Run(step["code"], self.log(check, name), run_dir, metrics)

    def ok(self, check: str, name: str | None = None) -> Run:
        """run(), asserting the trainer exited 0."""
        run = self.run(check, name)
        assert run.code == 0, f"check {check!r}, run {run.dir}: exit code {run.code}\n{run.output[-6000:]}"
        return run


def launch(checks: list, out: str, data: dict, port: int, timeout_s: int = 3000) -> Results:
    """Plan `checks`, run them in one 2-rank launch and return what they left."""
    import subprocess

    plan = build_plan(checks, out, data)
    plan_path = os.path.join(out, "plan.json")
    with open(plan_path, "w") as f:
        json.dump(plan, f, indent=1)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           "--module", "tests.shared_launch", "--plan", plan_path]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:  # the checks not finished by then fail, naming the one it was in
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        output += f"\n[shared launch] killed after {timeout_s} s"
    return Results(plan, output, proc.returncode)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", required=True)
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher's
    args = parser.parse_args()
    with open(args.plan) as f:
        run_plan(json.load(f))
