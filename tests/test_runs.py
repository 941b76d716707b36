"""cil.runs: the run folder, its checkpoints and lock, and the tables read back from it."""

from __future__ import annotations

import pytest


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


def test_only_our_checkpoint_names_count_and_a_copy_beside_them_is_left_alone(tmp_path):
    from cil.runs import RunFolder

    folder = RunFolder(tmp_path)
    folder.checkpoints.mkdir()
    for name in ("session_0.ckpt", "session_1.ckpt", "session_0 (copy).ckpt", "session_x.ckpt", "session_1.ckpt.bak"):
        (folder.checkpoints / name).write_bytes(b"")
    assert folder.session_checkpoints() == {0: folder.session_checkpoint(0), 1: folder.session_checkpoint(1)}
    assert folder.completed_sessions() == 2


def test_a_truncated_env_json_does_not_stop_a_resume(tmp_path):
    import json

    from cil.config import load_config
    from cil.runs import RunFolder
    from tests.helpers import CONFIGS

    (tmp_path / "env.json").write_text('{"python": "3.1')
    RunFolder(tmp_path).note_resume(load_config(CONFIGS / "simplecil" / "digits.yaml"))
    env = json.loads((tmp_path / "env.json").read_text())
    assert "unreadable" in env["note"] and len(env["resumed"]) == 1


def test_a_run_folder_is_held_by_one_process_at_a_time(tmp_path):
    """A second process resuming the same folder is refused in one line naming the holder; the hold ends with the
    process that took it, however it ends (no stale lock to clean up)."""
    import os
    import subprocess
    import sys

    from cil.config import ConfigError
    from cil.runs import RunFolder

    holder = subprocess.Popen(
        [sys.executable, "-c", f"from cil.runs import RunFolder; h = RunFolder({str(tmp_path)!r}).lock(); "
         "print('held', flush=True); import time; time.sleep(120)"],
        stdout=subprocess.PIPE, cwd=os.getcwd(),
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(ConfigError, match=rf"run folder '{tmp_path}' is in use by process {holder.pid} on "):
            RunFolder(tmp_path).lock()
    finally:
        holder.kill()
        holder.wait()
    RunFolder(tmp_path).lock().close()  # killed: its hold went with it
