"""Shared pytest set-up: the markers and the repository root on the import path come from
pyproject.toml ([tool.pytest.ini_options]); the spoken-question data of the multi-process
tests and their shared 2-rank launch (tests/shared_launch.py) are made once per session here.

tests/run.sh runs the suite on two pytest-xdist workers (--dist loadgroup). Every test that
reads the shared launch is put in one group, so one worker runs the launch, once; the data is
made by whichever worker asks first and read by the other."""

import fcntl
import json
import os
import socket

import pytest

from tests import shared_launch


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("launch_checks") is not None:
            item.add_marker(pytest.mark.xdist_group("shared_launch"))


def pytest_collection_finish(session):
    """Under --dist loadgroup pytest-xdist names each grouped test "<id>@<group>"; where it
    cannot (a pytest it does not support), the groups are ignored and every worker would run
    its own shared launch: stop instead."""
    if not session.config.getoption("loadgroup", default=False):
        return
    ungrouped = [item.nodeid for item in session.items
                 if item.get_closest_marker("xdist_group") is not None and "@" not in item.nodeid]
    if ungrouped:
        raise pytest.UsageError(f"pytest-xdist could not group {ungrouped[0]} (and {len(ungrouped) - 1} more): "
                                "this pytest and pytest-xdist do not work together; see requirements.txt")


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> dict:
    """48 training and 8 held-out spoken-question samples in shards of 12 (datagen.demo)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above every worker's own
    with open(root / "demo_shards.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker makes them, the other waits and reads
        made = root / "demo_shards.json"
        if not made.exists():
            from datagen.demo import make_demo_data

            spec = make_demo_data(str(root / "demo_shards"), num_train=48, num_heldout=8, seed=1,
                                  samples_per_shard=12)
            made.write_text(json.dumps(spec))
        return json.loads(made.read_text())


@pytest.fixture(scope="session")
def launch(request, demo_shards, tmp_path_factory) -> shared_launch.Results:
    """One 2-rank launch of every check the collected tests name (their launch_checks markers),
    with what those need, from the CHECKS of their modules."""
    checks, wanted, modules = [], set(), []
    for item in request.session.items:
        if item.module not in modules:
            modules.append(item.module)
            checks.extend(getattr(item.module, "CHECKS", []))
        for marker in item.iter_markers("launch_checks"):
            wanted.update(marker.args)
    planned = shared_launch.plan_checks(checks, wanted)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = shared_launch.launch(planned, str(tmp_path_factory.mktemp("shared_launch")), demo_shards, port)
    print(f"\n[shared launch] {len(planned)} checks, exit {results.returncode}: "
          + ", ".join(line.split(": ", 1)[1] for line in results.launch_output.splitlines()
                      if line.startswith("[shared launch] rank 0: ")))
    return results
