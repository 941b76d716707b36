"""The session loop: for each session, ``begin_session`` → ``Trainer.fit`` → ``end_session`` → evaluation.

The loop never knows which strategy it drives. Evaluation after session i covers the test data of every
session (seen ones for the accuracy matrix, unseen ones for forward transfer unless ``trainer.eval_unseen`` is
false), counts a confusion matrix, and sums it across processes under DDP (Lightning's predict loop gives every
process a disjoint, unpadded share of the data, so nothing is counted twice).

Reproducibility: each session reseeds from ``(run.seed, session)`` and each epoch from
``(run.seed, session, epoch)``, and the training sampler shuffles from the same numbers. A run resumed from a
session checkpoint or from Lightning's ``last.ckpt`` (written at every epoch end) therefore replays exactly what
the uninterrupted run did.
"""

from __future__ import annotations

import os
import random
import resource
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch.utils.data import (
    BatchSampler,
    ConcatDataset,
    DataLoader,
    Dataset,
    RandomSampler,
    Subset,
    TensorDataset,
)

from cil import distributed
from cil.backbones import Transforms, data_transforms
from cil.config import ConfigError
from cil.features import ClassifyFeatures, FeaturesOf, FeatureStore, shard_key
from cil.io import atomic_write
from cil.module import CILModule, Session, create_strategy
from cil.runs import RunFolder, SessionRecord


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during a run: where it stopped and how to go on."""

    def __init__(self, folder: Path, session: int):
        super().__init__(f"interrupted in session {session + 1}")
        self.folder, self.session = folder, session


def derived_seed(*parts: int) -> int:
    """A seed for a (run seed, session, epoch) tuple; distinct tuples give distinct seeds."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochSeededSampler(RandomSampler):
    """A shuffling sampler whose order depends only on (seed, epoch); Lightning calls ``set_epoch``.

    Under DDP it is its own distributed sampler (the session loop's trainers set ``use_distributed_sampler=False``):
    each process takes every world-th index of the same permutation, padded to equal shares as PyTorch's
    ``DistributedSampler`` does, so the epoch a resumed fit starts at can be given up front (``epoch``).
    ``shuffle=False`` keeps the data's order (online streams). It subclasses ``RandomSampler`` so that a plain
    Lightning project recognises a shuffled loader (and, with its default settings, swaps in its own sampler
    under DDP).
    """

    def __init__(self, data: Dataset, seed: int, epoch: int = 0, shuffle: bool = True):
        super().__init__(data)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.data_source) // distributed.world_size())

    def __iter__(self):
        n = len(self.data_source)
        if self.shuffle:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        world = distributed.world_size()
        if world > 1:
            order += order[: len(self) * world - n]  # equal shares, as DistributedSampler pads
            order = order[distributed.rank() :: world]
        yield from order


class EveryItemBatchSampler(BatchSampler):
    """Batches of every item, as the official codes' ``DataLoader(drop_last=False)``, except that a last batch of
    a single item joins the batch before it: BatchNorm in training mode cannot normalise one sample. Only that case
    differs; a ragged last batch of two or more items stays as it is. ``drop_last=True`` drops it as PyTorch does.

    Lightning rebuilds it around a ``DistributedSampler`` under DDP (same constructor as ``BatchSampler``).
    """

    with_epoch = False

    def __iter__(self):
        batches = self._batches()
        if self.with_epoch:  # the sampler's epoch (ours or Lightning's DistributedSampler), read as it shuffles
            epoch = int(getattr(self.sampler, "epoch", 0))
            batches = ([(epoch, i) for i in batch] for batch in batches)
        yield from batches

    def _batches(self):
        if self.drop_last or self.batch_size == 1:
            yield from super().__iter__()
            return
        held = None
        for batch in super().__iter__():
            if held is not None and len(batch) == 1:
                batch = held + batch
            elif held is not None:
                yield held
            held = batch
        if held is not None:
            yield held

    def __len__(self) -> int:
        n, size = len(self.sampler), self.batch_size
        if self.drop_last:
            return n // size
        if size == 1:
            return n
        return n // size + (n % size > 1 or n == 1)


