"""A fixed simplex equiangular tight frame classifier and the dot-regression loss that trains toward it.

Mamba-FSCIL's head (``ETFHead``) and loss (``DRLoss``); see ``docs/methods/mamba_fscil.md``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class EtfClassifier(nn.Module):
    """A fixed simplex equiangular tight frame (Neural-Collapse-inspired FSCIL; Mamba-FSCIL's ``ETFHead``).

    ``etf`` (d, K) = sqrt(K / (K - 1)) U (I - 11ᵀ / K), with U the Q of a QR decomposition of a uniform random
    d x K matrix (numpy's generator, as the code): unit-norm columns with pairwise cosine -1 / (K - 1). It is a
    buffer, never trained, and checkpointed. Logits are ``x / ‖x‖ @ etf`` over the first ``num_seen`` classes.
    """

    def __init__(self, num_features: int, num_classes: int, seed: int = 0):
        super().__init__()
        if num_features < num_classes - 1:
            raise ValueError(f"an ETF of {num_classes} classes needs num_features >= {num_classes - 1}")
        rng = np.random.RandomState(seed)
        u, _ = np.linalg.qr(rng.random_sample((num_features, num_classes)))
        centred = np.eye(num_classes) - np.ones((num_classes, num_classes)) / num_classes
        etf = math.sqrt(num_classes / (num_classes - 1)) * u @ centred
        self.register_buffer("etf", torch.as_tensor(etf, dtype=torch.float32))
        self.num_seen = num_classes

    def grow(self, num_seen: int) -> None:
        self.num_seen = num_seen

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The class vectors w_y (B, d)."""
        return self.etf.T[labels]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features, dim=1) @ self.etf[:, : self.num_seen].to(features.dtype)


def dot_regression_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    etf: EtfClassifier,
    with_length: bool = False,
    weight: float = 10.0,
    all_labels: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dot-regression loss ``weight * 1/2 * mean_i (x̂_i · t_i - m_i)²`` toward the fixed ETF vectors.

    Without length targets t_i = w_{y_i} and m_i = 1. With them (``with_length``) t_i = r_{y_i} w_{y_i} and
    m_i = r_{y_i} = sqrt(γ / n_{y_i}): n_c counts class c in the batch, γ = batch size / number of classes in it,
    both over ``all_labels`` (the labels gathered from every process; this process's labels by default).
    """
    x = F.normalize(features, dim=1)
    target = etf.targets(labels).to(x.dtype)
    length = torch.ones(len(labels), dtype=x.dtype, device=x.device)
    if with_length:
        pool = labels if all_labels is None else all_labels.to(labels.device)
        classes, counts = pool.unique(return_counts=True)
        gamma = len(pool) / len(classes)
        n = counts[torch.searchsorted(classes, labels)].to(x.dtype)
        length = torch.sqrt(gamma / n)
        target = target * length.unsqueeze(1)
    dot = (x * target).sum(1)
    return weight * 0.5 * torch.mean((dot - length) ** 2)


__all__ = ["EtfClassifier", "dot_regression_loss"]
