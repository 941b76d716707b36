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


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two simplecil runs of one config, seeds 0 and 1 (simplecil trains nothing: seconds)."""
    out = tmp_path_factory.mktemp("runs")
    return [run_experiment(tiny_config("simplecil", out, "stream.split=B4-Inc3", f"run.seed={s}")) for s in (0, 1)]


def test_one_unreadable_run_is_skipped_and_the_report_still_prints(tmp_path, capsys, two_runs):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(two_runs[1], broken)
    (broken / "summary.json").write_text('{"strategy": "simp')
    assert main(["report", str(two_runs[0]), str(broken), "--plot", str(tmp_path / "r.png")]) == 0
    captured = capsys.readouterr()
    assert f"[cil] skipped: '{broken}' has unreadable results (JSONDecodeError" in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "simplecil" in captured.out


@pytest.mark.parametrize(
    "plot, message",
    [("report.xyz", "unknown image format '.xyz'"), ("folder", "is a folder; give a file name")],
)
def test_a_plot_path_that_cannot_be_written_is_one_line_before_any_table(tmp_path, capsys, two_runs, plot, message):
    (tmp_path / "folder").mkdir()
    assert main(["report", *map(str, two_runs), "--plot", str(tmp_path / plot)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and message in captured.err


def test_a_plot_that_fails_to_write_is_one_line_after_the_tables(tmp_path, capsys, two_runs):
    (tmp_path / "a-file").write_text("")
    assert main(["report", *map(str, two_runs), "--plot", str(tmp_path / "a-file" / "r.png")]) == 2
    captured = capsys.readouterr()
    assert "mean ± std over seeds" in captured.out  # the tables are printed first
    err = captured.err.strip()
    assert err.startswith(f"[cil] comparison plot not written to {tmp_path / 'a-file' / 'r.png'} (")
    assert err.endswith("); give a writable path with --plot") and len(err.splitlines()) == 1


def test_only_runs_that_differ_in_the_seed_alone_are_averaged(tmp_path, two_runs):
    """Same name and seed but another split is another experiment; an incomplete run is never averaged in."""
    import json
    import shutil

    from cil.runs import over_seeds

    other = run_experiment(tiny_config("simplecil", tmp_path, "stream.split=B6-Inc2", "run.seed=0"))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(two_runs[1], unfinished)
    summary = json.loads((unfinished / "summary.json").read_text())
    (unfinished / "summary.json").write_text(json.dumps({**summary, "complete": False}))
    table = over_seeds([load_run(p) for p in (*two_runs, other, unfinished)])
    assert list(table.index) == ["simplecil-digits", "simplecil-digits #2", "simplecil-digits (incomplete)"]
    assert table["seeds"].tolist() == [[0, 1], [0], [1]]
