"""Linear discriminant analysis from streaming sufficient statistics (FSA's head).

:class:`StreamingLDA` is linear discriminant analysis updated exactly, batch by batch, without keeping any sample:
the FSA head (Panos et al., ICCV 2023), usable on its own like a scikit-learn estimator::

    lda = StreamingLDA(num_features=768, mode="sklearn", shrinkage=0.5)
    for x, y in batches:
        lda.update(x, y)                 # any batch size, any order, new classes at any time
    scores = lda.logits(x_test)          # (batch, num class ids), -inf for ids never seen
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from cil.distributed import is_distributed
from cil.layers.growing import Growing

MODES = ("fsa", "sklearn", "slda")
PRIORS = ("frequency", "uniform", "none")
# mode -> (shrinkage when none is given, priors when none are given)
DEFAULTS = {"fsa": (1.0, "none"), "sklearn": (0.0, "frequency"), "slda": (1e-4, "none")}


class StreamingLDA(Growing):
    r"""Linear discriminant analysis from streaming statistics: exact, order-invariant, mergeable.

    **State** (buffers, so it checkpoints with the model; ``dtype`` float64 by default): per class id ``k`` the
    count :math:`n_k` and mean :math:`\mu_k`, and the pooled within-class scatter
    :math:`W = \sum_k \sum_{i \in k} (x_i - \mu_k)(x_i - \mu_k)^\top`. Batches and partial heads are combined with
    Chan et al.'s pairwise update (means and scatter, never raw sums of outer products, which cancel badly)::

        n = n_a + n_b,  mu = mu_a + (n_b / n) d,  W = W_a + W_b + (n_a n_b / n) d d^T   with d = mu_b - mu_a

    so ``update`` costs O(batch * d^2) whatever was seen before. The classifier (``coef_``, ``intercept_``) is
    solved once after the statistics change and cached. ``logits(x) = x coef^T + intercept`` with
    ``coef_k = Sigma^-1 mu_k`` and ``intercept_k = -1/2 mu_k^T Sigma^-1 mu_k + log prior_k``, where the modes differ
    in ``Sigma`` (``N = sum n_k``, ``s`` = ``shrinkage``):

    - ``mode="fsa"`` — the official FSA code (``compute_lda_head``): the *total* covariance of all seen features,
      ignoring labels (``torch.cov``, correction 1, or 0 when N = 1), plus ``s * I`` (default s = 1.0, the code's
      ridge); no prior term. The total scatter is ``W + sum_k n_k (mu_k - mu)(mu_k - mu)^T``, so the same
      statistics serve.
    - ``mode="sklearn"`` — exactly ``LinearDiscriminantAnalysis(solver="lsqr", shrinkage=s)``:
      ``Sigma = sum_k pi_k [(1 - s) C_k + s tr(C_k)/d I]`` with ``C_k`` class k's biased covariance, which for
      ``priors="frequency"`` (pi_k = n_k/N, scikit-learn's default) is ``(1 - s) W/N + s tr(W)/(N d) I``. With
      ``priors="uniform"`` scikit-learn weights each class covariance by 1/K, which needs every class's own
      scatter: the head then also keeps ``class_scatter`` (K x d x d; mind the memory for large K and d).
      Default s = 0 (scikit-learn's ``shrinkage=None``).
    - ``mode="slda"`` — Deep SLDA (Hayes & Kanan, CVPR-W 2020; Avalanche's ``StreamingLDA``):
      ``Sigma = (1 - s) W/N + s I`` (default s = 1e-4), no prior term. Deep SLDA's one-sample update estimates
      W/N approximately and depends on the order of the samples; here W is exact, so the result does not.

    ``priors`` adds ``log pi_k`` to the intercept: ``"frequency"`` (n_k/N), ``"uniform"`` (1/K) or ``"none"``
    (the default of the fsa and slda modes; scikit-learn always has a prior, so ``"none"`` is refused there).

    The system is solved by Cholesky when ``Sigma`` is positive definite by construction (a positive identity
    term), otherwise as minimum-norm least squares through the symmetric eigendecomposition (scikit-learn's
    ``lstsq`` answer): one sample per class makes W = 0, and the coefficients are then 0, never NaN.
    """

    def __init__(
        self,
        num_features: int,
        mode: str = "sklearn",
        shrinkage: Optional[float] = None,
        priors: Optional[str] = None,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features={num_features!r} must be a positive integer")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not valid; choose one of {list(MODES)}")
        default_shrinkage, default_priors = DEFAULTS[mode]
        shrinkage = default_shrinkage if shrinkage is None else float(shrinkage)
        if not 0.0 <= shrinkage <= 1.0:
            raise ValueError(f"shrinkage={shrinkage!r} is out of range; it must be in [0, 1]")
        priors = default_priors if priors is None else priors
        if priors not in PRIORS:
            raise ValueError(f"priors={priors!r} is not valid; choose one of {list(PRIORS)}")
        if mode == "sklearn" and priors == "none":
            raise ValueError("priors='none' is not valid with mode='sklearn'; choose 'frequency' or 'uniform'")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype} must be a floating-point type (float64 recommended)")
        self.num_features, self.mode, self.shrinkage, self.priors, self.dtype = (
            num_features,
            mode,
            shrinkage,
            priors,
            dtype,
        )
        self.keeps_class_scatter = mode == "sklearn" and priors == "uniform"
        d = num_features
        self.register_buffer("counts", torch.zeros(0, dtype=dtype))
        self.register_buffer("means", torch.zeros(0, d, dtype=dtype))
        self.register_buffer("scatter", torch.zeros(d, d, dtype=dtype))
        self.register_buffer("class_scatter", torch.zeros(0, d, d, dtype=dtype))
        self._version = 0  # bumped whenever the statistics change; the cached solution carries the version
        self._cache: Optional[tuple[int, torch.Tensor, torch.Tensor]] = None

    # ---- statistics --------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of class ids (largest seen id + 1); ids never seen score -inf."""
        return self.counts.numel()

    @property
    def classes(self) -> torch.Tensor:
        """The class ids seen so far, sorted (scikit-learn's ``classes_``)."""
        return torch.nonzero(self.counts > 0).flatten()

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum().item())

    def grow(self, num_classes: int) -> None:
        extra = num_classes - self.num_classes
        if extra <= 0:
            return
        d = self.num_features
        self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])
        self.means = torch.cat([self.means, self.means.new_zeros(extra, d)])
        if self.keeps_class_scatter:
            self.class_scatter = torch.cat([self.class_scatter, self.class_scatter.new_zeros(extra, d, d)])

    def reset(self) -> StreamingLDA:
        """Forget every statistic."""
        d = self.num_features
        self.counts = self.counts.new_zeros(0)
        self.means = self.means.new_zeros(0, d)
        self.scatter = self.scatter.new_zeros(d, d)
        self.class_scatter = self.class_scatter.new_zeros(0, d, d)
        self._changed()
        return self

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> StreamingLDA:
        """Add a batch of ``features`` (batch, num_features) with integer class ids ``labels`` (batch,)."""
        x, y = self._check_batch(features, labels)
        if y.numel() == 0:
            return self
        self.grow(int(y.max()) + 1)
        classes, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
        counts = counts.to(self.dtype)
        means = torch.zeros(len(classes), self.num_features, dtype=self.dtype, device=x.device)
        means.index_add_(0, inverse, x).div_(counts.unsqueeze(1))
        centred = x - means[inverse]  # the batch's own within-class deviations
        class_scatter = None
        if self.keeps_class_scatter:
            class_scatter = torch.stack([centred[inverse == j].T @ centred[inverse == j] for j in range(len(classes))])
        self._merge(classes, counts, means, centred.T @ centred, class_scatter)
        return self

    partial_fit = update  # scikit-learn's name for the same thing

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> StreamingLDA:
        """Forget everything, then ``update`` with one batch (scikit-learn's ``fit``)."""
        return self.reset().update(features, labels)

    @torch.no_grad()
    def merge(self, other: StreamingLDA) -> StreamingLDA:
        """Add the statistics of another head (fed different data): the result is the head fed both."""
        if not isinstance(other, StreamingLDA):
            raise TypeError(f"can only merge a StreamingLDA, not {type(other).__name__}")
        if other.num_features != self.num_features:
            raise ValueError(f"cannot merge heads of {other.num_features} and {self.num_features} features")
        if other.keeps_class_scatter != self.keeps_class_scatter:
            raise ValueError(
                "cannot merge a head that keeps per-class scatter (mode='sklearn', priors='uniform') "
                "with one that does not"
            )
        self.grow(other.num_classes)
        classes = other.classes.to(self.counts.device)
        if classes.numel() == 0:
            return self
        cast = {"device": self.counts.device, "dtype": self.dtype}
        idx = classes.to(other.counts.device)
        self._merge(
            classes,
            other.counts[idx].to(**cast),
            other.means[idx].to(**cast),
            other.scatter.to(**cast),
            other.class_scatter[idx].to(**cast) if self.keeps_class_scatter else None,
        )
        return self

    @torch.no_grad()
    def all_reduce(self) -> StreamingLDA:
        """Merge the heads of every process (each fed its own shard): afterwards all hold the same head.

        The states are gathered and folded in rank order with the pairwise update, so every process computes
        bit-identical statistics. Call it on heads holding disjoint data (a fresh head per pass), not on a head
        that was already reduced. A no-op without torch.distributed.
        """
        if not is_distributed():
            return self
        import torch.distributed as dist

        size = torch.tensor([self.num_classes], device=self.counts.device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX)
        self.grow(int(size.item()))
        names = ["counts", "means", "scatter"] + (["class_scatter"] if self.keeps_class_scatter else [])
        gathered = {}
        for name in names:
            local = getattr(self, name).contiguous()
            gathered[name] = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered[name], local)
        self.reset()
        self.grow(int(size.item()))
        for rank in range(dist.get_world_size()):
            part = StreamingLDA(self.num_features, self.mode, self.shrinkage, self.priors, self.dtype)
            for name in names:
                setattr(part, name, gathered[name][rank])
            self.merge(part)
        return self

    def _merge(
        self,
        classes: torch.Tensor,
        counts: torch.Tensor,
        means: torch.Tensor,
        scatter: torch.Tensor,
        class_scatter: Optional[torch.Tensor],
    ) -> None:
        """Chan et al.'s pairwise update of (n_k, mu_k, W) with a part holding ``counts`` > 0 of ``classes``."""
        n_a, mu_a = self.counts[classes], self.means[classes]
        n = n_a + counts
        delta = means - mu_a
        weight = n_a * counts / n  # 0 for classes new to this head: their mean is simply the part's
        self.means[classes] = mu_a + delta * (counts / n).unsqueeze(1)
        spread = delta * weight.sqrt().unsqueeze(1)
        self.scatter += scatter + spread.T @ spread
        if class_scatter is not None:
            self.class_scatter[classes] += class_scatter + weight.view(-1, 1, 1) * (
                delta.unsqueeze(2) * delta.unsqueeze(1)
            )
        self.counts[classes] = n
        self._changed()

    def _check_batch(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, labels = torch.as_tensor(features), torch.as_tensor(labels)
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"features must have shape (batch, {self.num_features}), got {tuple(features.shape)}")
        if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"labels must be non-negative class ids, got {int(labels.min())}")
        device = self.counts.device
        return features.detach().to(device, self.dtype), labels.to(device, torch.long)

    def _changed(self) -> None:
        self._version += 1

    # ---- the classifier ----------------------------------------------------------------------------------
    def covariance(self) -> torch.Tensor:
        """The (d, d) matrix Sigma of the mode, from the current statistics."""
        seen = self.counts > 0
        n, mu = self.counts[seen], self.means[seen]
        total = n.sum()
        if total == 0:
            raise RuntimeError("StreamingLDA has seen no data: call update(features, labels) first")
        d, s = self.num_features, self.shrinkage
        eye = torch.eye(d, dtype=self.dtype, device=mu.device)
        if self.mode == "fsa":
            grand_mean = (n.unsqueeze(1) * mu).sum(0) / total
            spread = (mu - grand_mean) * n.sqrt().unsqueeze(1)
            total_scatter = self.scatter + spread.T @ spread
            return total_scatter / max(total.item() - 1, 1) + s * eye  # torch.cov: correction 1 (0 when N = 1)
        if self.mode == "slda":
            return (1 - s) * self.scatter / total + s * eye
        if self.priors == "uniform":  # scikit-learn's _class_cov with priors 1/K: every class weighs the same
            per_class = self.class_scatter[seen] / n.view(-1, 1, 1)
            empirical = per_class.mean(0)
        else:  # priors n_k/N: sum_k (n_k/N) W_k/n_k = W/N
            empirical = self.scatter / total
        return (1 - s) * empirical + s * torch.trace(empirical) / d * eye

    def _identity_weight(self) -> float:
        """The coefficient of I in Sigma: positive means Sigma is positive definite by construction."""
        if self.mode == "sklearn":
            total = self.counts.sum()
            return self.shrinkage * float(torch.trace(self.scatter) / total) if total > 0 else 0.0
        return self.shrinkage

    def solution(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(coef, intercept)`` of shapes (num_classes, d) and (num_classes,); cached until the data change."""
        if self._cache is not None and self._cache[0] == self._version:
            return self._cache[1], self._cache[2]
        sigma = self.covariance()
        seen = self.counts > 0
        n, mu = self.counts[seen], self.means[seen]
        coef_seen = _solve_symmetric(sigma, mu.T, positive_definite=self._identity_weight() > 0).T
        intercept_seen = -0.5 * (mu * coef_seen).sum(1)
        if self.priors == "frequency":
            intercept_seen = intercept_seen + torch.log(n / n.sum())
        elif self.priors == "uniform":
            intercept_seen = intercept_seen - math.log(len(n))
        coef = torch.zeros(self.num_classes, self.num_features, dtype=self.dtype, device=mu.device)
        intercept = torch.full((self.num_classes,), -math.inf, dtype=self.dtype, device=mu.device)
        coef[seen], intercept[seen] = coef_seen, intercept_seen
        self._cache = (self._version, coef, intercept)
        return coef, intercept

    @property
    def coef_(self) -> torch.Tensor:
        return self.solution()[0]

    @property
    def intercept_(self) -> torch.Tensor:
        return self.solution()[1]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Scores (batch, num_classes) for every class id seen so far; ids never seen score -inf."""
        coef, intercept = self.solution()
        x = torch.as_tensor(features)
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"features must have shape (batch, {self.num_features}), got {tuple(x.shape)}")
        return x.to(coef.device, self.dtype) @ coef.T + intercept

    decision_function = logits  # scikit-learn's name

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).argmax(1)

    # ---- keeping dtype and cache right through .to(), .half(), load_state_dict --------------------------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():  # statistics stay in their dtype whatever the model's is
            if buffer is not None and buffer.dtype != self.dtype:
                self._buffers[name] = buffer.to(self.dtype)
        self._changed()
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._changed()

    def extra_repr(self) -> str:
        return (
            f"num_features={self.num_features}, mode={self.mode!r}, shrinkage={self.shrinkage}, "
            f"priors={self.priors!r}, classes={len(self.classes)}, samples={self.num_samples}"
        )


def _solve_symmetric(matrix: torch.Tensor, rhs: torch.Tensor, positive_definite: bool) -> torch.Tensor:
    """``matrix^-1 rhs`` for a symmetric PSD matrix: Cholesky when PD, else minimum-norm least squares."""
    if positive_definite:
        factor, info = torch.linalg.cholesky_ex(matrix)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, factor)
    # the pseudo-inverse through eigh, with numpy's rank cut-off: what lstsq (gelsd) returns for PSD systems
    values, vectors = torch.linalg.eigh(matrix)
    cutoff = values.abs().max() * matrix.shape[0] * torch.finfo(matrix.dtype).eps
    inverse = torch.where(values > cutoff, 1.0 / values, torch.zeros_like(values))
    return vectors @ (inverse.unsqueeze(1) * (vectors.T @ rhs))


__all__ = ["DEFAULTS", "MODES", "PRIORS", "StreamingLDA"]
