"""Continual-learning metrics as pure functions of the accuracy matrix (and test-set sizes).

Notation: ``T`` sessions, ``R[i, j]`` = accuracy on the test data of the classes new in session ``j`` after
training session ``i`` (0-based; entries with ``j > i`` are the accuracy on not-yet-seen classes, NaN when not
evaluated). ``n[j]`` = number of test samples of session ``j``. Accuracies are fractions in [0, 1].

Every number the framework reports (CSV, JSON, plots, notebook, README) is computed here, once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

DEFINITIONS = {
    "avg_incremental_acc": "mean over i of A_i, A_i = sum_{j<=i} n_j R[i,j] / sum_{j<=i} n_j (Rebuffi et al.)",
    "last_acc": "A_{T-1}: accuracy on every class after the last session (sample-weighted)",
    "forgetting": "mean over j<T-1 of max_{l<T-1} R[l,j] - R[T-1,j] (Chaudhry et al., 2018)",
    "bwt": "mean over j<T-1 of R[T-1,j] - R[j,j] (backward transfer, Lopez-Paz & Ranzato, 2017)",
    "fwt": "mean over j>=1 of R[j-1,j] - b_j, b_j = accuracy before any training (0 for a growing head: "
    "it cannot predict classes it has not seen) (forward transfer, Lopez-Paz & Ranzato, 2017)",
    "last_old_acc": "after the last session: accuracy on the classes of sessions < T-1 (sample-weighted)",
    "last_new_acc": "after the last session: accuracy on the classes of session T-1",
    "last_harmonic_mean": "2·old·new / (old + new) after the last session (FSCIL)",
    "last_base_acc": "after the last session: accuracy on the classes of session 0 (FSCIL's base classes)",
    "last_novel_acc": "after the last session: accuracy on the classes of sessions >= 1 (FSCIL's novel classes)",
    "performance_drop": "A_0 - A_{T-1}: seen-class accuracy lost from the base session to the last (FSCIL's PD)",
    "mtil_transfer": "mean over j>=1 of (mean over i<j of R[i,j]) (ZSCL's MTIL Transfer)",
    "mtil_avg": "mean over j of (mean over all i of R[i,j]) (ZSCL's MTIL Avg)",
    "mtil_last": "mean over j of R[T-1,j] (ZSCL's MTIL Last)",
}


def accuracy(predictions: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> float:
    """Fraction of predictions equal to their targets."""
    p, t = np.asarray(predictions), np.asarray(targets)
    return float((p == t).mean()) if t.size else float("nan")


def confusion_matrix(predictions, targets, n_classes: int) -> np.ndarray:
    """``C[true, predicted]`` counts."""
    t, p = np.asarray(targets, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def accuracy_row(confusion: np.ndarray, classes_per_session: Sequence[Sequence[int]]) -> np.ndarray:
    """One row of R from a confusion matrix: accuracy on each session's classes (NaN where no samples)."""
    confusion = np.asarray(confusion)
    row = []
    for classes in classes_per_session:
        total = confusion[classes].sum()
        row.append(confusion[classes, classes].sum() / total if total else np.nan)
    return np.array(row, dtype=float)


def seen_accuracy(R: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """``A_i = Σ_{j≤i} n_j R[i, j] / Σ_{j≤i} n_j``: accuracy on every seen class after session i."""
    R, n = np.asarray(R, dtype=float), np.asarray(counts, dtype=float)
    return np.array([(R[i, : i + 1] * n[: i + 1]).sum() / n[: i + 1].sum() for i in range(R.shape[0])])


def average_incremental_accuracy(R: np.ndarray, counts: Sequence[int]) -> float:
    """``(1/T) Σ_i A_i`` (Rebuffi et al., iCaRL)."""
    return float(seen_accuracy(R, counts).mean())


def last_accuracy(R: np.ndarray, counts: Sequence[int]) -> float:
    """``A_{T-1}``."""
    return float(seen_accuracy(R, counts)[-1])


def forgetting_per_session(R: np.ndarray, after: int | None = None, reference: str = "max") -> np.ndarray:
    """``f_j = max_{l<k} R[l, j] − R[k, j]`` for each ``j < k`` after session ``k`` (default: the last).

    ``reference="max"`` is Chaudhry et al. (2018); ``reference="initial"`` uses ``R[j, j]`` (the accuracy just
    after learning j) instead of the maximum, which is Avalanche's ``Forgetting`` metric.
    """
    R = np.asarray(R, dtype=float)
    k = R.shape[0] - 1 if after is None else after
    if reference == "max":
        best = np.array([R[j:k, j].max() for j in range(k)])
    elif reference == "initial":
        best = np.array([R[j, j] for j in range(k)])
    else:
        raise ValueError(f"reference={reference!r}; valid: 'max', 'initial'")
    return best - R[k, :k]


def forgetting(R: np.ndarray, after: int | None = None, reference: str = "max") -> float:
    """``F_k = (1/k) Σ_{j<k} f_j`` (Chaudhry et al., 2018); NaN after the first session."""
    f = forgetting_per_session(R, after, reference)
    return float(f.mean()) if f.size else float("nan")


def forgetting_curve(R: np.ndarray) -> np.ndarray:
    """``F_k`` after every session k (NaN for k = 0)."""
    return np.array([forgetting(R, after=k) for k in range(np.asarray(R).shape[0])])


def backward_transfer(R: np.ndarray) -> float:
    """``BWT = (1/(T-1)) Σ_{j<T-1} (R[T-1, j] − R[j, j])`` (Lopez-Paz & Ranzato, 2017)."""
    R = np.asarray(R, dtype=float)
    T = R.shape[0]
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)])) if T > 1 else float("nan")


