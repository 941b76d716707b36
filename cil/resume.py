"""Resume: where an interrupted run goes on from, read from its run folder.

Two resume points exist (see :mod:`cil.runs` for the folder): ``checkpoints/session_<k>.ckpt``, written after each
session, and Lightning's ``checkpoints/last.ckpt``, written at an epoch end at most every ``run.checkpoint_every``
minutes during a session's fit. ``cil run --resume`` restores the newest intact session checkpoint, then, if
``last.ckpt`` belongs to the session that follows, resumes that session's fit from it. Each file is read once: the
session checkpoint by :meth:`cil.runs.RunFolder.load_session`, ``last.ckpt`` by :func:`mid_session`, whose
:class:`ResumePoint` hands the loaded checkpoint to Lightning (``cil.trainers.AtomicCheckpointIO``) instead of
letting Lightning read the file again. An unreadable file (truncated by a full disk, say) is set aside as
``*.unreadable`` with a note, and the run goes on from the resume point before it, with the same result.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cil import distributed
from cil.errors import ConfigError
from cil.progress import note
from cil.runs import RunFolder, SessionCheckpoint, load_checkpoint

# what a person (Ctrl-C) or a scheduler sends to stop a job: SLURM sends SIGTERM at the time limit, on scancel and
# on preemption, and SIGUSR1/SIGUSR2 ahead of time when asked (sbatch --signal); PBS and LSF send SIGTERM too
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or a scheduler's signal: where it stopped, how to go on, and the exit status a
    shell gives for that signal (128 + its number: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, folder: Path, session: int, signum: int = signal.SIGINT):
        how = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
        super().__init__(f"{how} in session {session + 1}")
        self.folder, self.session, self.signum = folder, session, int(signum)
        self.exit_code = 128 + int(signum)


class StopSignals:
    """While a run goes, every signal of ``STOP_SIGNALS`` stops it the same way in every phase (training,
    statistics passes, evaluation): the handler raises ``KeyboardInterrupt`` where the run is, and the session
    loop turns whatever follows (Lightning's own shutdown exits, a loader worker killed by the same signal) into
    :class:`RunInterrupted`. Inside :meth:`deferred` (writing a session's checkpoint and results) a signal waits
    until the writing is done, so the run folder always holds a whole session. Lightning composes its own SIGTERM
    handler with this one during a fit; SLURM's auto-requeue is switched off (``cil.trainers.make_trainer``), so
    Lightning writes no ``hpc_ckpt`` outside the run folder: the resume point is the run folder's own."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferring = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers there only
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signum
        if not self._deferring:
            raise KeyboardInterrupt(signal.Signals(signum).name)

    @contextmanager
    def deferred(self):
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self.received is not None:
            raise KeyboardInterrupt(signal.Signals(self.received).name)

    def stopped(self, error: BaseException) -> bool:
        """Whether ``error`` ended the run because it was asked to stop."""
        return isinstance(error, KeyboardInterrupt) or self.received is not None

    def interrupted(self, folder: Path, session: int) -> RunInterrupted:
        return RunInterrupted(folder, session, self.received or signal.SIGINT)


@dataclass
class ResumePoint:
    """Lightning's ``last.ckpt`` of the session being resumed, loaded once: the epoch its fit goes on from, the
    session's seconds before the interruption, and the checkpoint itself for Lightning's restore."""

    path: Path
    checkpoint: dict

    @property
    def epoch(self) -> int:
        return int(self.checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])

    @property
    def elapsed_s(self) -> float:
        return float(self.checkpoint.get("cil_elapsed_s", 0.0))


def mid_session(folder: RunFolder, session: int) -> ResumePoint | None:
    """The resume point inside ``session`` if ``last.ckpt`` was written during it, else None."""
    path = folder.last_checkpoint
    if not path.is_file():
        return None
    try:  # memory-mapped: tensors are read from the file only as Lightning copies them into the model
        checkpoint = load_checkpoint(path, mmap=True)
        point = ResumePoint(path, checkpoint)
        point.epoch  # noqa: B018 - present in every resume point
    except ConfigError:  # refused by the safe loader: never set aside silently
        raise
    except Exception as e:
        note(f"{path} is unreadable ({type(e).__name__}); session {session + 1} starts again from its beginning")
        if distributed.is_rank_zero():
            path.replace(path.with_suffix(".unreadable"))
        distributed.barrier()
        return None
    return point if checkpoint.get("cil_session") == session else None


def newest_intact_session(folder: RunFolder) -> tuple[int, SessionCheckpoint | None]:
    """(sessions done, its checkpoint) for the newest session checkpoint that loads; an unreadable one is set
    aside with a note and the one before it (or the run's start: ``(0, None)``) is used."""
    done = distributed.broadcast_object(folder.completed_sessions())
    for k in range(done - 1, -1, -1):
        if not folder.session_checkpoint(k).is_file():
            continue
        try:
            return k + 1, folder.load_session(k)
        except ConfigError:
            raise
        except Exception as e:
            bad = folder.session_checkpoint(k)
            note(f"{bad} is unreadable ({type(e).__name__}); resuming from the checkpoint before it")
            distributed.barrier()
            if distributed.is_rank_zero():
                bad.replace(bad.with_suffix(".unreadable"))
    if done:
        note("no readable session checkpoint left: the run starts again from session 1 (same result)")
    return 0, None


def requeue_slurm_job(job_id: str) -> bool:
    """``scontrol requeue <job>``: SLURM starts the job's script again, whose ``cil run`` then resumes the run folder
    (:func:`requeued_run`). False where scontrol is missing or refuses."""
    import subprocess

    try:
        return subprocess.run(["scontrol", "requeue", job_id], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def requeued_run(cfg) -> Path | None:
    """In a requeued SLURM job (``SLURM_RESTART_COUNT`` ≥ 1) with ``run.requeue``: the incomplete run folder this job
    started with the same config, which ``cil run`` resumes instead of starting a new one; else None."""
    import json
    import os

    from cil.config import to_yaml

    job = distributed.slurm_job_id()
    if not cfg.run.requeue or job is None or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) < 1:
        return None
    config = to_yaml(cfg)
    base = Path(cfg.run.output_dir) / str(cfg.run.name)
    for path in sorted(base.glob("*"), reverse=True):  # newest first
        folder = RunFolder(path)
        try:
            env = json.loads((path / RunFolder.ENV).read_text())
            if env.get("slurm_job_id") == job and folder.config.read_text() == config and not folder.is_complete():
                return path
        except (OSError, ValueError):
            continue
    return None
