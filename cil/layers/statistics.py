"""Per-class Gaussian statistics of frozen features, and sampling from them (classifier alignment).

MOS (and the SLCA family) keep, for every class seen, the mean and spread of its features, and later retrain the
classifier on features sampled from those Gaussians instead of replaying data. :class:`ClassGaussians` stores
them in one of MOS's three forms (``ca_storage_efficient_method``):

- ``"covariance"``: mean and full covariance ``cov(F) + ridge * I`` (``torch.cov``, correction 1);
- ``"variance"``: mean and the diagonal of that matrix;
- ``"multi-centroid"``: k-means (``n_centroids`` clusters, scikit-learn) of the class's features, and per cluster the
  mean and the biased per-feature variance; sampling adds ``ridge * I`` and skips clusters of zero variance.

``update`` accumulates float64 sums of the classes being added (and, for multi-centroid, their features);
``all_reduce`` combines the processes' shares; ``finalize`` turns them into the stored statistics. Classes
finalized earlier are never recomputed.

Memory at MOS's scale (200 classes, d = 768): the pending sums cover only the classes being added (not every
class seen), the outer products are summed class by class (one d x d product per class in the batch, no
(batch, d, d) temporary), and the stored covariances and the cached sampling factors are float32 (computed in
float64 from float64 sums, so they equal ``torch.cov`` to float32 precision): 2 x 200 x 768² x 4 B = 0.9 GiB,
what the official code's float64 covariances alone take.
"""

from __future__ import annotations

from typing import Optional

import torch

from cil.config import STORAGES
from cil.distributed import all_reduce_sum, is_distributed
from cil.layers.growing import Growing