def forward_transfer(R: np.ndarray, baseline: Sequence[float] | None = None) -> float:
    """``FWT = (1/(T-1)) Σ_{j≥1} (R[j-1, j] − b_j)`` (Lopez-Paz & Ranzato, 2017).

    ``b_j`` is the accuracy on session j of the model before any training; ``None`` means 0 (a growing head
    cannot predict classes it has not seen). NaN when the upper diagonal was not evaluated.
    """
    R = np.asarray(R, dtype=float)
    T = R.shape[0]
    if T < 2:
        return float("nan")
    b = np.zeros(T) if baseline is None else np.asarray(baseline, dtype=float)
    return float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))


def old_new_accuracy(R: np.ndarray, counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per session i: accuracy on old classes (sessions < i, sample-weighted), on new classes (session i),
    and their harmonic mean ``2·old·new/(old+new)`` (FSCIL). Old and harmonic are NaN for session 0."""
    R, n = np.asarray(R, dtype=float), np.asarray(counts, dtype=float)
    T = R.shape[0]
    old = np.array([(R[i, :i] * n[:i]).sum() / n[:i].sum() if i else np.nan for i in range(T)])
    new = np.array([R[i, i] for i in range(T)])
    with np.errstate(invalid="ignore", divide="ignore"):
        harmonic = np.where(old + new > 0, 2 * old * new / (old + new), 0.0)
    harmonic[0] = np.nan
    return old, new, harmonic


def base_novel_accuracy(R: np.ndarray, counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per session i: accuracy on the base classes (session 0) and on every novel class seen (sessions 1..i,
    sample-weighted); novel is NaN for session 0 (FSCIL)."""
    R, n = np.asarray(R, dtype=float), np.asarray(counts, dtype=float)
    base = R[:, 0].copy()
    novel = np.array(
        [(R[i, 1 : i + 1] * n[1 : i + 1]).sum() / n[1 : i + 1].sum() if i else np.nan for i in range(len(R))]
    )
    return base, novel


def performance_drop(R: np.ndarray, counts: Sequence[int]) -> float:
    """FSCIL's PD: seen-class accuracy after the base session minus after the last session."""
    seen = seen_accuracy(R, counts)
    return float(seen[0] - seen[-1])


def harmonic_mean(old: float, new: float) -> float:
    """``2·old·new / (old + new)`` (0 when both are 0)."""
    return 2 * old * new / (old + new) if old + new > 0 else 0.0


def mtil_transfer(R: np.ndarray) -> float:
    """ZSCL's Transfer: for each task j ≥ 1 the mean of ``R[i, j]`` over ``i < j``, then the mean over j."""
    R = np.asarray(R, dtype=float)
    return float(np.mean([R[:j, j].mean() for j in range(1, R.shape[1])]))


def mtil_avg(R: np.ndarray) -> float:
    """ZSCL's Avg: for each task j the mean of ``R[i, j]`` over all rows i, then the mean over j."""
    return float(np.asarray(R, dtype=float).mean(axis=0).mean())


def mtil_last(R: np.ndarray) -> float:
    """ZSCL's Last: the mean of the last row."""
    return float(np.asarray(R, dtype=float)[-1].mean())


def summarize(R: np.ndarray, counts: Sequence[int]) -> dict[str, float]:
    """Every final metric of a run (keys of :data:`DEFINITIONS`). MTIL metrics need the full matrix."""
    R = np.asarray(R, dtype=float)
    old, new, harmonic = old_new_accuracy(R, counts)
    full = not np.isnan(R).any()
    out = {
        "avg_incremental_acc": average_incremental_accuracy(R, counts),
        "last_acc": last_accuracy(R, counts),
        "forgetting": forgetting(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R),
        "last_old_acc": float(old[-1]),
        "last_new_acc": float(new[-1]),
        "last_harmonic_mean": float(harmonic[-1]),
        "last_base_acc": float(base_novel_accuracy(R[:, : R.shape[0]], counts)[0][-1]),
        "last_novel_acc": float(base_novel_accuracy(R[:, : R.shape[0]], counts)[1][-1]),
        "performance_drop": performance_drop(R[:, : R.shape[0]], counts[: R.shape[0]]),
        "mtil_transfer": mtil_transfer(R) if full and R.shape[0] > 1 else float("nan"),
        "mtil_avg": mtil_avg(R) if full else float("nan"),
        "mtil_last": mtil_last(R),
    }
    return out
