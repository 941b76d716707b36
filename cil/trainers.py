"""Lightning's side of a session: the Trainer as the ``trainer`` group configures it, its loggers, the process
group of a multi-device run, and the callbacks the session's fit runs with (session tag, step budget, the interval
checkpoint and its atomic writer)."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO

from cil import progress
from cil.config import ConfigError
from cil.io import atomic_write
from cil.runs import load_checkpoint


def make_trainer(cfg: DictConfig, root: Path | None = None, **kwargs) -> pl.Trainer:
    """A Lightning Trainer with the ``trainer`` group's accelerator, devices, strategy, precision.

    ``root``: the run folder, Lightning's ``default_root_dir``. Under SLURM, Lightning restores any
    ``hpc_ckpt_<n>.ckpt`` it finds there before a fit or predict, and its auto-requeue writes one there on SIGUSR1;
    cil switches the auto-requeue off (its own resume points, :mod:`cil.resume`, are exact) and points the lookup
    at the run folder, which holds no such file, so nothing outside the run folder is read or written.
    """
    t = cfg.trainer
    devices = OmegaConf.to_container(t, resolve=True)["devices"]
    plugins = list(kwargs.pop("plugins", []))
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar and progress.shown(),  # CIL_QUIET=1 silences Lightning's too
        enable_model_summary=False,
        default_root_dir=root,
        plugins=plugins or None,
        **kwargs,
    )


def setup_distributed(cfg: DictConfig) -> torch.device:
    """Start every process of a multi-device run now (Lightning's own launcher), so statistics passes and the
    run folder can use collectives before the first ``fit``. Returns this process's device."""
    trainer = make_trainer(cfg, logger=False, enable_checkpointing=False)
    if trainer.num_devices * trainer.num_nodes > 1 and not torch.distributed.is_initialized():
        launcher = trainer.strategy.launcher
        if launcher is not None and type(launcher).__name__ != "_SubprocessScriptLauncher":
            raise ConfigError(
                f"trainer.strategy={cfg.trainer.strategy!r} launches processes `cil run` cannot drive; use ddp"
            )
        if launcher is not None:  # Lightning starts the other ranks, which re-run this same command
            launcher.launch(lambda: None, trainer=trainer)
        # else torchrun or SLURM started every process already (Lightning reads their environment)
        trainer.strategy.setup_environment()
    return trainer.strategy.root_device


class SessionTag(Callback):
    """Marks Lightning checkpoints with their session, so ``--resume`` knows which session last.ckpt belongs to,
    and with the session's time so far (``began``: its ``perf_counter`` start), so its wall time survives a resume."""

    def __init__(self, session: int, began: float | None = None):
        self.session, self.began = session, began

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["cil_session"] = self.session
        if self.began is not None:
            checkpoint["cil_elapsed_s"] = time.perf_counter() - self.began


class StepBudget(Callback):
    """Stops a fit after ``steps`` optimiser steps (epochs cycle the data until then).

    Used instead of ``Trainer(max_steps=...)``: Lightning resumes iteration-based fits from an end-of-epoch
    checkpoint with a truncated epoch, so the resumed run would not replay the uninterrupted one.
    """

    def __init__(self, steps: int):
        self.steps = steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        # set as the last step starts (Lightning still runs it, then stops): ``training_step`` then knows it is
        # the last, and logs it (``CILModule.logs_this_step``)
        if trainer.global_step + 1 >= self.steps:
            trainer.should_stop = True


class IntervalCheckpoint(Callback):
    """The mid-session resume point: ``last.ckpt`` at an epoch end once ``minutes`` have passed since the fit
    started or since the last write (0: every epoch end), never at the fit's last epoch (the session checkpoint
    follows). Its cost is bounded by wall time, not by the number of epochs (DKVB's 2,000 per task). Only epoch
    ends: an epoch-end checkpoint resumes exactly (see ``EpochSeed``); a mid-epoch one would not."""

    def __init__(self, path: Path, minutes: float):
        self.path, self.seconds = path, 60.0 * minutes
        self.since = time.monotonic()
        self.writes = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.since = time.monotonic()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs > 0
        due = self.seconds == 0 or time.monotonic() - self.since >= self.seconds
        due = trainer.strategy.broadcast(due and not last_epoch and not trainer.should_stop, src=0)  # ranks agree
        if due:
            trainer.save_checkpoint(self.path)
            self.since, self.writes = time.monotonic(), self.writes + 1


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but through a temporary file and a rename. Its reader is PyTorch's safe
    loader, whatever Lightning asks for (``weights_only=True``; a resume point holds only tensors, containers and
    numbers). Given the resume point a fit restores (:class:`cil.resume.ResumePoint`, already read to find its
    session and epoch), it hands Lightning that checkpoint instead of reading the file a second time."""

    def __init__(self, resume: Any = None):
        super().__init__()
        self.resume = resume

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        if self.resume is not None and Path(path) == Path(self.resume.path):
            return self.resume.checkpoint
        return load_checkpoint(Path(path))


LOGGERS = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name: package


def check_loggers(names: Sequence[str]) -> None:
    """Every name known and its package installed: a ConfigError naming what to install, before any work."""
    for name in names:
        if name not in LOGGERS:
            raise ConfigError(f"trainer.loggers: unknown logger {name!r}; choose from {sorted(LOGGERS)}")
        package = LOGGERS[name]
        if package is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(f"trainer.loggers: {name} needs the {package} package (pip install {package})")


def make_loggers(cfg: DictConfig, logs: Path, version: str) -> list:
    """The session fit's Lightning loggers, as ``trainer.loggers`` names them (under the run folder's logs/)."""
    check_loggers(cfg.trainer.loggers)
    made = []
    for name in cfg.trainer.loggers:
        if name == "csv":
            made.append(CSVLogger(logs, name="csv", version=version))
        elif name == "tensorboard":
            made.append(TensorBoardLogger(logs, name="tb", version=version))
        elif name == "wandb":
            from pytorch_lightning.loggers import WandbLogger

            made.append(WandbLogger(name=f"{cfg.run.name}-{version}", save_dir=str(logs), group=str(cfg.run.name)))
        else:
            from pytorch_lightning.loggers import MLFlowLogger

            made.append(
                MLFlowLogger(experiment_name=str(cfg.run.name), run_name=version, save_dir=str(logs / "mlruns"))
            )
    return made
