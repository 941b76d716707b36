"""cil.resume: a run folder is something users copy and share, so its checkpoints are read by PyTorch's safe loader
(session checkpoints, Lightning's last.ckpt, and Lightning's own restore through cil's checkpoint IO); a crafted one
is refused with one line naming it, before any of it runs, and never set aside as if it were merely truncated."""

from __future__ import annotations

import pytest
import torch

from cil.cli import main
from cil.config import ConfigError
from cil.session import run_experiment
from cil.trainers import AtomicCheckpointIO
from tests.helpers import Fault, Payload, tiny_config

OVERRIDES = ["strategy.epochs=3", "stream.batch_size=64", "stream.split=B6-Inc2", "run.keep_session_checkpoints=true"]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A finetune run stopped at the third epoch of session 2: session_0.ckpt, and last.ckpt of session 2."""
    out = tmp_path_factory.mktemp("stopped")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_experiment(tiny_config("finetune", out, *OVERRIDES), callbacks=[Fault(1, 2)])
    folder = next((out / "finetune-digits").iterdir())
    assert {p.name for p in (folder / "checkpoints").iterdir()} == {"session_0.ckpt", "last.ckpt"}
    return folder


def craft(path, marker) -> None:
    """The file as cil wrote it, plus one object whose unpickling runs ``touch marker``."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    checkpoint["extra"] = Payload(marker)
    torch.save(checkpoint, path)


@pytest.mark.parametrize("name", ["session_0.ckpt", "last.ckpt"])
def test_a_crafted_checkpoint_is_refused_before_it_runs(stopped, tmp_path, capsys, name):
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(stopped, folder)
    marker = tmp_path / "ran"
    craft(folder / "checkpoints" / name, marker)
    assert main(["run", "--resume", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{folder / 'checkpoints' / name} is refused: it names posix.system" in err
    assert not marker.exists()
    assert (folder / "checkpoints" / name).is_file()  # refused, not set aside as a truncated file would be


def test_lightnings_restore_reads_through_the_safe_loader(stopped, tmp_path):
    """Lightning's restore (``trainer.fit(ckpt_path=...)``) reads through the session fit's checkpoint IO: a crafted
    file is refused there too, whatever ``weights_only`` Lightning asks for; an intact one loads."""
    import shutil

    intact = AtomicCheckpointIO().load_checkpoint(stopped / "checkpoints" / "last.ckpt", weights_only=False)
    assert intact["cil_session"] == 1 and intact["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"] == 2
    path = tmp_path / "last.ckpt"
    shutil.copy(stopped / "checkpoints" / "last.ckpt", path)
    craft(path, tmp_path / "ran")
    with pytest.raises(ConfigError, match="is refused: it names posix.system"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not (tmp_path / "ran").exists()
    torch.load(path, weights_only=False)  # the file really is an attack
    assert (tmp_path / "ran").exists()


def test_a_second_resume_of_a_held_run_folder_is_refused_before_any_work(stopped, capsys):
    import os

    from cil.runs import RunFolder

    held = RunFolder(stopped).lock()  # as a `cil run --resume` still going would hold it
    try:
        assert main(["run", "--resume", str(stopped)]) == 2
    finally:
        held.close()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"is in use by process {os.getpid()} on " in err
    assert {p.name for p in (stopped / "checkpoints").iterdir()} == {"session_0.ckpt", "last.ckpt"}  # untouched
