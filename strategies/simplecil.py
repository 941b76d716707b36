"""SimpleCIL (Zhou et al., "Revisiting class-incremental learning with pre-trained models", IJCV 2024).

The pre-trained backbone stays frozen and is never trained; after each session the classifier row of every new
class is its prototype, the mean backbone feature of its training samples, and logits are the cosine similarity
between a sample's feature and every prototype. With ``metric="euclidean"`` it is the nearest-class-mean (NCM)
baseline: logits are negative squared Euclidean distances to the class means.

Needs from the user: ``Session.loader_fn`` (a loader over the session's training data, evaluation transforms);
no ``fit`` is needed (``epochs_for`` is 0). Under DDP each process passes its own shard: the class sums and
counts are all-reduced, so prototypes are exactly those of one process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cil.layers.prototypes import ClassMeans
from cil.module import CILModule, Session
from cil.progress import progress
from cil.strategies.configs import SimpleCILConfig


class SimpleCIL(CILModule):
    def __init__(self, backbone: nn.Module, num_features: int | None = None, **settings: Any):
        super().__init__(backbone, num_features)
        self.save_settings(SimpleCILConfig, settings)  # defaults and choices: SimpleCILConfig
        self.class_means = ClassMeans(self.num_features)
        self.backbone.requires_grad_(False)
        del self.classifier  # the prototypes are the classifier

    def rebuildable_prefixes(self) -> tuple[str, ...]:
        return ("backbone.",)  # frozen, never in training mode: checkpoints leave it out

    def epochs_for(self, session: Session) -> int:
        return 0

    def begin_session(self, session: Session) -> None:
        self.session_index = session.index
        self.class_means.grow(session.num_seen)

    @torch.no_grad()
    def end_session(self, session: Session) -> None:
        """Prototypes of the new classes: the mean frozen feature of their training samples."""
        self.to(session.device).eval()
        fresh = ClassMeans(self.num_features).to(session.device)
        fresh.grow(session.num_seen)
        batches = progress(session.train_loader(), desc=f"prototypes s{session.index}")
        for batch in batches:
            x, y = batch[0].to(session.device), batch[1].to(session.device)
            fresh.update(self.backbone(x), y)
        self.class_means.adopt(fresh.all_reduce(), session.new_classes)

    @property
    def features_frozen(self) -> bool:
        return True  # the backbone is never trained: evaluation reuses each test image's features

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        if self.hparams.metric == "cosine":
            logits = self.class_means.cosine(features)
        else:
            logits = -torch.cdist(features.to(torch.float64), self.class_means.means()).pow(2)
        return logits.float()
