"""The session loop end to end on digits: run folder, load_run, report, resume after a fault, DDP."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch

from cil.cli import main
from cil.metrics import seen_accuracy
from cil.runs import load_run
from cil.session import run_experiment
from tests.helpers import CONFIGS, ROOT, Fault, cil_command, tiny_config

FAST_FINETUNE = ["strategy.epochs=2", "stream.batch_size=64"]


@pytest.fixture(scope="module")
def simplecil_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return run_experiment(tiny_config("simplecil", out))


def test_run_folder_layout(simplecil_run):
    names = {p.relative_to(simplecil_run).as_posix() for p in simplecil_run.rglob("*")}
    expected = {"config.yaml", "env.json", "metrics.csv", "accuracy_matrix.csv", "summary.json"}
    expected |= {"plots/accuracy_curve.png", "plots/accuracy_matrix.png", "plots/forgetting.png"}
    expected |= {"checkpoints/session_4.ckpt"}
    assert expected <= names
    assert not any(n.startswith(".") or "/." in n for n in names)  # no temporary files left behind
    assert simplecil_run.parent.name == "simplecil-digits"


def test_env_and_summary_contents(simplecil_run):
    env = json.loads((simplecil_run / "env.json").read_text())
    assert env["seed"] == 0
    assert env["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert {"git_commit", "device", "python", "command"} <= set(env)
    summary = json.loads((simplecil_run / "summary.json").read_text())
    assert summary["complete"] and summary["n_sessions"] == 5
    for name in ("avg_incremental_acc", "last_acc", "forgetting", "bwt", "fwt", "last_harmonic_mean"):
        assert summary["metrics"][name]["definition"]
    assert [s["session"] for s in summary["sessions"]] == list(range(5))
    assert all(s["trainable_params"] == 0 and s["epochs"] == 0 for s in summary["sessions"])  # frozen backbone
    assert all(s["wall_time_s"] > 0 and s["peak_memory_mb"] > 0 for s in summary["sessions"])


def test_load_run_tables_agree_with_each_other(simplecil_run):
    run = load_run(simplecil_run)
    R = run.accuracy_matrix.to_numpy()
    assert R.shape == (5, 5)
    assert (np.triu(R, 1) == 0).all()  # a growing head cannot predict unseen classes
    tidy = run.metrics.query("metric == 'accuracy'").pivot(index="session", columns="eval_session", values="value")
    np.testing.assert_allclose(tidy.to_numpy(), R)
    counts = run.summary["test_samples_per_session"]
    np.testing.assert_allclose(run.seen_accuracy.to_numpy(), seen_accuracy(R, counts))
    assert run.metric("last_acc") == pytest.approx(seen_accuracy(R, counts)[-1])
    assert run.config.strategy.name == "simplecil"


def test_simplecil_beats_chance_and_forgets_less_than_finetune(simplecil_run, tmp_path):
    finetune = run_experiment(tiny_config("finetune", tmp_path, *FAST_FINETUNE))
    ours, theirs = load_run(simplecil_run), load_run(finetune)
    assert ours.metric("last_acc") > 0.3  # 10 classes: chance is 0.1
    assert ours.metric("forgetting") < theirs.metric("forgetting")
    # finetune trains body and head: its trainable parameters are counted, and its logs exist
    sessions = theirs.summary["sessions"]
    assert all(s["trainable_params"] > 0 and s["epochs"] == 2 for s in sessions)
    assert (finetune / "logs" / "csv" / "session_0" / "metrics.csv").is_file()
    steps = pd.read_csv(finetune / "logs" / "csv" / "session_0" / "metrics.csv")
    assert "train/loss" in steps.columns
    assert any((finetune / "logs" / "tb" / "session_0").glob("events.out.tfevents.*"))


def test_config_yaml_reproduces_the_run(simplecil_run, tmp_path, capsys):
    assert main(["run", str(simplecil_run / "config.yaml"), f"run.output_dir={tmp_path}"]) == 0
    again = next((tmp_path / "simplecil-digits").iterdir())
    pd.testing.assert_frame_equal(load_run(again).accuracy_matrix, load_run(simplecil_run).accuracy_matrix)


def test_report_prints_a_table_and_writes_a_plot(simplecil_run, tmp_path, capsys):
    plot = tmp_path / "cmp.png"
    assert main(["report", str(simplecil_run), str(simplecil_run), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "avg_incremental_acc" in out and "simplecil" in out and plot.stat().st_size > 1000


@pytest.mark.slow  # over 20 s on 2 cores: the default suite stays under 10 minutes
def test_resume_after_a_fault_mid_session_gives_the_same_matrix(tmp_path):
    overrides = [*FAST_FINETUNE, "strategy.epochs=3", "trainer.deterministic=true"]
    full = run_experiment(tiny_config("finetune", tmp_path / "a", *overrides))
    cfg = tiny_config("finetune", tmp_path / "b", *overrides)
    with pytest.raises(RuntimeError, match="injected fault"):
        run_experiment(cfg, callbacks=[Fault(session=2, epoch=2)])
    broken = next((tmp_path / "b" / "finetune-digits").iterdir())
    assert (broken / "checkpoints" / "session_1.ckpt").is_file()  # sessions 0 and 1 completed
    assert torch.load(broken / "checkpoints" / "last.ckpt", weights_only=False)["cil_session"] == 2
    assert load_run(broken).summary["completed_sessions"] == 2
    assert main(["run", "--resume", str(broken)]) == 0
    resumed = load_run(broken)
    assert resumed.summary["complete"]
    np.testing.assert_array_equal(resumed.accuracy_matrix.to_numpy(), load_run(full).accuracy_matrix.to_numpy())
    assert not (broken / "checkpoints" / "last.ckpt").exists()


def test_resume_between_sessions(tmp_path):
    overrides = ["strategy.epochs=1", "stream.batch_size=64", "stream.split=B6-Inc2"]
    full = run_experiment(tiny_config("finetune", tmp_path / "a", *overrides))
    cfg = tiny_config("finetune", tmp_path / "b", *overrides)
    with pytest.raises(RuntimeError):
        run_experiment(cfg, callbacks=[Fault(session=1, epoch=0)])  # dies before any epoch of session 1
    broken = next((tmp_path / "b" / "finetune-digits").iterdir())
    run_experiment(cfg, run_dir=broken)
    np.testing.assert_array_equal(
        load_run(broken).accuracy_matrix.to_numpy(), load_run(full).accuracy_matrix.to_numpy()
    )


@pytest.mark.slow  # over 20 s on 2 cores: the default suite stays under 10 minutes
def test_two_process_ddp_matches_one_process(simplecil_run, tmp_path):
    """A 2-process CPU DDP run (gloo) of simplecil gives the accuracy matrix of the 1-process run."""
    cmd = cil_command()
    args = ["run", str(CONFIGS / "simplecil" / "digits.yaml"), f"run.output_dir={tmp_path}", "trainer.devices=2"]
    args += ["trainer.strategy=ddp", "trainer.accelerator=cpu", "backbone.image_size=16"]
    args += ["trainer.enable_progress_bar=false", "stream.eval_batch_size=512"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    out = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "simplecil-digits").iterdir())
    assert len(runs) == 1  # only rank 0 wrote a run folder
    np.testing.assert_array_equal(
        load_run(runs[0]).accuracy_matrix.to_numpy(), load_run(simplecil_run).accuracy_matrix.to_numpy()
    )


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(simplecil_run, tmp_path):
    """`torchrun --nproc_per_node=2 cil run ...`: processes started outside Lightning run the same experiment."""
    torchrun = ROOT / ".venv" / "bin" / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this interpreter")
    args = ["run", str(CONFIGS / "simplecil" / "digits.yaml"), f"run.output_dir={tmp_path}", "trainer.devices=2"]
    args += ["trainer.strategy=ddp", "trainer.accelerator=cpu", "backbone.image_size=16"]
    args += ["trainer.enable_progress_bar=false", "stream.eval_batch_size=512"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "RANK")}
    cmd = [str(torchrun), "--nproc_per_node=2", str(ROOT / ".venv" / "bin" / "cil"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = list((tmp_path / "simplecil-digits").iterdir())
    assert len(runs) == 1  # only rank 0 wrote a run folder
    np.testing.assert_array_equal(
        load_run(runs[0]).accuracy_matrix.to_numpy(), load_run(simplecil_run).accuracy_matrix.to_numpy()
    )


def test_cli_end_to_end_on_digits(tmp_path):
    """`cil run` as a user types it: trains, evaluates, prints the run folder, which `load_run` reads."""
    cmd = cil_command()
    args = ["run", str(CONFIGS / "finetune" / "digits.yaml"), f"run.output_dir={tmp_path}", "strategy.epochs=1"]
    args += ["backbone.image_size=16", "trainer.enable_progress_bar=false", "run.name=e2e"]
    out = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = next((tmp_path / "e2e").iterdir())
    assert f"run folder: {folder}" in out.stdout
    run = load_run(folder)
    assert run.summary["complete"] and run.accuracy_matrix.shape == (5, 5)


@pytest.mark.slow
def test_a_closed_pipe_or_a_closed_stderr_neither_kills_nor_corrupts_a_run(tmp_path):
    """``cil run ... | head -1`` (the reader goes away after one line) and ``cil run ... 2>&-`` (no stderr at all):
    the run goes on to its end, exit 0, every session's results written."""
    from cil.runs import load_run

    env = {**os.environ, "CIL_QUIET": "0"}  # the session lines and progress bars are printed
    args = ["run", "simplecil/digits", "backbone.image_size=16", "stream.split=B6-Inc2"]
    head = subprocess.Popen(
        [*cil_command(), *args, f"run.output_dir={tmp_path / 'a'}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    first = head.stdout.readline()
    head.stdout.close()  # what `head -1` does after its line
    assert head.wait(timeout=600) == 0 and first  # (the first line: a progress bar or a session line)
    no_stderr = subprocess.run(
        [*cil_command(), *args, f"run.output_dir={tmp_path / 'b'}"],
        stdout=subprocess.DEVNULL,
        preexec_fn=lambda: os.close(2),
        env=env,
        timeout=600,
    )
    assert no_stderr.returncode == 0
    for out in ("a", "b"):
        (run,) = (tmp_path / out / "simplecil-digits").iterdir()
        assert load_run(run).summary["complete"] and len(load_run(run).summary["sessions"]) == 3


def test_strategies_log_only_the_steps_the_loggers_write_and_the_logs_stay_the_same(tmp_path, monkeypatch):
    """``CILModule.logs_this_step`` skips ``self.log`` on the steps Lightning would not write; the CSV logs equal
    those of logging every step (values and step numbers), a step budget's last step included: 7 steps is no
    multiple of log_every_n_steps=3, and a step that did not log would be written with the last logged value."""
    import pytorch_lightning as pl

    from cil.module import CILModule
    from cil.strategies.finetune import Finetune

    monkeypatch.setattr(Finetune, "steps_for", lambda self, session: 7 if session.index == 0 else None)
    calls = []
    log = pl.LightningModule.log
    monkeypatch.setattr(pl.LightningModule, "log", lambda self, *a, **k: calls.append(a[0]) or log(self, *a, **k))

    def logs(out, every_step: bool):
        if every_step:
            monkeypatch.setattr(CILModule, "logs_this_step", lambda self: True)
        calls.clear()
        folder = run_experiment(tiny_config("finetune", out, "strategy.epochs=2", "trainer.log_every_n_steps=3",
                                            "trainer.loggers=[csv]"))  # fmt: skip
        tables = {p.parent.name: pd.read_csv(p) for p in sorted((folder / "logs" / "csv").glob("*/metrics.csv"))}
        return tables, len(calls)

    gated, gated_calls = logs(tmp_path / "gated", every_step=False)
    every, every_calls = logs(tmp_path / "every", every_step=True)
    assert sorted(gated) == sorted(every) == [f"session_{k}" for k in range(5)]
    for session in gated:
        pd.testing.assert_frame_equal(gated[session], every[session])
    assert len(gated["session_0"]) == 3  # steps 3, 6 and the budget's 7th
    assert gated_calls < every_calls / 2  # the values of the other steps were never computed
