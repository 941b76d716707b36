"""Feature reuse for frozen bodies: each evaluation image goes through a frozen body once per run.

A strategy whose ``features(x)`` can no longer change (SimpleCIL's backbone, FSA's body after session 1, DKVB's
encoder, Mamba-FSCIL's backbone after the base session) says so with ``CILModule.features_frozen``; its logits
are then ``classify(features(x))``. The session loop evaluates such a strategy on features it computed once and
keeps in a :class:`FeatureStore`: in memory up to ``run.feature_memory_mb``, beyond that on disk under the run
folder's ``features/``. Entries are keyed on what determines them — the body's weights digest, the data set's
identity (:func:`data_identity`), this process's share of it and the batching — so a changed body or data set is
never served stale features, and a resumed run recomputes (or re-reads) exactly the same tensors.

Bit-identical to the uncached path by construction: features are computed with the very batches the uncached
evaluation uses (this process's share of each test set, ``stream.eval_batch_size`` at a time, under the same
Trainer and precision), and ``classify`` is applied to the same chunks. Only evaluation-mode inputs are cached;
training augmentation never is.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from cil import distributed
from cil.progress import note, progress


def data_identity(data: Any, h: Any) -> bool:
    """Feed what identifies ``data`` cheaply into ``h``: which raw sample each position reads (followed through
    Avalanche's flat data, subsets, concatenations and index wrappers, whatever their nesting), the transforms met
    on the way, the raw samples — array bytes of in-memory data sets (CIFAR's 150 MB, not its 30 GB of transformed
    224-px tensors), path, size and modification time of file-based ones — and their labels. False when a base
    data set is of a kind it does not know (the caller then hashes the transformed inputs)."""
    bases: list[Any] = []
    transforms: set[str] = set()
    positions = _positions(data, bases, transforms)
    h.update(np.asarray(positions, dtype=np.int64).tobytes())
    h.update(repr(sorted(transforms)).encode())
    return all(_base_identity(base, h) for base in bases)


def stream_fingerprint(stream: Any) -> str | None:
    """What a run's data were built from (every session's training and test data, by :func:`data_identity`, and
    the class order): a resumed run compares it with the stream built again, so that data files changed or deleted
    since the interruption are not mixed silently into one run. None for data of a kind it does not know."""
    h = hashlib.sha256(repr([list(map(int, c)) for c in stream.classes_per_session]).encode())
    for data in [*stream.train_data, *stream.eval_data]:
        if not data_identity(data, h):
            return None
    return h.hexdigest()[:32]


def _positions(data: Any, bases: list[Any], transforms: set[str]) -> list[tuple[int, int]]:
    """(base data set number, index in it) for every position of ``data``."""
    from avalanche.benchmarks.utils.data import AvalancheDataset

    if isinstance(data, AvalancheDataset):
        return _positions(data._flat_data, bases, transforms)
    if hasattr(data, "_datasets") and hasattr(data, "_indices"):  # Avalanche's flat data
        for groups in (getattr(data, "_transform_groups", None), getattr(data, "_frozen_transform_groups", None)):
            current = getattr(groups, "current_group", None)
            transform = (getattr(groups, "transform_groups", None) or {}).get(current)
            if transform is not None:
                transforms.add(repr(transform))
        inner = [p for d in data._datasets for p in _positions(d, bases, transforms)]
        return inner if data._indices is None else [inner[i] for i in data._indices]
    if isinstance(data, Subset):
        inner = _positions(data.dataset, bases, transforms)
        return [inner[i] for i in data.indices]
    if isinstance(data, ConcatDataset):
        return [p for d in data.datasets for p in _positions(d, bases, transforms)]
    for name in ("transform", "target_transform", "transforms"):
        if getattr(data, name, None) is not None:
            transforms.add(repr(getattr(data, name)))
    wrapped = [getattr(data, n) for n in ("base", "dataset") if isinstance(getattr(data, n, None), Dataset)]
    inner_data = wrapped[0] if wrapped else None
    if inner_data is not None:  # an index wrapper (the streams' relabelling) or a plain wrapper
        inner = _positions(inner_data, bases, transforms)
        indices = getattr(data, "indices", None)
        return inner if indices is None else [inner[i] for i in indices]
    bases.append(data)
    return [(len(bases) - 1, i) for i in range(len(data))]


def _base_identity(data: Any, h: Any) -> bool:
    h.update(f"{type(data).__module__}.{type(data).__qualname__}:{len(data)}".encode())
    known = False
    for name in ("targets", "labels", "data", "images", "tensors"):
        value = getattr(data, name, None)
        for part in value if isinstance(value, tuple) else (value,):
            if isinstance(part, (np.ndarray, torch.Tensor, list)) and len(part):
                array = part.detach().cpu().numpy() if isinstance(part, torch.Tensor) else np.asarray(part)
                if array.dtype != object:
                    h.update(name.encode())
                    h.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
                    known = known or name in ("data", "images", "tensors")
    for name in ("samples", "imgs", "files", "paths"):
        value = getattr(data, name, None)
        if isinstance(value, (list, tuple)) and value:
            for item in value:
                path = Path(item[0] if isinstance(item, (tuple, list)) else item)
                stat = path.stat()
                h.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns};".encode())
            known = True
    return known


class FeaturesOf(pl.LightningModule):
    """``predict_step``: (the strategy's frozen features, labels) of a batch; what the store keeps."""

    def __init__(self, strategy: pl.LightningModule):
        super().__init__()
        self.strategy = strategy

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0):
        return self.strategy.features(batch[0]).cpu(), batch[1].cpu()


