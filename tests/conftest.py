from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
# small and quiet: 16x16 inputs, no progress bars; a resume point at every epoch end (the resume tests need one)
TINY = [
    "backbone.image_size=16",
    "trainer.enable_progress_bar=false",
    "stream.eval_batch_size=512",
    "run.checkpoint_every=0",
]

os.environ.setdefault("CIL_QUIET", "1")


def tiny_config(strategy: str, out: Path, *extra: str):
    from cil.config import load_config

    return load_config(CONFIGS / strategy / "digits.yaml", [f"run.output_dir={out}", *TINY, *extra])


@pytest.fixture(autouse=True)
def _quiet_lightning():
    from cil.cli import quiet_lightning

    quiet_lightning()


def cil_command() -> list[str]:
    """The installed console script (the real entry point), or the module when run outside the venv."""
    script = ROOT / ".venv" / "bin" / "cil"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cil.cli"]
