"""pytest's set-up for every test: quiet runs (CIL_QUIET, Lightning's info lines off). Shared helpers are in
``tests/helpers.py`` and data-set writers in ``tests/writers.py``; no test imports this file."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("CIL_QUIET", "1")


@pytest.fixture(autouse=True)
def _quiet_lightning():
    from cil.cli import quiet_lightning

    quiet_lightning()
