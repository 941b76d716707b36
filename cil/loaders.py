"""Seeds, samplers and data loaders: what makes a session's data order, augmentation and dropout replay exactly.

Each session reseeds from ``(run.seed, session)`` and each epoch (and batch) from ``(run.seed, session, epoch)``;
the training sampler shuffles from the same numbers and each augmented item is seeded by ``(epoch, index)``
wherever it loads. A fit resumed from an epoch-end checkpoint therefore replays what the uninterrupted fit did.
Statistics and evaluation passes read each process's disjoint, unpadded share of a data set (``stats_loader``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from torch.utils.data import (
    BatchSampler,
    ConcatDataset,
    DataLoader,
    Dataset,
    RandomSampler,
    Subset,
    TensorDataset,
    default_collate,
)

from cil import distributed
from cil.backbones import Transforms, data_transforms
from cil.errors import UnreadableSample


def derived_seed(*parts: int) -> int:
    """A seed for a (run seed, session, epoch) tuple; distinct tuples give distinct seeds."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_item(seed: int) -> None:
    """Seed what an item's augmentation draws from: Python's and NumPy's generators and torch's CPU generator (the
    same CPU draws as :func:`seed_all`). ``torch.manual_seed`` also seeds every device's generator, lazily, which
    costs about 0.2 ms per call (it records a traceback for the lazy CUDA call): 10x the rest, paid per item."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


class EpochSeededSampler(RandomSampler):
    """A shuffling sampler whose order depends only on (seed, epoch); Lightning calls ``set_epoch``.

    Under DDP it is its own distributed sampler (the session loop's trainers set ``use_distributed_sampler=False``):
    each process takes every world-th index of the same permutation, padded to equal shares as PyTorch's
    ``DistributedSampler`` does, so the epoch a resumed fit starts at can be given up front (``epoch``).
    ``shuffle=False`` keeps the data's order (online streams). It subclasses ``RandomSampler`` so that a plain
    Lightning project recognises a shuffled loader (and, with its default settings, swaps in its own sampler
    under DDP).
    """

    def __init__(self, data: Dataset, seed: int, epoch: int = 0, shuffle: bool = True):
        super().__init__(data)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.data_source) // distributed.world_size())

    def __iter__(self):
        n = len(self.data_source)
        if self.shuffle:
            generator = torch.Generator().manual_seed(derived_seed(self.seed, self.epoch))
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        world = distributed.world_size()
        if world > 1:
            order += order[: len(self) * world - n]  # equal shares, as DistributedSampler pads
            order = order[distributed.rank() :: world]
        yield from order


class EveryItemBatchSampler(BatchSampler):
    """Batches of every item, as the official codes' ``DataLoader(drop_last=False)``, except that a last batch of
    a single item joins the batch before it: BatchNorm in training mode cannot normalise one sample. Only that case
    differs; a ragged last batch of two or more items stays as it is. ``drop_last=True`` drops it as PyTorch does.

    Lightning rebuilds it around a ``DistributedSampler`` under DDP (same constructor as ``BatchSampler``).
    """

    with_epoch = False

    def __iter__(self):
        batches = self._batches()
        if self.with_epoch:  # the sampler's epoch (ours or Lightning's DistributedSampler), read as it shuffles
            epoch = int(getattr(self.sampler, "epoch", 0))
            batches = ([(epoch, i) for i in batch] for batch in batches)
        yield from batches

    def _batches(self):
        if self.drop_last or self.batch_size == 1:
            yield from super().__iter__()
            return
        held = None
        for batch in super().__iter__():
            if held is not None and len(batch) == 1:
                batch = held + batch
            elif held is not None:
                yield held
            held = batch
        if held is not None:
            yield held

    def __len__(self) -> int:
        n, size = len(self.sampler), self.batch_size
        if self.drop_last:
            return n // size
        if size == 1:
            return n
        return n // size + (n % size > 1 or n == 1)


class SeededItems(Dataset):
    """Training items whose random augmentation is seeded by (run seed, session, epoch, index): the same draws in
    the main process or in any number of loader workers, persistent or not, and after a resume. The batch sampler
    passes ``(epoch, index)`` pairs (``EveryItemBatchSampler(..., with_epoch=True)``), so the epoch travels with
    the index to whichever process loads it; a plain index counts as epoch 0."""

    def __init__(self, data: Dataset, seed: int, session: int):
        self.data, self.seed, self.session = data, seed, session

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        epoch, index = item if isinstance(item, tuple) else (0, item)
        seed_item(derived_seed(self.seed, self.session, int(epoch), int(index)))
        return self.data[index]


def in_memory(data: Dataset) -> bool:
    """Tensors already in memory (cached features or maps): loader workers would only add start-up and copies."""
    while isinstance(data, Subset):
        data = data.dataset
    if isinstance(data, ConcatDataset):
        return all(in_memory(d) for d in data.datasets)
    return isinstance(data, TensorDataset)


class EpochItemBatchSampler(EveryItemBatchSampler):
    """The same batches of ``(epoch, index)`` pairs for ``SeededItems`` (a class of its own: Lightning rebuilds a
    batch sampler under DDP from its class, batch size and drop_last)."""

    with_epoch = True


class EpochSeed(Callback):
    """Reseed the global generators at each epoch and batch start (dropout; augmentation is seeded per item, see
    ``SeededItems``): a resumed epoch replays."""

    def __init__(self, seed: int, session: int):
        self.seed, self.session = seed, session

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed_all(derived_seed(self.seed, self.session, trainer.current_epoch))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        # and at each batch: a resumed fit creates its data iterator at another moment than an uninterrupted one
        # (which draws from the global generator), so only a per-batch seed makes dropout masks replay exactly
        seed_all(derived_seed(self.seed, self.session, trainer.current_epoch, batch_idx))


class SkipUnreadable(Dataset):
    """``stream.skip_unreadable``: an item whose file cannot be read becomes None (``skipping_collate`` drops it from
    its batch), and its path is appended once to ``log`` as a JSON line (``{"path": ...}``: any file name survives,
    newlines included; shared by loader workers and processes: one short append per file). Only the session loop's
    loaders skip; a strategy's own readers (ZSCL's reference images, DKVB's feature extraction) stop on such a file
    with the same one-line error."""

    def __init__(self, data: Dataset, log: Path | None):
        self.data, self.log = data, log
        self.seen: set[str] = set()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        try:
            return self.data[item]
        except UnreadableSample as e:
            if e.path not in self.seen:
                self.seen.add(e.path)
                if self.log is not None:
                    with open(self.log, "a") as f:
                        f.write(json.dumps({"path": e.path}) + "\n")
            return None


def skipping_collate(batch: list):
    """PyTorch's collation of the items that could be read."""
    kept = [item for item in batch if item is not None]
    if not kept:
        raise UnreadableSample(f"every sample of a batch of {len(batch)} is unreadable; see the skipped files list")
    return default_collate(kept)


SKIPPED_LOG: Path | None = None  # the run's skipped_files.jsonl while a run with stream.skip_unreadable is going


def _loader(data: Dataset, cfg: DictConfig, persistent: bool = False, **kwargs) -> DataLoader:
    """A loader with ``stream.num_workers`` workers, none for tensors already in memory; ``persistent`` keeps
    them for the whole fit (training) instead of starting them again every epoch."""
    workers = 0 if in_memory(data) else cfg.stream.num_workers
    if cfg.stream.skip_unreadable and not in_memory(data):
        data, kwargs["collate_fn"] = SkipUnreadable(data, SKIPPED_LOG), skipping_collate
    return DataLoader(data, num_workers=workers, persistent_workers=persistent and workers > 0, **kwargs)


def stats_loader(data: Dataset, cfg: DictConfig) -> DataLoader:
    """This process's disjoint share of ``data``, in order, for statistics passes."""
    return _loader(Subset(data, distributed.shard(len(data))), cfg, batch_size=cfg.stream.eval_batch_size)


def train_loader(
    data: Dataset, cfg: DictConfig, session: int, batch_size: int | None = None, start_epoch: int = 0
) -> DataLoader:
    """The session's training loader. ``start_epoch``: the epoch a resumed fit starts at. Lightning creates the
    first iterator before it sets the sampler's epoch, and loader workers draw their first batches from it at once,
    so the sampler must already know that epoch."""
    batch_size = batch_size or cfg.stream.batch_size
    # online: one sequence in the stream's order (already shuffled within each original session)
    sampler = EpochSeededSampler(data, derived_seed(cfg.run.seed, session), start_epoch, shuffle=not cfg.stream.online)
    augmented = not in_memory(data)  # items that may be augmented: seeded per (epoch, index) wherever they load
    batches = (EpochItemBatchSampler if augmented else EveryItemBatchSampler)(sampler, batch_size, cfg.stream.drop_last)
    if augmented:
        data = SeededItems(data, cfg.run.seed, session)
    # its own generator: creating the iterator then draws no number from the global generator, whose state must
    # not depend on whether the fit was resumed (a resumed fit creates its iterator at another moment)
    generator = torch.Generator().manual_seed(derived_seed(cfg.run.seed, session))
    return _loader(data, cfg, persistent=True, batch_sampler=batches, generator=generator)


def stream_transforms(backbone: torch.nn.Module, cfg: DictConfig, **stream_defaults: Any) -> Transforms:
    """The backbone's transforms as the config asks; a stream's defaults (``crop_pct``) yield to the config's."""
    kwargs = {
        **stream_defaults,
        "augment_kwargs": OmegaConf.to_container(cfg.stream.augment_kwargs),
        "normalize": cfg.stream.normalize,
        "interpolation": cfg.stream.interpolation,
        "crop_mode": cfg.stream.crop_mode,
        "mean": None if cfg.stream.mean is None else list(cfg.stream.mean),
        "std": None if cfg.stream.std is None else list(cfg.stream.std),
    }
    if cfg.stream.crop_pct is not None:
        kwargs["crop_pct"] = cfg.stream.crop_pct
    return data_transforms(backbone, cfg.backbone.image_size, cfg.stream.augment, **kwargs)
