"""Faults a night's run meets: Ctrl-C, truncated checkpoints, resuming a finished run, half-made run folders."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from pytorch_lightning.callbacks import Callback

from cil.cli import main
from cil.resume import RunInterrupted
from cil.runs import load_run
from cil.session import run_experiment
from tests.helpers import tiny_config

OVERRIDES = ["strategy.epochs=3", "stream.batch_size=64", "stream.split=B6-Inc2", "trainer.deterministic=true"]


class CtrlC(Callback):
    """Ctrl-C at the start of a given epoch of a given session."""

    def __init__(self, session: int, epoch: int):
        self.session, self.epoch = session, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if pl_module.session_index == self.session and trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    return run_experiment(tiny_config("finetune", tmp_path_factory.mktemp("full"), *OVERRIDES))


def interrupted(tmp_path, session: int = 1, epoch: int = 2):
    cfg = tiny_config("finetune", tmp_path, *OVERRIDES, "run.keep_session_checkpoints=true")
    with pytest.raises(RunInterrupted) as caught:
        run_experiment(cfg, callbacks=[CtrlC(session, epoch)])
    folder = next((tmp_path / "finetune-digits").iterdir())
    assert caught.value.session == session and caught.value.folder == folder
    return folder


def same(a, b) -> None:
    np.testing.assert_array_equal(load_run(a).accuracy_matrix.to_numpy(), load_run(b).accuracy_matrix.to_numpy())


@pytest.mark.slow  # over 20 s on 2 cores: the default suite stays under 10 minutes
def test_ctrl_c_names_the_session_and_the_resume_command(tmp_path, capsys, monkeypatch, full):
    folder = interrupted(tmp_path)
    import cil.session

    def stop(*args, **kwargs):
        raise RunInterrupted(folder, 1)

    monkeypatch.setattr(cil.session, "run_experiment", stop)
    assert main(["run", "--resume", str(folder)]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"cil: interrupted in session 2; resume with: cil run --resume {folder}"
    monkeypatch.undo()
    elapsed = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=False)["cil_elapsed_s"]
    logs = {p: p.read_bytes() for p in (folder / "logs" / "csv" / "session_1").rglob("*") if p.is_file()}
    assert logs  # the interrupted fit's own logs
    assert main(["run", "--resume", str(folder)]) == 0
    same(folder, full)
    assert {p: p.read_bytes() for p in logs} == logs  # kept as they were: the resumed fit logs to a new version
    assert (folder / "logs" / "csv" / "session_1-resumed" / "metrics.csv").is_file()
    session = json.loads((folder / "summary.json").read_text())["sessions"][1]
    assert session["wall_time_s"] >= elapsed > 0  # the time before the interruption counts
    assert main(["run", "--resume", str(folder)]) == 0
    assert "is complete" in capsys.readouterr().out


@pytest.mark.slow
def test_a_truncated_resume_point_restarts_its_session_with_the_same_result(tmp_path, capsys, full):
    folder = interrupted(tmp_path)
    last = folder / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert main(["run", "--resume", str(folder)]) == 0
    assert "last.ckpt is unreadable" in capsys.readouterr().out
    same(folder, full)


@pytest.mark.slow
def test_a_truncated_session_checkpoint_falls_back_to_the_one_before(tmp_path, capsys, full):
    folder = interrupted(tmp_path, session=2, epoch=1)
    newest = folder / "checkpoints" / "session_1.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])
    assert main(["run", "--resume", str(folder)]) == 0
    assert "session_1.ckpt is unreadable" in capsys.readouterr().out
    same(folder, full)


@pytest.mark.slow  # builds the module's 60 s reference run
def test_report_skips_a_run_stopped_before_any_result(tmp_path, capsys, full):
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "config.yaml").write_text("{}")
    assert main(["report", str(full), str(stopped), "--plot", str(tmp_path / "p.png")]) == 0
    captured = capsys.readouterr()
    assert "skipped" in captured.err and str(stopped) in captured.err and "finetune" in captured.out


@pytest.mark.slow
def test_resuming_with_another_strategy_names_the_keys_that_differ(tmp_path, capsys):
    cfg = tiny_config("finetune", tmp_path, "strategy.epochs=1", "stream.split=B8-Inc2")
    with pytest.raises(RunInterrupted):
        run_experiment(cfg, callbacks=[CtrlC(session=1, epoch=0)])
    folder = next((tmp_path / "finetune-digits").iterdir())
    text = (folder / "config.yaml").read_text().replace("name: finetune", "name: simplecil")
    finetune_only = ("epochs", "lr:", "momentum", "optimizer", "weight_decay", "scheduler")
    kept = [line for line in text.splitlines() if not any(key in line for key in finetune_only)]
    (folder / "config.yaml").write_text("\n".join(kept))
    assert main(["run", "--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint does not fit the strategy its config.yaml builds now" in err and "classifier" in err


def _signal_at(monkeypatch, phase: str, signum: int) -> None:
    """Sends ``signum`` to this process (a real signal, through the real handler) once, in session 2, at ``phase``:
    the start of its third epoch (training), its evaluation, or the writing of its checkpoint and results."""
    import os

    import cil.session
    from cil.runs import RunFolder
    from cil.trainers import SessionTag

    sent = []

    def send(session: int) -> None:
        if session == 1 and not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)

    if phase == "training":

        def at_epoch(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                send(self.session)

        monkeypatch.setattr(SessionTag, "on_train_epoch_start", at_epoch, raising=False)
    elif phase == "evaluation":
        evaluate = cil.session.evaluate

        def evaluating(strategy, stream, k, *args, **kwargs):
            send(k)
            return evaluate(strategy, stream, k, *args, **kwargs)

        monkeypatch.setattr(cil.session, "evaluate", evaluating)
    else:
        write = RunFolder.write_results

        def writing(self, records, *args, **kwargs):
            send(len(records) - 1)
            return write(self, records, *args, **kwargs)

        monkeypatch.setattr(RunFolder, "write_results", writing)


STOPS = [
    ("SIGTERM", "training"),
    ("SIGTERM", "evaluation"),
    ("SIGTERM", "results"),
    ("SIGUSR1", "training"),
    ("SIGUSR2", "evaluation"),
    ("SIGINT", "evaluation"),
]


@pytest.mark.parametrize(
    "name, phase", [pytest.param(*stop, marks=[pytest.mark.slow]) for stop in STOPS]
)  # each about 30 s on 2 cores (a run, then its resume): the slow suite, which CI runs too
def test_every_stop_signal_in_every_phase_is_one_line_and_resumes_exactly(
    tmp_path, capsys, monkeypatch, full, name, phase
):
    """What a scheduler sends (SIGTERM at the time limit or on preemption, SIGUSR1/2 when asked) and Ctrl-C stop the
    run the same way in training, evaluation and while results are written: one line naming the signal, the session
    and the resume command, exit 128 + the signal's number, and ``--resume`` gives the uninterrupted matrix."""
    import signal

    signum = getattr(signal, name)
    _signal_at(monkeypatch, phase, signum)
    args = [f"run.output_dir={tmp_path}", "backbone.image_size=16", "trainer.enable_progress_bar=false"]
    args += ["run.checkpoint_every=0", "stream.eval_batch_size=512", *OVERRIDES]
    from tests.helpers import CONFIGS

    assert main(["run", str(CONFIGS / "finetune" / "digits.yaml"), *args]) == 128 + signum
    folder = next((tmp_path / "finetune-digits").iterdir())
    how = "interrupted" if name == "SIGINT" else f"stopped by {name}"
    err = capsys.readouterr().err.strip()
    assert err == f"cil: {how} in session 2; resume with: cil run --resume {folder}"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the run's handlers are gone with the run
    done = json.loads((folder / "summary.json").read_text())["sessions"]
    assert len(done) == (2 if phase == "results" else 1)  # results being written are finished first
    monkeypatch.undo()
    assert main(["run", "--resume", str(folder)]) == 0
    same(folder, full)