class SeededItems(Dataset):
    """Training items whose random augmentation is seeded by (run seed, session, epoch, index): the same draws in
    the main process or in any number of loader workers, persistent or not, and after a resume. The batch sampler
    passes ``(epoch, index)`` pairs (``EveryItemBatchSampler(..., with_epoch=True)``), so the epoch travels with
    the index to whichever process loads it; a plain index counts as epoch 0."""

    def __init__(self, data: Dataset, seed: int, session: int):
        self.data, self.seed, self.session = data, seed, session

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        epoch, index = item if isinstance(item, tuple) else (0, item)
        seed_all(derived_seed(self.seed, self.session, int(epoch), int(index)))
        return self.data[index]


def in_memory(data: Dataset) -> bool:
    """Tensors already in memory (cached features or maps): loader workers would only add start-up and copies."""
    while isinstance(data, Subset):
        data = data.dataset
    if isinstance(data, ConcatDataset):
        return all(in_memory(d) for d in data.datasets)
    return isinstance(data, TensorDataset)


class EpochItemBatchSampler(EveryItemBatchSampler):
    """The same batches of ``(epoch, index)`` pairs for ``SeededItems`` (a class of its own: Lightning rebuilds a
    batch sampler under DDP from its class, batch size and drop_last)."""

    with_epoch = True


class EpochSeed(Callback):
    """Reseed the global generators at each epoch and batch start (dropout; augmentation is seeded per item, see
    ``SeededItems``): a resumed epoch replays."""

    def __init__(self, seed: int, session: int):
        self.seed, self.session = seed, session

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed_all(derived_seed(self.seed, self.session, trainer.current_epoch))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        # and at each batch: a resumed fit creates its data iterator at another moment than an uninterrupted one
        # (which draws from the global generator), so only a per-batch seed makes dropout masks replay exactly
        seed_all(derived_seed(self.seed, self.session, trainer.current_epoch, batch_idx))


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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.steps:
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
    """Lightning's checkpoint writer, but through a temporary file and a rename."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_write(path, lambda tmp: super(AtomicCheckpointIO, self).save_checkpoint(checkpoint, tmp))


class ConfusionCollector(Callback):
    """Counts ``C[true, predicted]`` from ``predict_step``'s (predictions, targets), summed over processes."""

    def __init__(self, n_classes: int):
        self.n_classes = n_classes
        self.confusion = torch.zeros(n_classes * n_classes, dtype=torch.int64)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        predictions, targets = outputs
        index = targets.long().cpu() * self.n_classes + predictions.long().cpu()
        self.confusion += torch.bincount(index, minlength=self.n_classes**2)

    def on_predict_end(self, trainer, pl_module) -> None:
        total = trainer.strategy.reduce(self.confusion.to(pl_module.device), reduce_op="sum")
        self.confusion = total.cpu()

    def matrix(self) -> np.ndarray:
        return self.confusion.view(self.n_classes, self.n_classes).numpy()


def make_trainer(cfg: DictConfig, **kwargs) -> pl.Trainer:
    """A Lightning Trainer with the ``trainer`` group's accelerator, devices, strategy, precision."""
    t = cfg.trainer
    devices = OmegaConf.to_container(t, resolve=True)["devices"]
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        enable_model_summary=False,
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


class SkipUnreadable(Dataset):
    """``stream.skip_unreadable``: an item whose file cannot be read becomes None (``skipping_collate`` drops it from
    its batch), and its path is appended once to ``log`` (shared by loader workers and processes: one short append
    per file). Only the session loop's loaders skip; a strategy's own readers (ZSCL's reference images, DKVB's
    feature extraction) stop on such a file with the same one-line error."""

    def __init__(self, data: Dataset, log: Path | None):
        self.data, self.log = data, log
        self.seen: set[str] = set()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        from cil.errors import UnreadableSample

        try:
            return self.data[item]
        except UnreadableSample as e:
            if e.path not in self.seen:
                self.seen.add(e.path)
                if self.log is not None:
                    with open(self.log, "a") as f:
                        f.write(f"{e.path}\n")
            return None


