"""Batched self-refined retrieval against the official per-sample loop."""

from __future__ import annotations

import pytest
import torch

from cil.layers.retrieval import self_refined_retrieval


def per_sample(first, table, class_to_task, max_iter=4):
    """The official loop (MOS models/mos.py), one sample at a time."""
    out, tasks = [], []
    for i, j in enumerate(first.tolist()):
        count = 0
        while True:
            z = table[j][i]
            new = int(class_to_task[z.argmax()])
            count += 1
            if count >= max_iter or new == j:
                break
            j = new
        out.append(z)
        tasks.append(j)
    return torch.stack(out), torch.tensor(tasks)


def visited(j, table, class_to_task, i, max_iter):
    j, out = int(j), []
    for _ in range(max_iter):
        out.append(j)
        new = int(class_to_task[table[j][i].argmax()])
        if new == j:
            break
        j = new
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("max_iter", [1, 2, 4])
def test_batched_equals_the_per_sample_loop(seed, max_iter):
    g = torch.Generator().manual_seed(seed)
    sessions, per_session, batch = 6, 3, 64
    class_to_task = torch.arange(sessions).repeat_interleave(per_session)
    table = torch.randn(sessions, batch, sessions * per_session, generator=g)  # logits of each adapter
    first = torch.randint(0, sessions, (batch,), generator=g)
    calls = []

    def logits_for(j, rows):
        calls.extend((j, i) for i in rows.tolist())
        return table[j][rows]

    logits, task = self_refined_retrieval(first, logits_for, class_to_task, max_iter)
    expected_logits, expected_task = per_sample(first, table, class_to_task, max_iter)
    assert torch.equal(logits, expected_logits) and torch.equal(task, expected_task)
    assert len(calls) == len(set(calls))  # every (adapter, sample) pair computed at most once
    visits = {(j, i) for i in range(batch) for j in visited(first[i], table, class_to_task, i, max_iter)}
    assert set(calls) == visits  # and only the adapters each sample visits
    if max_iter > 1:
        assert (expected_task != first).any()  # the case exercises refinement, not only first guesses


def test_max_iter_must_be_positive():
    with pytest.raises(ValueError, match="max_iter=0"):
        self_refined_retrieval(
            torch.zeros(2, dtype=torch.long), lambda j, rows: torch.zeros(len(rows), 3), torch.zeros(3), 0
        )
