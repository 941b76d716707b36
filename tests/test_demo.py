"""The README's ``make demo`` block is what ``make demo`` prints: same seeds, same accuracies to the last digit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def table_rows(text: str) -> list[list[str]]:
    """(strategy, stream, sessions, avg incremental acc, last acc, forgetting) of each row of the demo's table; the
    run column (a timestamped folder) is left out."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["run", "strategy"])
    rows = []
    for line in lines[start + 1 :]:
        fields = line.split()
        if len(fields) != 7:
            break
        rows.append(fields[1:])
    return rows


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    begin = text.index("```\nClass-incremental digits,")
    return text[begin : text.index("```", begin + 3)]


@pytest.mark.slow
def test_readme_demo_block_is_what_make_demo_prints(tmp_path):
    environ = {**os.environ, "CIL_QUIET": "1", "TQDM_DISABLE": "1"}
    demo = subprocess.run(
        [sys.executable, "-m", "cil.demo", f"run.output_dir={tmp_path / 'runs'}", "trainer.enable_progress_bar=false"],
        cwd=tmp_path, capture_output=True, text=True, env=environ,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stderr[-2000:]
    printed = table_rows(demo.stdout)
    assert len(printed) == 8
    assert printed == table_rows(readme_block())
