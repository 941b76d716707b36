"""Checkpoint cost at paper scale: the resume point's interval, frozen tensors left out, exact resume with workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cil.cli import main
from cil.config import ConfigError
from cil.module import create_strategy
from cil.runs import RunFolder, load_run
from cil.session import run_experiment
from cil.trainers import AtomicCheckpointIO
from tests.helpers import Fault, tiny_config

FINETUNE = ["strategy.epochs=3", "stream.batch_size=64", "stream.split=B6-Inc2"]


def count_writes(monkeypatch) -> list[str]:
    written: list[str] = []
    original = AtomicCheckpointIO.save_checkpoint

    def counting(self, checkpoint, path, storage_options=None):
        written.append(str(path))
        return original(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", counting)
    return written


@pytest.mark.slow  # over 30 s on 2 cores
@pytest.mark.parametrize("minutes, per_session", [(0, 2), (60, 0)])
def test_the_resume_point_is_written_by_interval_never_at_the_last_epoch(monkeypatch, tmp_path, minutes, per_session):
    """Every epoch end but the last with 0 minutes (3 epochs: 2 writes per session); none within an hour: the
    number of writes is bounded by wall time, not by the number of epochs."""
    written = count_writes(monkeypatch)
    run = run_experiment(tiny_config("finetune", tmp_path, *FINETUNE, f"run.checkpoint_every={minutes}"))
    assert all(path.endswith("last.ckpt") for path in written)
    assert len(written) == 3 * per_session  # 3 sessions
    assert load_run(run).summary["complete"] and not (run / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_without_a_resume_point_a_fault_restarts_the_session_and_gives_the_same_matrix(tmp_path):
    full = run_experiment(tiny_config("finetune", tmp_path / "a", *FINETUNE))
    cfg = tiny_config("finetune", tmp_path / "b", *FINETUNE, "run.checkpoint_every=60")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_experiment(cfg, callbacks=[Fault(session=1, epoch=2)])
    broken = next((tmp_path / "b" / "finetune-digits").iterdir())
    assert not (broken / "checkpoints" / "last.ckpt").exists()
    assert main(["run", "--resume", str(broken)]) == 0
    np.testing.assert_array_equal(
        load_run(broken).accuracy_matrix.to_numpy(), load_run(full).accuracy_matrix.to_numpy()
    )


def test_frozen_backbones_are_left_out_of_checkpoints_and_checked_on_load(tmp_path):
    """SimpleCIL's frozen backbone: not in the session checkpoint (a digest instead); resuming with another
    backbone than the run's is refused with a message naming it, not silently mixed."""
    cfg = tiny_config("simplecil", tmp_path, "run.keep_session_checkpoints=true")
    run = run_experiment(cfg)
    folder = RunFolder(run)
    state, digest = folder.load_session(0).state_dict, folder.load_session(0).rebuilt_digest
    assert state and not any(k.startswith("backbone.") for k in state)
    assert digest is not None
    torch.manual_seed(cfg.run.seed)  # as run_experiment builds it: a random-init backbone from the run's seed
    fresh = create_strategy(cfg)
    full = fresh.complete_state(state, digest)
    fresh.load_state_dict(full)  # strict: the rebuilt backbone fills the gap
    assert set(full) == set(fresh.state_dict())
    torch.manual_seed(cfg.run.seed)
    other = create_strategy(cfg)
    with torch.no_grad():
        next(other.backbone.parameters())[0].add_(1e-3)  # one changed weight
    with pytest.raises(ConfigError, match="other backbone weights than the config builds now"):
        other.complete_state(state, digest)


@pytest.mark.parametrize("name", ["dkvb", "mos", "zscl"])
def test_frozen_tensors_never_reach_the_resume_point(name, tmp_path):
    """DKVB's encoder, MOS's ViT and ZSCL's teacher are left out of last.ckpt (the largest parts at paper scale)."""
    strategy = create_strategy(tiny_config(name, tmp_path))
    prefix = strategy.rebuildable_prefixes()
    state, digest = strategy.checkpoint_state()
    left_out = [k for k in strategy.state_dict() if k.startswith(prefix)]
    assert prefix and left_out and digest and not any(k.startswith(prefix) for k in state)
    checkpoint = {"state_dict": strategy.state_dict()}
    strategy.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(state)
    strategy.on_load_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(strategy.state_dict())


@pytest.mark.slow
def test_augmented_training_with_persistent_workers_resumes_to_the_run_without_workers(tmp_path):
    """Augmentation is seeded per (epoch, index): 2 persistent workers, interrupted and resumed, give the matrix
    of a run in the main process."""
    overrides = [*FINETUNE, "stream.augment=true", "trainer.deterministic=true"]
    full = run_experiment(tiny_config("finetune", tmp_path / "a", *overrides))
    cfg = tiny_config("finetune", tmp_path / "b", *overrides, "stream.num_workers=2")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_experiment(cfg, callbacks=[Fault(session=1, epoch=2)])
    broken = next((tmp_path / "b" / "finetune-digits").iterdir())
    assert torch.load(broken / "checkpoints" / "last.ckpt", weights_only=False)["cil_session"] == 1
    run_experiment(cfg, run_dir=broken)
    np.testing.assert_array_equal(
        load_run(broken).accuracy_matrix.to_numpy(), load_run(full).accuracy_matrix.to_numpy()
    )
