"""Fine-tuning: the lower bound of class-incremental learning.

Each session trains the whole body and the growing head with cross-entropy over every class seen so far, on
the current session's data only; nothing protects old classes, so they are forgotten.

Needs from the user: ``begin_session``/``fit``/``end_session`` per session; the session's training data in the
loader passed to ``fit``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cil.module import CILModule
from cil.strategies.configs import FinetuneConfig


class Finetune(CILModule):
    def __init__(self, backbone: nn.Module, num_features: int | None = None, **settings: Any):
        super().__init__(backbone, num_features)
        self.save_settings(FinetuneConfig, settings)  # defaults and choices: FinetuneConfig
