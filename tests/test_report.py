"""cil report: plots numbered as the CLI numbers sessions, written beside the runs unless told where."""

from __future__ import annotations

import cil.runs as runs_module
from cil.cli import main
from cil.runs import load_run
from cil.session import run_experiment
from tests.helpers import tiny_config


def test_report_plot_goes_beside_the_runs_with_sessions_from_1(tmp_path, monkeypatch, capsys):
    run = run_experiment(tiny_config("simplecil", tmp_path, "stream.split=B4-Inc3"))
    figures = []
    save = runs_module._save
    monkeypatch.setattr(runs_module, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(run)]) == 0
    assert (run.parent / "cil_report.png").is_file() and not (tmp_path / "cil_report.png").exists()
    xs = list(figures[-1].axes[0].lines[0].get_xdata())
    assert xs == [1, 2, 3] and len(load_run(run).accuracy_matrix) == 3
    figures.clear()
    runs_module.plot_run(run, load_run(run).accuracy_matrix.to_numpy(), [1, 1, 1])
    curve = figures[0].axes[0]
    assert list(curve.lines[0].get_xdata()) == [1, 2, 3] and list(curve.get_xticks()) == [1, 2, 3]