SLURM = {
    "SLURM_NTASKS": "1",
    "SLURM_JOB_NAME": "cil",
    "SLURM_JOB_ID": "4242",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}


@pytest.mark.slow
def test_a_requeued_slurm_job_resumes_its_own_run_folder(tmp_path, capsys, monkeypatch, full):
    """``run.requeue=true`` in a SLURM job: SIGTERM requeues the job (scontrol requeue, here a stand-in that records
    its arguments) and says so in its one line; the requeued job's same command resumes that run folder (no second
    folder) and ends with the uninterrupted matrix. Without a restart, or with another config, nothing is resumed."""
    import signal

    from cil.config import load_config
    from cil.resume import requeued_run
    from tests.helpers import CONFIGS

    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_ / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    config = str(CONFIGS / "finetune" / "digits.yaml")
    args = [f"run.output_dir={tmp_path / 'runs'}", "backbone.image_size=16", "trainer.enable_progress_bar=false"]
    args += ["run.checkpoint_every=0", "stream.eval_batch_size=512", "run.requeue=true", *OVERRIDES]
    with pytest.MonkeyPatch.context() as patch:
        _signal_at(patch, "evaluation", signal.SIGTERM)
        assert main(["run", config, *args]) == 128 + signal.SIGTERM
    folder = next((tmp_path / "runs" / "finetune-digits").iterdir())
    err = capsys.readouterr().err.strip()
    assert err == "cil: stopped by SIGTERM in session 2; requeued SLURM job 4242, which resumes it"
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert requeued_run(load_config(config, args)) is None  # not a restarted job
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert requeued_run(load_config(config, [*args, "run.seed=1"])) is None  # another experiment
    assert requeued_run(load_config(config, args)) == folder
    assert main(["run", config, *args]) == 0
    assert f"SLURM job requeued: resuming {folder}" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "runs" / "finetune-digits").iterdir()] == [folder.name]
    same(folder, full)


