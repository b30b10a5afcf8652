"""The shared launch's planning and reporting (tests/shared_launch.py), without a launch: checks
are planned with what they need first, arguments are formatted with the check's folders and
data, and every way a check can fail reaches the test as an error that names the check, the
step and the rank (a raised step, a non-zero exit, a launch that died during another check)."""

import json
import os

import pytest

from tests.shared_launch import BASE, Check, Results, build_plan, call, main, plan_checks

CHECKS = [
    Check("full", [main("run", "--max_steps", "4", "--save_dir", "{dir}/ckpt")]),
    Check("resumed", [call("tests.test_train_zero3:copy_checkpoint", "{out}/full/ckpt/step_4", "{dir}/ckpt",
                           rank0_only=True),
                      main("run", "--resume", "auto", "--save_dir", "{dir}/ckpt")], needs=("full",)),
    Check("other", [main("run", "--kd_alpha", "0", base=False)]),
]


def test_a_check_brings_what_it_needs_first():
    assert [c.name for c in plan_checks(CHECKS, {"resumed"})] == ["full", "resumed"]
    assert [c.name for c in plan_checks(CHECKS, {"other", "full"})] == ["full", "other"]
    with pytest.raises(KeyError, match="no check named nope"):
        plan_checks(CHECKS, {"nope"})
    with pytest.raises(ValueError, match="only functions of tests"):
        call("os:system", "true")


def test_arguments_are_formatted_and_runs_get_the_common_flags(tmp_path):
    plan = build_plan(plan_checks(CHECKS, {"resumed", "other"}), str(tmp_path), {"train_shards": "d/s-{0..3}.tar"})
    full, resumed, other = plan["checks"]
    argv = full["steps"][0]["argv"]
    assert argv[:len(BASE)] == [arg.replace("{train_shards}", "d/s-{0..3}.tar") for arg in BASE]
    assert argv[-4:] == ["--save_dir", f"{tmp_path}/full/ckpt", "--log_dir", f"{tmp_path}/full/run/tb"]
    copy = resumed["steps"][0]
    assert copy["rank0_only"] and copy["argv"] == [f"{tmp_path}/full/ckpt/step_4", f"{tmp_path}/resumed/ckpt"]
    assert other["steps"][0]["argv"] == ["--kd_alpha", "0", "--log_dir", f"{tmp_path}/other/run/tb"]
    with pytest.raises(KeyError, match="unknown placeholder {heldout_shards}"):
        build_plan([Check("x", [main("run", "--eval_shards", "{heldout_shards}")])], str(tmp_path), {"train_shards": "s"})


def write(tmp_path, check: str, rank: int, steps: list, log: str = "") -> None:
    os.makedirs(tmp_path / check, exist_ok=True)
    (tmp_path / check / f"result.rank{rank}.json").write_text(json.dumps({"check": check, "steps": steps}))
    if log:
        (tmp_path / check / f"run.rank{rank}.log").write_text(log)


def test_every_failure_names_the_check(tmp_path):
    names = ("good", "exit3", "raised", "dying", "never")  # the launch died during "dying"
    plan = {"out": str(tmp_path), "checks": [{"name": name, "steps": []} for name in names]}
    for rank in (0, 1):
        write(tmp_path, "good", rank, [{"name": "run", "kind": "main", "code": 0, "error": None}], "step 4/4\n")
        write(tmp_path, "exit3", rank, [{"name": "run", "kind": "main", "code": 3, "error": None}], "diverged\n")
    write(tmp_path, "raised", 0, [{"name": "run", "kind": "main", "code": None, "error": None}])
    write(tmp_path, "raised", 1, [{"name": "run", "kind": "main", "code": None, "error": "Traceback: boom"},
                                  {"name": "again", "kind": "main", "skipped": True}])
    results = Results(plan, "launch output tail", -9)

    run = results.ok("good")
    assert run.code == 0 and run.output == "step 4/4\n" and run.dir == str(tmp_path / "good" / "run")
    assert results.run("exit3").code == 3
    with pytest.raises(AssertionError, match="check 'exit3', run .*: exit code 3"):
        results.ok("exit3")
    with pytest.raises(AssertionError, match="check 'raised', step run raised on rank 1:\nTraceback: boom"):
        results.run("raised")
    assert results.steps("raised")[1][1]["skipped"]
    with pytest.raises(AssertionError, match="check 'never' did not finish on rank 0: the shared launch ended "
                                             r"\(exit -9\) during check 'dying'"):
        results.run("never")
    with pytest.raises(AssertionError, match="check 'unplanned' was not planned"):
        results.run("unplanned")
