"""Self-refined adapter retrieval (MOS, §1.7 of ``methods/mos.md``): training-free, batched.

Each test sample starts from a first guess of its session ``j0`` (MOS: the session of the class predicted with
adapter 0's prototypes). Then, as in the official code: score the sample with adapter ``j``'s features through the
head; if the predicted class belongs to session ``j`` stop, else move to that class's session and try again, at
most ``max_iter`` head evaluations; the result is the last logits computed.

The batched form asks ``logits_for(j)`` for a whole batch once per adapter it needs (cached), instead of one
forward pass per sample and step.
"""

from __future__ import annotations

from typing import Callable

import torch

from cil.module import Growing


def self_refined_retrieval(
    first_task: torch.Tensor,
    logits_for: Callable[[int], torch.Tensor],
    class_to_task: torch.Tensor,
    max_iter: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, task)`` per sample: the last head logits tried and the adapter they came from.

    ``first_task`` (batch,) long; ``logits_for(j)`` gives (batch, classes) logits of the whole batch with adapter
    ``j`` (called at most once per adapter); ``class_to_task`` (classes,) maps a class to its session.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter={max_iter} must be >= 1")
    cache: dict[int, torch.Tensor] = {}
    task = first_task.clone()
    active = torch.ones_like(task, dtype=torch.bool)
    final = None
    for step in range(max_iter):
        for j in task[active].unique().tolist():
            if j not in cache:
                cache[j] = logits_for(j)
        rows = torch.nonzero(active).flatten()
        z = torch.stack([cache[int(task[i])][i] for i in rows.tolist()])
        if final is None:
            final = torch.empty(len(task), z.shape[1], dtype=z.dtype, device=z.device)
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
