"""Self-refined adapter retrieval (MOS, §1.7 of ``docs/methods/mos.md``): training-free, batched.

Each test sample starts from a first guess of its session ``j0`` (MOS: the session of the class predicted with
adapter 0's prototypes). Then, as in the official code: score the sample with adapter ``j``'s features through the
head; if the predicted class belongs to session ``j`` stop, else move to that class's session and try again, at
most ``max_iter`` head evaluations; the result is the last logits computed.

The batched form asks ``logits_for(j, rows)`` once per adapter and step, for only the samples that move to
adapter ``j`` and were not scored with it before: every (adapter, sample) pair is computed at most once, and a
sample costs as many adapter forwards as the adapters it visits (usually one or two), not one per stored
adapter as in the official code, which runs every adapter on the whole batch.
"""

from __future__ import annotations

from typing import Callable

import torch

from cil.layers.growing import Growing


def self_refined_retrieval(
    first_task: torch.Tensor,
    logits_for: Callable[[int, torch.Tensor], torch.Tensor],
    class_to_task: torch.Tensor,
    max_iter: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, task)`` per sample: the last head logits tried and the adapter they came from.

    ``first_task`` (batch,) long; ``logits_for(j, rows)`` gives the (len(rows), classes) head logits of the samples
    ``rows`` (a long tensor of batch positions) through adapter ``j``; ``class_to_task`` (classes,) maps a class
    to its session.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter={max_iter} must be >= 1")
    batch = len(first_task)
    task = first_task.clone()
    scored: dict[int, torch.Tensor] = {}  # adapter -> (batch, classes) logits, NaN rows not computed yet
    final = None
    active = torch.ones(batch, dtype=torch.bool, device=task.device)
    for step in range(max_iter):
        rows = torch.nonzero(active).flatten()
        z = None
        for j in task[rows].unique().tolist():
            mine = rows[task[rows] == j]
            missing = mine if j not in scored else mine[scored[j][mine, 0].isnan()]
            if len(missing):
                logits = logits_for(j, missing)
                if j not in scored:
                    scored[j] = logits.new_full((batch, logits.shape[1]), float("nan"))
                scored[j][missing] = logits
            if z is None:
                z = scored[j].new_empty(len(rows), scored[j].shape[1])
            z[task[rows] == j] = scored[j][mine]
        if final is None:
            final = torch.empty(batch, z.shape[1], dtype=z.dtype, device=z.device)
        final[rows] = z
        proposed = class_to_task.to(z.device)[z.argmax(1)]
        stop = (proposed == task[rows]) | (step + 1 >= max_iter)
        task[rows[~stop]] = proposed[~stop]
        active[rows[stop]] = False
        if not bool(active.any()):
            break
    return final, task


class SelfRefinedRetrieval(Growing):
    """The class-to-session table and the retrieval over it; the table is a buffer, so it is checkpointed."""

    def __init__(self, max_iter: int = 4):
        super().__init__()
        if max_iter < 1:
            raise ValueError(f"max_iter={max_iter} must be >= 1")
        self.max_iter = max_iter
        self.register_buffer("class_to_task", torch.zeros(0, dtype=torch.long))

    def add_task(self, num_seen: int, task: int) -> None:
        """Classes ``[known, num_seen)`` belong to session ``task``."""
        extra = num_seen - self.class_to_task.numel()
        self.class_to_task = torch.cat([self.class_to_task, self.class_to_task.new_full((max(extra, 0),), task)])

    def task_of(self, logits: torch.Tensor) -> torch.Tensor:
        """The session of each row's predicted class."""
        return self.class_to_task[logits.argmax(1)]

    def forward(
        self, first_logits: torch.Tensor, logits_for: Callable[[int], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Start from the session of ``first_logits``' predictions; see :func:`self_refined_retrieval`."""
        return self_refined_retrieval(self.task_of(first_logits), logits_for, self.class_to_task, self.max_iter)


__all__ = ["SelfRefinedRetrieval", "self_refined_retrieval"]