def skipping_collate(batch: list):
    """PyTorch's collation of the items that could be read."""
    from torch.utils.data import default_collate

    from cil.errors import UnreadableSample

    kept = [item for item in batch if item is not None]
    if not kept:
        raise UnreadableSample(f"every sample of a batch of {len(batch)} is unreadable; see the skipped files list")
    return default_collate(kept)


SKIPPED_LOG: Path | None = None  # the run's skipped_files.txt while a run with stream.skip_unreadable is going


def _loader(data: Dataset, cfg: DictConfig, persistent: bool = False, **kwargs) -> DataLoader:
    """A loader with ``stream.num_workers`` workers, none for tensors already in memory; ``persistent`` keeps
    them for the whole fit (training) instead of starting them again every epoch."""
    workers = 0 if in_memory(data) else cfg.stream.num_workers
    if cfg.stream.skip_unreadable and not in_memory(data):
        data, kwargs["collate_fn"] = SkipUnreadable(data, SKIPPED_LOG), skipping_collate
    return DataLoader(data, num_workers=workers, persistent_workers=persistent and workers > 0, **kwargs)


def stats_loader(data: Dataset, cfg: DictConfig) -> DataLoader:
    """This process's disjoint share of ``data``, in order, for statistics passes."""
    return _loader(Subset(data, distributed.shard(len(data))), cfg, batch_size=cfg.stream.eval_batch_size)


def train_loader(
    data: Dataset, cfg: DictConfig, session: int, batch_size: int | None = None, start_epoch: int = 0
) -> DataLoader:
    """The session's training loader. ``start_epoch``: the epoch a resumed fit starts at. Lightning creates the
    first iterator before it sets the sampler's epoch, and loader workers draw their first batches from it at once,
    so the sampler must already know that epoch."""
    batch_size = batch_size or cfg.stream.batch_size
    # online: one sequence in the stream's order (already shuffled within each original session)
    sampler = EpochSeededSampler(data, derived_seed(cfg.run.seed, session), start_epoch, shuffle=not cfg.stream.online)
    augmented = not in_memory(data)  # items that may be augmented: seeded per (epoch, index) wherever they load
    batches = (EpochItemBatchSampler if augmented else EveryItemBatchSampler)(sampler, batch_size, cfg.stream.drop_last)
    if augmented:
        data = SeededItems(data, cfg.run.seed, session)
    # its own generator: creating the iterator then draws no number from the global generator, whose state must
    # not depend on whether the fit was resumed (a resumed fit creates its iterator at another moment)
    generator = torch.Generator().manual_seed(derived_seed(cfg.run.seed, session))
    return _loader(data, cfg, persistent=True, batch_sampler=batches, generator=generator)


def evaluate(
    strategy: CILModule, stream, session: int, cfg: DictConfig, store: FeatureStore | None = None
) -> np.ndarray:
    """Confusion matrix over the test data of sessions 0..session (all sessions with ``eval_unseen``).

    Each process predicts its own share of each test set (``stats_loader``: disjoint, unpadded). With a ``store``
    and a strategy whose features are frozen, it classifies the stored features of each test set instead, computing
    them (with the same batches) only where the store has none: the same predictions, one body pass per run."""
    upto = stream.n_sessions if cfg.trainer.eval_unseen else session + 1
    sets = list(stream.eval_data[:upto])
    collector = ConfusionCollector(stream.n_classes)
    evaluator = make_trainer(
        cfg, logger=False, enable_checkpointing=False, callbacks=[collector], use_distributed_sampler=False
    )
    if store is not None and strategy.features_frozen:
        loaders = stored_features(strategy, sets, cfg, store)
        evaluator.predict(ClassifyFeatures(strategy), dataloaders=loaders, return_predictions=False)
    else:
        loaders = [stats_loader(data, cfg) for data in sets]
        evaluator.predict(strategy, dataloaders=loaders, return_predictions=False)
    return collector.matrix()


