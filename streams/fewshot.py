"""Few-shot class-incremental streams: a base session, then N-way K-shot sessions.

Two ways to choose the K shots:

- ``stream.shots=K``: seeded sampling, K training samples per class of every session after the base one
  (``B60-Inc5`` with ``shots=5`` is the CIFAR-100 FSCIL protocol: 60 base classes, then 8 sessions of 5-way 5-shot);
- ``stream.index_dir=DIR``: the standard FSCIL index lists (``session_1.txt`` is the base session, then
  ``session_2.txt`` ...), as shipped by CEC / xyutao's ``fscil``: one entry per line, either an integer index
  into the training set (CIFAR-100) or an image path whose file name identifies the sample (miniImageNet, CUB).

In both cases the test set of session t covers every class seen so far (``Stream.benchmark.test_stream``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from cil.config import ConfigError


def sample_shots(
    labels: Sequence[Any],
    sessions: list[list[Any]],
    shots: int,
    seed: int,
    first_fewshot: int = 1,
    base_shots: int | None = None,
) -> list[list[int]]:
    """Raw training indices per session: K per class from session ``first_fewshot`` on; before it every sample,
    or ``base_shots`` per class when given."""
    rng = np.random.default_rng(seed)
    by_class: dict[Any, list[int]] = {}
    for i, t in enumerate(labels):
        by_class.setdefault(t, []).append(i)
    out = []
    for s, classes in enumerate(sessions):
        idx: list[int] = []
        for c in classes:
            pool = by_class[c]
            k, key = (shots, "shots") if s >= first_fewshot else (base_shots, "base_shots")
            if k is None:
                idx += pool
                continue
            if len(pool) < k:
                raise ConfigError(f"stream.{key}={k} but class {c} has only {len(pool)} training samples")
            idx += sorted(rng.choice(pool, size=k, replace=False).tolist())
        out.append(idx)
    return out


def index_list_sessions(
    index_dir: str | Path, labels: Sequence[Any], sample_names: Callable[[int], str] | None
) -> tuple[list[list[int]], list[list[Any]]]:
    """Read ``session_1.txt`` ... from ``index_dir``: raw training indices and new classes per session."""
    index_dir = Path(index_dir)
    files = {
        int(m.group(1)): p
        for p in index_dir.glob("session_*.txt")
        if (m := re.fullmatch(r"session_(\d+)\.txt", p.name))
    }
    if not files:
        raise ConfigError(f"stream.index_dir='{index_dir}' holds no session_1.txt, session_2.txt, ... index lists")
    if sorted(files) != list(range(1, len(files) + 1)):
        raise ConfigError(f"stream.index_dir='{index_dir}': session files must be numbered 1..N, found {sorted(files)}")
    by_name: dict[str, int] | None = None
    sessions_idx, sessions_cls, seen = [], [], set()
    for t in range(1, len(files) + 1):
        idx = []
        for line_no, line in enumerate(files[t].read_text().splitlines(), 1):
            entry = line.strip()
            if not entry:
                continue
            if entry.isdigit():
                i = int(entry)
                if i >= len(labels):
                    raise ConfigError(f"{files[t]}:{line_no}: index {i} is beyond the {len(labels)} training samples")
            else:
                if sample_names is None:
                    raise ConfigError(
                        f"{files[t]}:{line_no}: '{entry}' is a path but this data set is indexed by integers"
                    )
                if by_name is None:
                    by_name = {sample_names(k): k for k in range(len(labels))}
                key = Path(entry).name
                if key not in by_name:
                    raise ConfigError(f"{files[t]}:{line_no}: no training image named '{key}' under stream.data_root")
                i = by_name[key]
            idx.append(i)
        new = []
        for i in idx:
            if labels[i] not in seen and labels[i] not in new:
                new.append(labels[i])
        if not new:
            raise ConfigError(f"{files[t]} brings no new class")
        seen.update(new)
        sessions_idx.append(idx)
        sessions_cls.append(new)
    return sessions_idx, sessions_cls
