"""Progress bars of statistics passes follow trainer.enable_progress_bar, TQDM_DISABLE and CIL_QUIET."""

from __future__ import annotations

import pytest

from cil.session import run_experiment
from tests.helpers import tiny_config


@pytest.mark.parametrize(
    "setting, env, shown",
    [
        pytest.param("true", {}, True, marks=pytest.mark.slow),
        ("false", {}, False),
        ("true", {"TQDM_DISABLE": "1"}, False),
        pytest.param("true", {"CIL_QUIET": "1"}, False, marks=pytest.mark.slow),
    ],
)
def test_statistics_bars_follow_the_switches(setting, env, shown, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CIL_QUIET", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run_experiment(tiny_config("simplecil", tmp_path, f"trainer.enable_progress_bar={setting}", "stream.split=B6-Inc4"))
    err = capsys.readouterr().err
    assert ("prototypes s0" in err) == shown, err[-500:]
