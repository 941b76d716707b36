"""The session loop: for each session, ``begin_session`` → ``Trainer.fit`` → ``end_session`` → evaluation → the
run folder's results and session checkpoint.

The loop never knows which strategy it drives. Its parts live one floor down, each in its own module: seeds,
samplers and loaders in :mod:`cil.loaders`, the Trainer, its loggers and callbacks in :mod:`cil.trainers`, the
confusion matrix after each session in :mod:`cil.evaluation`, the resume points in :mod:`cil.resume`, and the run
folder's layout in :mod:`cil.runs`. A run resumed from a session checkpoint, or from Lightning's ``last.ckpt``
(written at an epoch end at most every ``run.checkpoint_every`` minutes), replays exactly what the uninterrupted
run did.
"""

from __future__ import annotations

import json
import os
import resource
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback

from cil import distributed, loaders
from cil.errors import ConfigError
from cil.evaluation import evaluate
from cil.features import FeatureStore, stream_fingerprint
from cil.loaders import EpochSeed, derived_seed, seed_all, stats_loader, stream_transforms, train_loader
from cil.module import Session, create_strategy
from cil.progress import note
from cil.resume import ResumePoint, StopSignals, mid_session, newest_intact_session
from cil.runs import RunFolder, SessionRecord
from cil.trainers import (
    AtomicCheckpointIO,
    IntervalCheckpoint,
    SessionTag,
    StepBudget,
    make_loggers,
    make_trainer,
    setup_distributed,
)


def _peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def run_experiment(
    cfg: DictConfig, run_dir: str | Path | None = None, callbacks: Sequence[Callback] = (), stream: Any = None
) -> Path:
    """Run the experiment of a validated config, or resume the one in ``run_dir``; returns the run folder.

    ``callbacks`` are added to every session's ``Trainer.fit`` (tests use one to inject a fault). ``stream``: a
    stream built elsewhere (:func:`cil.interop.run_benchmark`) instead of the one ``cfg.stream`` names.
    """
    resume = run_dir is not None
    # one process at a time per run folder (a second `cil run --resume` is refused, naming the holder), checked
    # before any work for a resumed run
    lock = RunFolder(run_dir).lock() if resume and distributed.is_rank_zero() else None
    try:
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
                lock = folder.lock()
            folder = RunFolder(distributed.broadcast_object(str(folder.path)))
        return _run(folder, resume, cfg, strategy, stream, unlabelled, device, callbacks)
    finally:
        if lock is not None:
            lock.close()


def _run(folder, resume, cfg, strategy, stream, unlabelled, device, callbacks) -> Path:
    """The loop of :func:`run_experiment` once its run folder is held."""
    start, records = 0, []
    fingerprint = stream_fingerprint(stream)
    if resume:
        start, done = newest_intact_session(folder)
        if (
            done is not None
            and None not in (done.stream_fingerprint, fingerprint)
            and done.stream_fingerprint != fingerprint
        ):
            raise ConfigError(
                f"the data of run folder '{folder.path}' changed since it was interrupted (files under "
                "stream.data_root added, deleted or modified, or their preprocessing after a package upgrade): a "
                "resumed run would mix two data sets; restore them or start a new run"
            )
        if done is not None:
            strategy.load_checked(strategy.complete_state(done.state_dict, done.rebuilt_digest))
            strategy.session_index = start - 1
            records = done.records
        if distributed.is_rank_zero():
            folder.note_resume(cfg)
    loaders.SKIPPED_LOG = folder.skipped_files if cfg.stream.skip_unreadable else None
    # a frozen body's test features, computed once per run (in memory, or on disk under the run folder)
    store = FeatureStore(folder.features, cfg.run.feature_memory_mb) if cfg.run.reuse_features else None
    info = {"strategy": cfg.strategy.name, "stream": cfg.stream.name, "run_dir": str(folder.path)}
    if stream.task_names:
        info["task_names"] = list(stream.task_names)

    plotted = [time.monotonic()]  # when the plots were last drawn
    with StopSignals() as stop:
        for k in range(start, stream.n_sessions):
            try:
                records.append(_session(strategy, stream, k, cfg, folder, callbacks, unlabelled, device, store))
            except BaseException as error:
                if stop.stopped(error):  # Ctrl-C, a scheduler's signal, Lightning's shutdown exit that follows it
                    raise stop.interrupted(folder.path, k) from None
                raise
            try:
                with stop.deferred():  # a whole session's checkpoint and results, or none
                    _save_session(strategy, k, records, stream, cfg, folder, info, plotted, fingerprint)
            except KeyboardInterrupt:
                raise stop.interrupted(folder.path, k) from None
            distributed.barrier()
    if start == stream.n_sessions and records and distributed.is_rank_zero():
        # every session was done before this resume: rebuild the results from the checkpoint's records (a summary
        # truncated by a crash, plots a kill interrupted)
        folder.write_results(records, stream.classes_per_session, stream.eval_counts(), info, cfg.trainer.eval_unseen)
        note(f"every session was done: results rebuilt from {folder.session_checkpoint(start - 1).name}")
    if store is not None:
        store.clear()  # the run is complete: its stored features are no longer needed
    return folder.path