class ClassifyFeatures(pl.LightningModule):
    """``predict_step`` on stored features: (predicted class, true class), as ``CILModule.predict_step`` on images."""

    def __init__(self, strategy: pl.LightningModule):
        super().__init__()
        self.strategy = strategy

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0):
        return self.strategy.classify(batch[0]).argmax(1), batch[1]


class FeatureStore:
    """Features of a frozen body by key: in memory while they fit in ``memory_mb``, else in ``folder`` on disk
    (``None``: memory only, whatever the size). ``hits`` and ``misses`` count lookups (tests and benchmarks)."""

    def __init__(self, folder: Optional[str | Path] = None, memory_mb: float = 2048.0):
        self.folder = Path(folder) if folder is not None else None
        self.budget = memory_mb * 2**20
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.held = 0
        self.hits = self.misses = 0
        self._identities: dict[int, tuple[Dataset, str]] = {}

    def key(self, body_digest: str, data: Dataset, *parts: Any) -> str:
        """The key of ``data``'s features under a body of ``body_digest``; ``parts``: what else determines them
        (the share of the data set, the batch size). The data identity is computed once per data set object."""
        known = self._identities.get(id(data))
        if known is None or known[0] is not data:
            h = hashlib.sha256()
            if not data_identity(data, h):  # a kind it does not know: within one run, its position and size
                h.update(f"{type(data).__qualname__}:{len(data)}".encode())
            known = self._identities[id(data)] = (data, h.hexdigest())
        h = hashlib.sha256(f"{body_digest}:{known[1]}:{len(data)}".encode())
        h.update(repr(parts).encode())
        return h.hexdigest()[:32]

    def _path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / f"{key}.pt"

    def get(self, key: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        found = self.memory.get(key)
        if found is None and self.folder is not None and self._path(key).is_file():
            found = self._read(self._path(key))
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    @staticmethod
    def _read(path: Path) -> Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """A stored entry; a damaged one (truncated by a full disk or a crash) is set aside as ``*.unreadable``
        with a note and counts as missing: features are rebuildable, so they are computed again."""
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return saved["features"], saved["labels"]
        except Exception as e:
            note(f"stored features {path} are unreadable ({type(e).__name__}); set aside, computed again")
            try:
                path.replace(path.with_suffix(".unreadable"))
            except OSError:
                pass
            return None

    def put(self, key: str, features: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        """``labels``: None for features of unlabelled data (DKVB's key initialisation)."""
        size = features.nbytes + (labels.nbytes if labels is not None else 0)
        if self.folder is None or self.held + size <= self.budget:
            self.memory[key] = (features, labels)
            self.held += size
            return
        from cil.io import atomic_write

        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self._path(key), lambda p: torch.save({"features": features, "labels": labels}, p))

    def clear(self) -> None:
        """Forget every entry and delete the folder's files (a completed run no longer needs them)."""
        self.memory.clear()
        self.held = 0
        if self.folder is not None and self.folder.is_dir():
            for path in self.folder.glob("*.pt"):
                path.unlink(missing_ok=True)
            try:  # other processes may be clearing their own entries at the same time
                self.folder.rmdir()
            except OSError:
                pass


def shard_key(batch_size: int) -> tuple[int, int, int]:
    """What besides the body and the data determines a process's cached features: its share and the batching."""
    return distributed.rank(), distributed.world_size(), batch_size


__all__ = ["ClassifyFeatures", "FeatureStore", "FeaturesOf", "data_identity", "shard_key"]


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of names, shapes, dtypes and bytes (exact: any changed bit changes it)."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for key in sorted(tensors):
        t = tensors[key].detach()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy of the bytes
    return h.hexdigest()


class FeatureCache:
    """Features of a frozen encoder over a data set, cached on disk under a key of (encoder, data).

    The key is cheap: the encoder's weights digest, and the data's identity (:func:`data_identity`: structure,
    transforms, labels, raw samples or file sizes and times); only a data set of a kind it does not know is keyed
    on its transformed inputs (one pass without the encoder). Changing either invalidates the entry. A miss runs
    the encoder with ``num_workers`` loader workers, ``batch_size`` at a time. ``directory=None`` keeps nothing.
    """

    def __init__(self, directory: str | Path | None, batch_size: int = 256, num_workers: int = 0):
        self.directory = Path(directory).expanduser() if directory else None
        self.batch_size, self.num_workers = batch_size, num_workers
        # the entries are kept as the session loop's are: a FeatureStore, on disk only (it persists across runs)
        self.store = FeatureStore(self.directory, memory_mb=0.0) if self.directory is not None else None

    def _inputs(self, data: Dataset, workers: int = 0) -> Iterable:
        # its own generator: iterating must draw nothing from the global one, or a cache hit (one pass) and a miss
        # (two) would leave the run's random state, and so its key initialisation, different
        return DataLoader(
            data, batch_size=self.batch_size, shuffle=False, num_workers=workers, generator=torch.Generator()
        )

    def key(self, encoder: nn.Module, data: Dataset, labelled: bool = True) -> str:
        h = hashlib.sha256()
        h.update(tensor_digest(encoder.state_dict()).encode())
        h.update(str(len(data)).encode())
        h.update(b"labelled" if labelled else b"unlabelled")
        if not data_identity(data, h):  # unknown kind: the transformed inputs themselves
            for batch in self._inputs(data, self.num_workers):
                parts = list(batch[: 2 if labelled else 1]) if isinstance(batch, (list, tuple)) else [batch]
                for part in parts:
                    h.update(torch.as_tensor(part).cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    @torch.no_grad()
    def features(self, encoder: nn.Module, data: Dataset, device: torch.device, labelled: bool = True, desc: str = ""):
        """(features, labels): from the cache when present, else computed (and stored). ``labelled=False`` never
        reads the labels (None is returned for them)."""
        key = None
        if self.store is not None:
            key = self.key(encoder, data, labelled)
            found = self.store.get(key)
            if found is not None:
                return found
        feats, labels = [], []
        for batch in progress(self._inputs(data, self.num_workers), desc=desc or "features", leave=False):
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            feats.append(encoder(x.to(device)).float().cpu())
            if labelled:
                labels.append(torch.as_tensor(batch[1]))
        features = torch.cat(feats)
        label_tensor = torch.cat(labels).long() if labels else None
        if key is not None:
            self.store.put(key, features, label_tensor)
        return features, label_tensor