def stored_features(strategy: CILModule, sets: list[Dataset], cfg: DictConfig, store: FeatureStore) -> list[DataLoader]:
    """Loaders over the stored frozen features of this process's share of each data set, in the batches
    ``stats_loader`` gives; features missing from the store are computed first (one Lightning predict)."""
    batch = cfg.stream.eval_batch_size
    digest = strategy.features_digest()
    keys = [store.key(digest, data, *shard_key(batch)) for data in sets]
    found = [store.get(key) for key in keys]
    todo = [i for i, f in enumerate(found) if f is None]
    if todo:
        extractor = make_trainer(cfg, logger=False, enable_checkpointing=False, use_distributed_sampler=False)
        outputs = extractor.predict(FeaturesOf(strategy), dataloaders=[stats_loader(sets[i], cfg) for i in todo])
        outputs = [outputs] if len(todo) == 1 else outputs  # Lightning unwraps a single loader's outputs
        for i, batches in zip(todo, outputs):
            features = torch.cat([f for f, _ in batches]) if batches else torch.empty(0)
            labels = torch.cat([y for _, y in batches]) if batches else torch.empty(0, dtype=torch.long)
            store.put(keys[i], features, labels)
            found[i] = (features, labels)
    return [DataLoader(TensorDataset(*f), batch_size=batch) for f in found]


def _peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _barrier() -> None:
    if distributed.is_distributed():
        torch.distributed.barrier()


def stream_transforms(backbone: torch.nn.Module, cfg: DictConfig, **stream_defaults: Any) -> Transforms:
    """The backbone's transforms as the config asks; a stream's defaults (``crop_pct``) yield to the config's."""
    kwargs = {
        **stream_defaults,
        "augment_kwargs": OmegaConf.to_container(cfg.stream.augment_kwargs),
        "normalize": cfg.stream.normalize,
        "interpolation": cfg.stream.interpolation,
        "crop_mode": cfg.stream.crop_mode,
        "mean": None if cfg.stream.mean is None else list(cfg.stream.mean),
        "std": None if cfg.stream.std is None else list(cfg.stream.std),
    }
    if cfg.stream.crop_pct is not None:
        kwargs["crop_pct"] = cfg.stream.crop_pct
    return data_transforms(backbone, cfg.backbone.image_size, cfg.stream.augment, **kwargs)