def _session(strategy, stream, k, cfg, folder, callbacks, unlabelled, device, store) -> SessionRecord:
    """Session ``k``: begin, fit (resumed from ``last.ckpt`` if it belongs to this session), end, evaluate."""
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
        batch_size=cfg.stream.batch_size,
        make_loggers=partial(_session_loggers, cfg, folder, k),
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    strategy.begin_session(session)
    epochs = strategy.epochs_for(session)
    trainable = strategy.num_trainable_parameters()
    if epochs > 0:
        resume_from = mid_session(folder, k)
        if resume_from is not None:
            began -= resume_from.elapsed_s  # the session's time before the interruption counts too
        steps = strategy.steps_for(session)
        _fit(strategy, session, epochs, cfg, folder, list(callbacks), resume_from, steps, began)
    strategy.end_session(session)
    wall = time.perf_counter() - began
    began = time.perf_counter()
    confusion = evaluate(strategy, stream, k, cfg, store, root=folder.path)
    return SessionRecord(
        session=k,
        confusion=confusion.tolist(),
        epochs=strategy.epochs_trained(session),
        trainable_params=trainable,
        wall_time_s=round(wall, 3),
        eval_time_s=round(time.perf_counter() - began, 3),
        peak_memory_mb=round(_peak_memory_mb(), 1),
        peak_gpu_memory_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
    )


def _save_session(strategy, k, records, stream, cfg, folder, info, plotted: list[float], fingerprint=None) -> None:
    """Session ``k``'s checkpoint, then the run's results so far (rank 0); the mid-session resume point goes."""
    if not distributed.is_rank_zero():
        return
    state, digest = strategy.checkpoint_state()  # without the frozen tensors the config rebuilds
    folder.save_session(k, state, records, digest, fingerprint)
    keep = cfg.run.keep_session_checkpoints
    for j, old in folder.session_checkpoints().items():
        if not keep and j != k:
            old.unlink()
    folder.last_checkpoint.unlink(missing_ok=True)
    # plots cost about 0.6 s: at the end, and between sessions at most once a minute (a 50-session stream of
    # cached features would otherwise spend more time drawing than learning)
    plots = k == stream.n_sessions - 1 or time.monotonic() - plotted[0] >= 60
    summary = folder.write_results(
        records, stream.classes_per_session, stream.eval_counts(), info, cfg.trainer.eval_unseen, plots
    )
    if plots:
        plotted[0] = time.monotonic()
    _print_session(summary, k)
    _note_skipped(k)


def _note_skipped(k: int) -> None:
    log = loaders.SKIPPED_LOG
    if log is not None and log.is_file():
        skipped = {json.loads(line)["path"] for line in log.read_text().splitlines() if line.strip()}
        note(f"session {k + 1}: {len(skipped)} unreadable file(s) skipped so far (listed in {log})")


def _session_loggers(cfg, folder, k: int, resumed: bool = False) -> list:
    """Session ``k``'s Lightning loggers under the run folder's logs/, in a version of their own: a resumed or
    restarted session writes a new version, so the interrupted attempt's logs stay (Lightning would delete a
    reused version's)."""
    base = f"session_{k}" + ("-resumed" if resumed else "")
    version, n = base, 1
    while any((folder.logs / kind / version).exists() for kind in ("csv", "tb")):
        n += 1
        version = f"{base}-{n}"
    return make_loggers(cfg, folder.logs, version)


def _fit(
    strategy, session, epochs, cfg, folder, callbacks, resume_from: ResumePoint | None, steps=None, began=None
) -> None:
    trainer = make_trainer(
        cfg,
        folder.path,
        max_epochs=epochs if steps is None else -1,  # a step budget cycles the data as often as it needs
        logger=_session_loggers(cfg, folder, session.index, resumed=resume_from is not None),
        callbacks=[
            # one rolling "last.ckpt" at most every run.checkpoint_every minutes: the mid-session resume point
            IntervalCheckpoint(folder.last_checkpoint, cfg.run.checkpoint_every),
            SessionTag(session.index, began),
            EpochSeed(cfg.run.seed, session.index),
            *([StepBudget(steps)] if steps is not None else []),
            *callbacks,
        ],
        plugins=[AtomicCheckpointIO(resume_from)],  # hands Lightning the resume point already read
        use_distributed_sampler=False,  # EpochSeededSampler shards itself
        enable_checkpointing=False,  # IntervalCheckpoint writes the resume point
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        num_sanity_val_steps=0,
    )
    data = strategy.train_data(session)
    start_epoch = 0 if resume_from is None else resume_from.epoch
    loader = train_loader(data, cfg, session.index, strategy.batch_size_for(session), start_epoch)
    try:
        trainer.fit(strategy, train_dataloaders=loader, ckpt_path=None if resume_from is None else resume_from.path)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into exit(1) after its own shutdown
            raise KeyboardInterrupt from None
        raise


def _print_session(summary: dict, k: int) -> None:
    seen = summary["metrics"].get("last_acc", {}).get("value")
    if seen is not None and os.environ.get("CIL_QUIET") != "1":
        print(f"[cil] session {k + 1}/{summary['n_sessions']}: accuracy on seen classes {100 * seen:.2f}%")
