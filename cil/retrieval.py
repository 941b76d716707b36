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


__all__ = ["self_refined_retrieval"]
