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

from dataclasses import dataclass
from pathlib import Path

from cil import distributed
from cil.errors import ConfigError
from cil.progress import note
from cil.runs import RunFolder, SessionCheckpoint, load_checkpoint


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during a run: where it stopped and how to go on."""

    def __init__(self, folder: Path, session: int):
        super().__init__(f"interrupted in session {session + 1}")
        self.folder, self.session = folder, session


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
