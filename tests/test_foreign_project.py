"""examples/foreign_project: a Lightning project of its own gets cil run's accuracy matrix with cil's strategies."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from cil.runs import load_run
from cil.session import run_experiment
from tests.helpers import ROOT, tiny_config


def foreign_project():
    spec = importlib.util.spec_from_file_location(
        "foreign_project", ROOT / "examples" / "foreign_project" / "project.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SLOW = pytest.mark.slow  # over 30 s each on 2 cores


@pytest.mark.parametrize("name", ["simplecil", pytest.param("fsa", marks=SLOW), pytest.param("mos", marks=SLOW)])
def test_foreign_loop_equals_cil_run(name, tmp_path):
    ours = foreign_project().run(name, seed=0)
    overrides = ["stream.shuffle_classes=false", "backbone.image_size=32", "stream.eval_batch_size=256"]
    run = load_run(run_experiment(tiny_config(name, tmp_path, *overrides)))
    np.testing.assert_array_equal(ours, run.accuracy_matrix.to_numpy())
