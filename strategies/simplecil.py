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

import torch
import torch.nn.functional as F
from torch import nn

from cil.distributed import all_reduce_sum
from cil.module import CILModule, Growing, Session
from cil.progress import progress
from cil.registry import register_strategy
from cil.strategies.configs import SimpleCILConfig


class ClassMeans(Growing):
    """Per-class feature sums and counts (float64), from which prototypes are the means."""

    def __init__(self, num_features: int):
        super().__init__()
        self.register_buffer("sums", torch.zeros(0, num_features, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(0, dtype=torch.float64))

    def grow(self, num_classes: int) -> None:
        extra = num_classes - self.counts.numel()
        if extra > 0:
            self.sums = torch.cat([self.sums, self.sums.new_zeros(extra, self.sums.shape[1])])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.sums.index_add_(0, labels, features.to(self.sums.dtype))
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=self.counts.dtype))

    def means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1).unsqueeze(1)

    def all_reduce(self) -> ClassMeans:
        """Sum over processes (each having fed its own shard)."""
        all_reduce_sum(self.sums)
        all_reduce_sum(self.counts)
        return self

    def adopt(self, other: ClassMeans, classes: list[int]) -> None:
        """Take ``classes``' sums and counts from ``other``; the other rows stay as they are."""
        self.sums[classes] = other.sums[classes].to(self.sums)
        self.counts[classes] = other.counts[classes].to(self.counts)

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each feature to each class mean (float64): a cosine classifier with sigma 1."""
        return F.normalize(features.to(torch.float64), dim=1) @ F.normalize(self.means(), dim=1).T


class SimpleCIL(CILModule):
    def __init__(self, backbone: nn.Module, num_features: int | None = None, metric: str = "cosine"):
        super().__init__(backbone, num_features)
        self.save_hyperparameters(ignore=["backbone"])
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


register_strategy("simplecil", SimpleCIL, SimpleCILConfig)
