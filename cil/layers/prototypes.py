"""Class prototypes: per-class feature means from streaming sums, mergeable across processes.

SimpleCIL's classifier, and the prototypes MOS and Mamba-FSCIL keep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cil.distributed import all_reduce_sum
from cil.layers.growing import Growing


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
