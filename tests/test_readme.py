"""The documentation stays true to the code and to itself: the README is a newcomer's ten
minutes (at most 300 lines) whose quickstart is exactly the two set-up commands; the
configuration reference in docs/ is the generated one; every DeepSpeed config and tool is
documented; no relative link in README.md, docs/ or tests/README.md is broken (files and
#anchors)."""

import os
import re

import pytest

from trainer.config import reference_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(rel: str) -> str:
    with open(os.path.join(ROOT, rel)) as f:
        return f.read()


README = read("README.md")
DOCS = sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))
PAGES = ["README.md", *DOCS, "tests/README.md"]


def test_readme_is_short():
    assert len(README.splitlines()) <= 300, "keep README.md a newcomer's ten minutes: the depth goes to docs/"


def test_config_reference_is_current():
    assert reference_table() in read("docs/configuration.md"), \
        "regenerate docs/configuration.md's table with trainer.config.reference_table()"


def test_quickstart_is_two_commands():
    quickstart = README.split("## Quickstart", 1)[1].split("##", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quickstart, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["bash launch_scripts/demo.sh", "bash tests/run.sh"]


def test_every_ds_config_and_tool_is_documented():
    everything = "\n".join(read(page) for page in PAGES)
    for name in os.listdir(os.path.join(ROOT, "ds_configs")):
        assert name in everything, name
    for name in os.listdir(os.path.join(ROOT, "tools")):
        if name.endswith(".py"):
            assert name[:-3] in everything, name


def anchors(markdown: str) -> set:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces -> '-'."""
    found = set()
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def links(markdown: str) -> list:
    """The targets of [text](target) outside code blocks and spans."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_the_anchor_rule_matches_github():
    assert anchors("# Native omni models\n## Self-KD vs SFT: the study (`a.sh`)\n```\n# not a heading\n```") == {
        "native-omni-models", "self-kd-vs-sft-the-study-ash"}


@pytest.mark.parametrize("page", PAGES)
def test_no_broken_relative_link(page):
    for target in links(read(page)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: -- not checked here (no network)
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(os.path.join(ROOT, resolved)), f"{page}: link to {target}: {resolved} does not exist"
        if anchor and resolved.endswith(".md"):
            assert anchor in anchors(read(resolved)), f"{page}: link to {target}: no heading with anchor #{anchor}"
