"""ZSCL: zero-shot continual learning of CLIP (Zheng et al., ICCV 2023), from the official code (Thunderbeee/ZSCL).

This file holds the method's building blocks (``methods/zscl.md`` §1), each a function of tensors:

- :func:`distillation_loss` — ``T² · mean_rows(-Σ softmax(t/T) log_softmax(z/T))``: the teacher's probabilities as
  soft targets (§1.7); used on the image side (each reference image over the reference captions) and on the text
  side (each caption over the batch's reference images, i.e. the transposed logits);
- :func:`weight_constraint` — ``Σ ‖θ - θ_start‖²``, a sum over every parameter (§1.3);
- :class:`WeightEnsemble` — the running *uniform* mean of the weights every I iterations, started from the task-start
  weights (§1.10);
- :func:`warmup_cosine` — the per-step learning-rate factor: linear warm-up then cosine to 0 (§1.11);
- :func:`text_classifier` — class embeddings from a text encoder: ``n(g(tok(template(c))))``, averaged over the
  templates and renormalised (one template in training, the data set's list at evaluation; §1.2, §2);
- :func:`read_captions` — the reference texts: one caption per line, or the Conceptual Captions TSV (§1.5).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cil.config import ConfigError


def distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 2.0):
    """KD(t, z; T) = T² · mean over rows of the cross-entropy of softmax(z/T) against softmax(t/T) (§1.7)."""
    targets = F.softmax(teacher_logits / temperature, dim=1)
    log_probs = F.log_softmax(student_logits / temperature, dim=1)
    return temperature**2 * -(targets * log_probs).sum(1).mean()


def weight_constraint(parameters: Iterable[nn.Parameter], anchors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``Σ_params ‖θ - θ_start‖²``: a sum, not a mean, as the code's ``--l2`` term."""
    terms = [(p - a.detach()).pow(2).sum() for p, a in zip(parameters, anchors)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


class WeightEnsemble:
    """The running uniform mean of a model's parameters (ZSCL's ``--we``).

    ``start(model)`` copies the task-start weights as the mean with count 0; ``update(model)`` (the code calls it
    after the optimiser step of iterations 0, I, 2I, ...) folds the current weights in: ``n ← n + 1`` then
    ``mean ← (n · mean + θ) / (n + 1)``, so after updates at k = 0, I, ..., 10 I the mean is
    ``(θ_start + Σ_j θ^(jI)) / 12``. Buffers are not averaged (CLIP has none that train).
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: list[torch.Tensor] = []

    @torch.no_grad()
    def start(self, model: nn.Module) -> None:
        self.count = 0
        self.mean = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.count += 1
        n = self.count
        for mean, p in zip(self.mean, model.parameters()):
            mean.mul_(n / (n + 1)).add_(p.detach(), alpha=1 / (n + 1))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the mean into ``model``: what is evaluated, saved and used as the next task's start."""
        for mean, p in zip(self.mean, model.parameters()):
            p.copy_(mean)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR factor of step k: ``(k + 1) / W`` for k < W, then ``0.5 (1 + cos(π (k - W) / (K - W)))`` (§1.11)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def text_classifier(
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """(classes, d) unit rows: per class, the normalised text embeddings of every template, averaged, renormalised.

    With one template this is the training classifier; with the data set's template list, the evaluation
    ensemble. Gradients flow into ``encode_text`` (the student's text tower trains through it).
    """
    if not templates:
        raise ValueError("text_classifier needs at least one template")
    rows = []
    for name in class_names:
        texts = [template.format(name) for template in templates]
        embeddings = F.normalize(encode_text(tokenize(texts)), dim=-1)
        rows.append(F.normalize(embeddings.mean(0), dim=-1))
    return torch.stack(rows)


def read_captions(path: str | Path) -> list[str]:
    """Captions from a text file (one per line) or the Conceptual Captions TSV (caption, then URL, per row).

    A missing or empty file is a :class:`ConfigError` naming it: ZSCL needs reference texts.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"reference captions file '{path}' not found (strategy.reference_captions)")
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix.lower() in (".tsv", ".csv") or "\t" in f.readline():
            f.seek(0)
            captions = [row[0].strip() for row in csv.reader(f, delimiter="\t") if row and row[0].strip()]
        else:
            f.seek(0)
            captions = [line.strip() for line in f if line.strip()]
    if not captions:
        raise ConfigError(f"reference captions file '{path}' holds no caption (strategy.reference_captions)")
    return captions


__all__ = [
    "WeightEnsemble",
    "distillation_loss",
    "read_captions",
    "text_classifier",
    "warmup_cosine",
    "weight_constraint",
]
