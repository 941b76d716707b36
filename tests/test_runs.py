"""Atomic writes and run-folder helpers."""

from __future__ import annotations

import pytest

from cil.io import atomic_write


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "a.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_text() == "new"


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.ckpt"
    atomic_write(path, "old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]


def test_over_seeds_groups_by_run_name_with_mean_and_population_std(tmp_path):
    import pandas as pd
    from omegaconf import OmegaConf

    from cil.runs import Run, over_seeds

    def run(name, seed, last, avg):
        metrics = {"last_acc": {"value": last}, "avg_incremental_acc": {"value": avg}, "forgetting": {"value": 0.1}}
        config = OmegaConf.create({"run": {"name": name, "seed": seed}, "strategy": {"name": "x"}})
        return Run(tmp_path, config, {}, {"metrics": metrics}, pd.DataFrame(), pd.DataFrame())

    table = over_seeds([run("a", 1, 0.5, 0.6), run("b", 0, 0.9, 0.9), run("a", 0, 0.7, 0.8)])
    assert list(table.index) == ["a", "b"] and table.loc["a", "seeds"] == [0, 1]
    assert table.loc["a", "last_acc_mean"] == pytest.approx(60.0) and table.loc["a", "last_acc_std"] == pytest.approx(
        10.0
    )
    assert table.loc["a", "avg_incremental_acc"] == "70.00 ± 10.00" and table.loc["b", "last_acc"] == "90.00 ± 0.00"