class ClassGaussians(Growing):
    def __init__(
        self,
        num_features: int,
        storage: str = "covariance",
        ridge: float = 1e-4,
        n_centroids: int = 10,
        seed: int = 0,
    ):
        super().__init__()
        if storage not in STORAGES:
            raise ValueError(f"storage={storage!r} is not valid; choose one of {list(STORAGES)}")
        if ridge < 0:
            raise ValueError(f"ridge={ridge!r} must be >= 0")
        self.num_features, self.storage, self.ridge, self.seed = num_features, storage, ridge, seed
        self.n_centroids = n_centroids if storage == "multi-centroid" else 1
        d, c = num_features, self.n_centroids
        self.register_buffer("counts", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("means", torch.zeros(0, c, d, dtype=torch.float64))
        if storage == "covariance":
            self.register_buffer("spread", torch.zeros(0, d, d, dtype=torch.float32))
        else:
            self.register_buffer("spread", torch.zeros(0, c, d, dtype=torch.float64))
        self._pending: dict[str, torch.Tensor] = {}  # sums of the classes being added, one row per class
        self._rows: dict[int, int] = {}  # class id -> its row in the pending sums
        self._features: dict[int, list[torch.Tensor]] = {}
        self._factors: Optional[list] = None  # sampling factors, derived from the buffers when first needed

    @property
    def num_classes(self) -> int:
        return self.counts.numel()

    def grow(self, num_classes: int) -> None:
        extra = num_classes - self.num_classes
        if extra <= 0:
            return
        self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])
        self.means = torch.cat([self.means, self.means.new_zeros(extra, *self.means.shape[1:])])
        self.spread = torch.cat([self.spread, self.spread.new_zeros(extra, *self.spread.shape[1:])])

    # ---- accumulation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> ClassGaussians:
        """Add a batch of features of classes not finalized yet."""
        x = features.detach().to(self.means.device, torch.float64)
        y = labels.to(self.means.device, torch.long)
        size = int(y.max()) + 1 if y.numel() else 0
        if size > self.num_classes:
            self.grow(size)
        if y.numel() and bool((self.counts[y] > 0).any()):
            done = sorted(set(y[self.counts[y] > 0].tolist()))
            raise ValueError(f"classes {done[:5]} already have statistics; update only adds new classes")
        classes = y.unique().tolist()
        self._add_rows(classes)
        rows = torch.tensor([self._rows[c] for c in y.tolist()], dtype=torch.long, device=y.device)
        self._pending["n"].index_add_(0, rows, torch.ones_like(y, dtype=torch.float64))
        self._pending["sum"].index_add_(0, rows, x)
        if self.storage == "covariance":
            for c in classes:  # one d x d product per class in the batch
                xc = x[y == c]
                self._pending["outer"][self._rows[c]] += xc.T @ xc
        else:
            self._pending["outer"].index_add_(0, rows, x * x)
        if self.storage == "multi-centroid":
            for c in classes:
                self._features.setdefault(c, []).append(x[y == c].cpu())
        return self

    def _add_rows(self, classes: list[int]) -> None:
        """Give each class of ``classes`` a row in the pending sums (n, sum, outer), zero-filled."""
        d = self.num_features
        shapes = {"n": (), "sum": (d,), "outer": (d, d) if self.storage == "covariance" else (d,)}
        new = [c for c in classes if c not in self._rows]
        for c in new:
            self._rows[c] = len(self._rows)
        for key, shape in shapes.items():
            old = self._pending.get(key, self.means.new_zeros(0, *shape))
            if old.shape[0] < len(self._rows):
                old = torch.cat([old, old.new_zeros(len(self._rows) - old.shape[0], *shape)])
            self._pending[key] = old

    def all_reduce(self) -> ClassGaussians:
        """Sum the pending statistics over processes (each having fed its own shard)."""
        if not is_distributed():
            return self
        import torch.distributed as dist

        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(self._rows))
        union = sorted(set().union(*gathered))
        mine, self._rows, self._pending = (dict(self._rows), dict(self._pending)), {}, {}
        self._add_rows(union)  # the same row per class on every process
        for c, r in mine[0].items():
            for key, t in mine[1].items():
                self._pending[key][self._rows[c]] = t[r]
        for t in self._pending.values():
            all_reduce_sum(t)
        if self.storage == "multi-centroid":
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, {c: torch.cat(v) for c, v in self._features.items()})
            merged: dict[int, list[torch.Tensor]] = {}
            for part in gathered:  # rank order: every process clusters the same rows in the same order
                for c, v in part.items():
                    merged.setdefault(c, []).append(v)
            self._features = merged
        return self

    @torch.no_grad()
    def finalize(self) -> list[int]:
        """Turn the pending sums into stored statistics; returns the classes added."""
        if not self._rows:
            self._pending, self._features = {}, {}
            return []
        n, s, outer = self._pending["n"], self._pending["sum"], self._pending["outer"]
        self.grow(max(self._rows) + 1)
        added = sorted(c for c, r in self._rows.items() if n[r] > 0)
        eye = torch.eye(self.num_features, dtype=torch.float64, device=n.device)
        for c in added:
            r = self._rows[c]
            mean = s[r] / n[r]
            if self.storage == "multi-centroid":
                self._fit_centroids(c, torch.cat(self._features.pop(c)).to(torch.float64))
                continue
            correction = max(n[r].item() - 1, 1)  # torch.cov: correction 1 (0 for a single sample)
            if self.storage == "covariance":
                cov = (outer[r] - n[r] * torch.outer(mean, mean)) / correction + self.ridge * eye
                self.spread[c] = cov.to(self.spread.dtype)
            else:
                self.spread[c, 0] = (outer[r] - n[r] * mean * mean) / correction + self.ridge
            self.means[c, 0] = mean
            self.counts[c] = n[r]
        self._pending, self._features, self._rows = {}, {}, {}
        self._factors = None
        return added

    def _fit_centroids(self, c: int, x: torch.Tensor) -> None:
        from sklearn.cluster import KMeans

        k = min(self.n_centroids, x.shape[0])
        labels = KMeans(n_clusters=k, n_init="auto", random_state=self.seed).fit(x.numpy()).labels_
        for i in range(k):
            part = x[torch.from_numpy(labels == i)]
            self.means[c, i] = part.mean(0)
            self.spread[c, i] = part.var(0, unbiased=False)  # np.var in the MOS code
        self.counts[c] = x.shape[0]

    # ---- sampling ---------------------------------------------------------------------------------------
    def _scales(self) -> list[list[tuple[torch.Tensor, torch.Tensor, bool]]]:
        """Per class, per component: (mean, Cholesky factor or std vector, whether the factor is a full matrix)."""
        out = []
        for c in range(self.num_classes):
            parts = []
            if self.counts[c] == 0:
                out.append(parts)
                continue
            if self.storage == "covariance":  # factored in float64, kept in float32 (half the memory)
                factor = torch.linalg.cholesky(self.spread[c].double()).float()
                parts.append((self.means[c, 0], factor, True))
            elif self.storage == "variance":
                parts.append((self.means[c, 0], self.spread[c, 0].sqrt(), False))
            else:
                for i in range(self.n_centroids):
                    var = self.spread[c, i]
                    if var.mean() == 0:  # an empty or single-point cluster: skipped, as in the MOS code
                        continue
                    parts.append((self.means[c, i], (var + self.ridge).sqrt(), False))
            out.append(parts)
        return out

    @torch.no_grad()
    def sample(
        self, per_component: int, generator: Optional[torch.Generator] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``per_component`` features from every class's Gaussian (every kept centroid in multi-centroid mode)."""
        if self._factors is None:
            self._factors = self._scales()  # Cholesky factors: computed once per change, not per epoch
        xs, ys = [], []
        for c, parts in enumerate(self._factors):
            for mean, scale, full in parts:
                z = torch.randn(per_component, self.num_features, dtype=torch.float64, generator=generator)
                z = z.to(mean.device)
                xs.append(mean + (z @ scale.double().T if full else z * scale))
                ys.append(torch.full((per_component,), c, dtype=torch.long, device=mean.device))
        if not xs:
            raise RuntimeError("ClassGaussians holds no statistics yet: update(...) then finalize()")
        return torch.cat(xs).float(), torch.cat(ys)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._factors = None


__all__ = ["ClassGaussians", "STORAGES"]
