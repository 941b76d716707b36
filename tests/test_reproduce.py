"""Every `cil run` command of the reproduction table names a config that exists and validates with its overrides."""

from __future__ import annotations

import re
import shlex

import pytest

from cil.config import load_config
from tests.helpers import ROOT

COMMANDS = [
    shlex.split(c)
    for source in ("benchmarks/reproduce.md", "README.md")
    for c in re.findall(r"`(cil run configs/[^`]+?\.yaml[^`]*)`", (ROOT / source).read_text())
    if "<" not in c
]


def test_the_table_covers_every_paper_config():
    named = {c[2] for c in COMMANDS}
    paper = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "configs").glob("*/*.yaml")
        if p.parent.name not in ("base",) and p.name != "digits.yaml" and not p.stem.endswith("_in1k")
    }
    assert paper <= named, sorted(paper - named)


@pytest.mark.parametrize("command", COMMANDS, ids=[c[2] for c in COMMANDS])
def test_command_validates(command):
    cfg = load_config(ROOT / command[2], command[3:])
    assert cfg.strategy.name == command[2].split("/")[1]
