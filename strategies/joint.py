"""Joint training: the upper bound of class-incremental learning.

Each session trains body and head on the data of every session seen so far (continuing from the previous
session's weights, as Avalanche's ``Cumulative`` strategy does), so nothing is forgotten except what capacity
and optimisation lose.

Needs from the user: ``Session.seen_train_data`` (the training sets of sessions 0..k) — ``train_data(session)``
concatenates them; pass a loader over that to ``fit``.
"""

from __future__ import annotations

from torch.utils.data import ConcatDataset, Dataset

from cil.module import Session
from cil.strategies.finetune import Finetune


class Joint(Finetune):
    """Fine-tuning's training step and hyper-parameters, over the data of every session seen so far."""

    def train_data(self, session: Session) -> Dataset:
        if not session.seen_train_data:
            raise ValueError("joint training needs Session.seen_train_data (training sets of sessions 0..k)")
        return ConcatDataset(session.seen_train_data)
