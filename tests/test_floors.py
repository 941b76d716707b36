"""The floor plan holds: no module imports from a floor above its own (import-linter, setup.cfg [importlinter])."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint(tree: Path) -> subprocess.CompletedProcess:
    """Run the contract on ``tree`` laid out as installed: strategies/ and streams/ inside cil/ (as `make lint`)."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "setup.cfg"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )


@pytest.fixture
def tree(tmp_path):
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    shutil.copytree(ROOT / "cil", tmp_path / "cil", ignore=ignore)
    shutil.copytree(ROOT / "strategies", tmp_path / "cil" / "strategies", ignore=ignore)
    shutil.copytree(ROOT / "streams", tmp_path / "cil" / "streams", ignore=ignore)
    return tmp_path


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="pip install import-linter (extra [dev])")
def test_the_tree_keeps_the_floors_and_an_upward_import_breaks_them(tree):
    kept = lint(tree)
    assert kept.returncode == 0 and "1 kept, 0 broken" in kept.stdout, kept.stdout + kept.stderr
    # an upward import, even inside a function, in a part and in a strategy (the copied strategies/ are analysed)
    for path, upward in [
        ("layers/lda.py", "cil.session"),
        ("strategies/fsa.py", "cil.cli"),
        ("streams/common.py", "cil.runs"),
    ]:
        module = tree / "cil" / path
        module.write_text(module.read_text() + f"\n\ndef _up():\n    import {upward}  # noqa\n")
    broken = lint(tree)
    assert broken.returncode != 0 and "BROKEN" in broken.stdout, broken.stdout
    for line in ["cil.layers.lda -> cil.session", "cil.strategies.fsa -> cil.cli", "cil.streams.common -> cil.runs"]:
        assert line in broken.stdout, broken.stdout