def run_experiment(
    cfg: DictConfig, run_dir: str | Path | None = None, callbacks: Sequence[Callback] = (), stream: Any = None
) -> Path:
    """Run the experiment of a validated config, or resume the one in ``run_dir``; returns the run folder.

    ``callbacks`` are added to every session's ``Trainer.fit`` (tests use one to inject a fault). ``stream``: a
    stream built elsewhere (:func:`cil.interop.run_benchmark`) instead of the one ``cfg.stream`` names.
    """
    resume = run_dir is not None
    from cil.progress import set_enabled

    set_enabled(cfg.trainer.enable_progress_bar)  # the statistics passes' bars follow Lightning's switch
    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    strategy = create_strategy(cfg)
    transforms = partial(stream_transforms, strategy.backbone, cfg)
    from cil.streams import create_stream, unlabelled_data

    # the stream is built (and Avalanche imported) before the process group exists: Avalanche refuses to
    # create its default loggers in a non-main process of an initialised process group
    stream = stream if stream is not None else create_stream(cfg.stream, transforms)
    unlabelled = unlabelled_data(cfg.stream, transforms, stream)
    device = setup_distributed(cfg)

    if resume:
        folder = RunFolder(run_dir)
    else:
        folder = RunFolder(RunFolder.new_path(cfg))
        if distributed.is_rank_zero():
            folder.create(cfg)  # atomically: another run may have taken the same timestamp meanwhile
        folder = RunFolder(distributed.broadcast_object(str(folder.path)))
    start, records = 0, []
    if resume:
        start, state, digest, records = _newest_intact_session(folder)
        if start > 0:
            strategy.load_checked(strategy.complete_state(state, digest))
            strategy.session_index = start - 1
        if distributed.is_rank_zero():
            folder.note_resume(cfg)
    global SKIPPED_LOG
    SKIPPED_LOG = folder.path / "skipped_files.txt" if cfg.stream.skip_unreadable else None
    # a frozen body's test features, computed once per run (in memory, or on disk under the run folder)
    store = FeatureStore(folder.path / "features", cfg.run.feature_memory_mb) if cfg.run.reuse_features else None
    info = {"strategy": cfg.strategy.name, "stream": cfg.stream.name, "run_dir": str(folder.path)}
    if stream.task_names:
        info["task_names"] = list(stream.task_names)

    plotted = time.monotonic()
    for k in range(start, stream.n_sessions):
        seed_all(derived_seed(cfg.run.seed, k))
        session = Session(
            index=k,
            new_classes=list(stream.classes_per_session[k]),
            seen_classes=stream.seen_classes(k),
            train_data=stream.train_data[k],
            seen_train_data=list(stream.train_data[: k + 1]),
            loader_fn=partial(stats_loader, stream.stats_data[k], cfg),
            device=device,
            class_names=list(stream.class_names),
            session_classes=[list(c) for c in stream.classes_per_session],
            templates=[list(t) for t in stream.templates] if stream.templates else [],
            unlabelled_data=unlabelled,
        )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        try:
            strategy.begin_session(session)
            epochs = strategy.epochs_for(session)
            trainable = strategy.num_trainable_parameters()
            if epochs > 0:
                resume_from = _mid_session(folder, k)
                began -= _elapsed_before(resume_from)  # the session's time before the interruption counts too
                steps = strategy.steps_for(session)
                _fit(strategy, session, epochs, cfg, folder, list(callbacks), resume_from, steps, began)
            strategy.end_session(session)
        except KeyboardInterrupt:
            raise RunInterrupted(folder.path, k) from None
        wall = time.perf_counter() - began
        began = time.perf_counter()
        try:
            confusion = evaluate(strategy, stream, k, cfg, store)
        except KeyboardInterrupt:
            raise RunInterrupted(folder.path, k) from None
        records.append(
            SessionRecord(
                session=k,
                confusion=confusion.tolist(),
                epochs=epochs,
                trainable_params=trainable,
                wall_time_s=round(wall, 3),
                eval_time_s=round(time.perf_counter() - began, 3),
                peak_memory_mb=round(_peak_memory_mb(), 1),
                peak_gpu_memory_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1)
                if torch.cuda.is_available()
                else None,
            )
        )
        if distributed.is_rank_zero():
            state, digest = strategy.checkpoint_state()  # without the frozen tensors the config rebuilds
            folder.save_session(k, state, records, digest)
            keep = cfg.run.keep_session_checkpoints
            for old in folder.checkpoints.glob("session_*.ckpt"):
                if not keep and old != folder.session_checkpoint(k):
                    old.unlink()
            folder.last_checkpoint.unlink(missing_ok=True)
            # plots cost about 0.6 s: at the end, and between sessions at most once a minute (a 50-session stream of
            # cached features would otherwise spend more time drawing than learning)
            plots = k == stream.n_sessions - 1 or time.monotonic() - plotted >= 60
            summary = folder.write_results(
                records, stream.classes_per_session, stream.eval_counts(), info, cfg.trainer.eval_unseen, plots
            )
            plotted = time.monotonic() if plots else plotted
            _print_session(summary, k)
            _note_skipped(k)
        _barrier()
    if store is not None:
        store.clear()  # the run is complete: its stored features are no longer needed
    return folder.path


def _note_skipped(k: int) -> None:
    if SKIPPED_LOG is not None and SKIPPED_LOG.is_file():
        skipped = set(SKIPPED_LOG.read_text().splitlines())
        _note(f"session {k + 1}: {len(skipped)} unreadable file(s) skipped so far (listed in {SKIPPED_LOG})")


