"""The README stays true to the code: its configuration table is the generated one, and its
quickstart is exactly the two set-up commands."""

import os
import re

from trainer.config import reference_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_config_reference_is_current():
    assert reference_table() in README, "regenerate the README table with trainer.config.reference_table()"


def test_quickstart_is_two_commands():
    quickstart = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quickstart, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["bash launch_scripts/demo.sh", "bash tests/run.sh"]


def test_every_ds_config_and_tool_is_documented():
    for name in os.listdir(os.path.join(ROOT, "ds_configs")):
        assert name in README, name
    for name in os.listdir(os.path.join(ROOT, "tools")):
        if name.endswith(".py"):
            assert name[:-3] in README, name