@pytest.mark.slow
def test_under_slurm_nothing_is_read_or_written_outside_the_run_folder(tmp_path, capsys, monkeypatch, full):
    """In a SLURM job (the environment srun sets), Lightning's auto-requeue would write hpc_ckpt_<n>.ckpt into the
    current folder on SIGUSR1 and restore any it finds there: a stale one in the current folder is ignored by a new
    run, SIGUSR1 stops the run as any stop signal does, and the resumed run gives the uninterrupted matrix."""
    import signal

    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    torch.save({"state_dict": {}, "garbage": True}, work / "hpc_ckpt_1.ckpt")  # stale, from another job
    from tests.helpers import CONFIGS

    _signal_at(monkeypatch, "training", signal.SIGUSR1)
    args = [f"run.output_dir={tmp_path / 'runs'}", "backbone.image_size=16", "trainer.enable_progress_bar=false"]
    args += ["run.checkpoint_every=0", "stream.eval_batch_size=512", *OVERRIDES]
    assert main(["run", str(CONFIGS / "finetune" / "digits.yaml"), *args]) == 128 + signal.SIGUSR1
    folder = next((tmp_path / "runs" / "finetune-digits").iterdir())
    assert "stopped by SIGUSR1 in session 2" in capsys.readouterr().err
    assert sorted(p.name for p in work.iterdir()) == ["hpc_ckpt_1.ckpt"]  # nothing written beside it
    assert not list(folder.rglob("hpc_ckpt_*"))
    assert main(["run", "--resume", str(folder)]) == 0
    same(folder, full)


@pytest.mark.slow  # builds the module's 60 s reference run
def test_a_complete_run_with_a_truncated_summary_rebuilds_its_results_on_resume(tmp_path, capsys, full):
    """A crash while summary.json was written (or plots a kill interrupted): the run is not taken for complete,
    and --resume rebuilds every result from the last session checkpoint without training again."""
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(full, folder)
    summary = folder / "summary.json"
    summary.write_text(summary.read_text()[:200])
    shutil.rmtree(folder / "plots")
    assert main(["run", "--resume", str(folder)]) == 0
    assert "results rebuilt from session_2.ckpt" in capsys.readouterr().out
    assert load_run(folder).summary["complete"] and sorted(p.name for p in (folder / "plots").iterdir())
    same(folder, full)


def test_a_resume_whose_data_changed_since_the_interruption_is_refused(tmp_path, capsys):
    """The run folder records what its data were built from: a file deleted or changed under stream.data_root
    after the interruption is refused in one line, where the resumed run would otherwise mix two data sets."""
    from tests.writers import image, write_image_folders

    write_image_folders(tmp_path / "data", ["a", "b", "c", "d"], train=3, test=2)
    cfg_args = [f"stream.data_root={tmp_path / 'data'}", "stream.name=imagenet_r", "stream.split=B0-Inc2"]
    cfg = tiny_config("finetune", tmp_path / "runs", *cfg_args, "strategy.epochs=2", "stream.batch_size=4")
    with pytest.raises(RunInterrupted):
        run_experiment(cfg, callbacks=[CtrlC(session=1, epoch=1)])
    folder = next((tmp_path / "runs" / "finetune-imagenet_r").iterdir())
    image(tmp_path / "data" / "train" / "a" / "a_0.jpg", 99)  # another picture under the same name
    assert main(["run", "--resume", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"the data of run folder '{folder}' changed since it was interrupted" in err
