"""Progress bars for long work outside Lightning's loops (statistics passes, feature extraction, alignment), and the
run's one-line notes.

One rule for the bars: shown on rank 0 only, and silenced by ``trainer.enable_progress_bar=false`` (the session
loop calls :func:`set_enabled`), by ``TQDM_DISABLE=1`` (tqdm's own switch) or by ``CIL_QUIET=1``.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional

from tqdm.auto import tqdm

_enabled = True


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = bool(enabled)


def shown() -> bool:
    from cil.distributed import is_rank_zero

    off = os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes") or os.environ.get("CIL_QUIET") == "1"
    return _enabled and not off and is_rank_zero()


def progress(iterable: Optional[Iterable] = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` under the rule above."""
    return tqdm(iterable, disable=not shown(), **kwargs)


def note(message: str) -> None:
    """A ``[cil]`` line for the user (a file set aside, files skipped), printed once: on rank 0."""
    from cil.distributed import is_rank_zero

    if is_rank_zero():
        print(f"[cil] {message}", flush=True)


__all__ = ["note", "progress", "set_enabled", "shown"]
