"""Fine-tuning: the lower bound of class-incremental learning.

Each session trains the whole body and the growing head with cross-entropy over every class seen so far, on
the current session's data only; nothing protects old classes, so they are forgotten.

Needs from the user: ``begin_session``/``fit``/``end_session`` per session; the session's training data in the
loader passed to ``fit``.
"""

from __future__ import annotations

from torch import nn

from cil.module import CILModule


class Finetune(CILModule):
    def __init__(
        self,
        backbone: nn.Module,
        num_features: int | None = None,
        epochs: int = 5,
        lr: float = 0.01,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        scheduler: str = "cosine",
    ):
        super().__init__(backbone, num_features)
        self.save_hyperparameters(ignore=["backbone"])