def _mid_session(folder: RunFolder, session: int) -> Path | None:
    """Lightning's last.ckpt if it was written during ``session`` (resume mid-session), else None. An unreadable
    one (truncated by a full disk, say) is set aside with a note: the session starts again, with the same result."""
    path = folder.last_checkpoint
    if not path.is_file():
        return None
    try:  # memory-mapped: only the tag is read here; Lightning loads the weights itself when it resumes
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        tag = state.get("cil_session")
        state["loops"]["fit_loop"]["epoch_progress"]  # noqa: B018 - present in every resume point
    except Exception as e:
        _note(f"{path} is unreadable ({type(e).__name__}); session {session + 1} starts again from its beginning")
        if distributed.is_rank_zero():
            path.replace(path.with_suffix(".unreadable"))
        _barrier()
        return None
    return path if tag == session else None


def _newest_intact_session(folder: RunFolder) -> tuple[int, dict, str | None, list]:
    """(sessions done, state, rebuilt-tensor digest, records) of the newest session checkpoint that loads; an
    unreadable one is set aside with a note and the one before it (or the run's start) is used."""
    done = distributed.broadcast_object(folder.completed_sessions())
    for k in range(done - 1, -1, -1):
        if not folder.session_checkpoint(k).is_file():
            continue
        try:
            state, records = folder.load_session(k)
            return k + 1, state, folder.rebuilt_digest(k), records
        except Exception as e:
            bad = folder.session_checkpoint(k)
            _note(f"{bad} is unreadable ({type(e).__name__}); resuming from the checkpoint before it")
            _barrier()
            if distributed.is_rank_zero():
                bad.replace(bad.with_suffix(".unreadable"))
    if done:
        _note("no readable session checkpoint left: the run starts again from session 1 (same result)")
    return 0, {}, None, []


def _note(message: str) -> None:
    if distributed.is_rank_zero():
        print(f"[cil] {message}", flush=True)


def _elapsed_before(checkpoint: Path | None) -> float:
    """Seconds the session had run when ``checkpoint`` was written (0 for a fresh start)."""
    if checkpoint is None:
        return 0.0
    return float(torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True).get("cil_elapsed_s", 0.0))


LOGGERS = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # name: package


def check_loggers(names: Sequence[str]) -> None:
    """Every name known and its package installed: a ConfigError naming what to install, before any work."""
    import importlib.util

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


def _start_epoch(checkpoint: Path | None) -> int:
    """The epoch a fit resumed from ``checkpoint`` starts at (0 for a fresh fit)."""
    if checkpoint is None:
        return 0
    state = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    return int(state["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])


def _fit(strategy, session, epochs, cfg, folder, callbacks, resume_from, steps=None, began=None) -> None:
    logs = folder.path / "logs"
    version = f"session_{session.index}" + ("-resumed" if resume_from else "")  # keep the interrupted logs
    trainer = make_trainer(
        cfg,
        max_epochs=epochs if steps is None else -1,  # a step budget cycles the data as often as it needs
        logger=make_loggers(cfg, logs, version),
        callbacks=[
            # one rolling "last.ckpt" at most every run.checkpoint_every minutes: the mid-session resume point
            IntervalCheckpoint(folder.last_checkpoint, cfg.run.checkpoint_every),
            SessionTag(session.index, began),
            EpochSeed(cfg.run.seed, session.index),
            *([StepBudget(steps)] if steps is not None else []),
            *callbacks,
        ],
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,  # EpochSeededSampler shards itself
        enable_checkpointing=False,  # IntervalCheckpoint writes the resume point
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        num_sanity_val_steps=0,
    )
    data = strategy.train_data(session)
    loader = train_loader(data, cfg, session.index, strategy.batch_size_for(session), _start_epoch(resume_from))
    try:
        trainer.fit(strategy, train_dataloaders=loader, ckpt_path=resume_from)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1) after its own shutdown
            raise KeyboardInterrupt from None
        raise


def _print_session(summary: dict, k: int) -> None:
    seen = summary["metrics"].get("last_acc", {}).get("value")
    if seen is not None and os.environ.get("CIL_QUIET") != "1":
        print(f"[cil] session {k + 1}/{summary['n_sessions']}: accuracy on seen classes {100 * seen:.2f}%")
