"""Evaluation after a session: a confusion matrix over the test data of every session so far (every session with
``trainer.eval_unseen``, for forward transfer), summed across processes under DDP (Lightning's predict loop gives
every process a disjoint, unpadded share, so nothing is counted twice). The metrics are computed from it by
:mod:`cil.metrics`."""

from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cil.features import ClassifyFeatures, FeaturesOf, FeatureStore, shard_key
from cil.loaders import stats_loader
from cil.module import CILModule
from cil.trainers import make_trainer


class ConfusionCollector(Callback):
    """Counts ``C[true, predicted]`` from ``predict_step``'s (predictions, targets), summed over processes."""

    def __init__(self, n_classes: int):
        self.n_classes = n_classes
        self.confusion = torch.zeros(n_classes * n_classes, dtype=torch.int64)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        predictions, targets = outputs
        index = targets.long().cpu() * self.n_classes + predictions.long().cpu()
        self.confusion += torch.bincount(index, minlength=self.n_classes**2)

    def on_predict_end(self, trainer, pl_module) -> None:
        total = trainer.strategy.reduce(self.confusion.to(pl_module.device), reduce_op="sum")
        self.confusion = total.cpu()

    def matrix(self) -> np.ndarray:
        return self.confusion.view(self.n_classes, self.n_classes).numpy()


def evaluate(
    strategy: CILModule, stream, session: int, cfg: DictConfig, store: FeatureStore | None = None, root=None
) -> np.ndarray:
    """Confusion matrix over the test data of sessions 0..session (all sessions with ``eval_unseen``).

    Each process predicts its own share of each test set (``stats_loader``: disjoint, unpadded). With a ``store``
    and a strategy whose features are frozen, it classifies the stored features of each test set instead, computing
    them (with the same batches) only where the store has none: the same predictions, one body pass per run.
    ``root``: the run folder (Lightning's root folder, see :func:`cil.trainers.make_trainer`)."""
    upto = stream.n_sessions if cfg.trainer.eval_unseen else session + 1
    sets = list(stream.eval_data[:upto])
    collector = ConfusionCollector(stream.n_classes)
    evaluator = make_trainer(
        cfg, root, logger=False, enable_checkpointing=False, callbacks=[collector], use_distributed_sampler=False
    )
    if store is not None and strategy.features_frozen:
        loaders = stored_features(strategy, sets, cfg, store, root)
        evaluator.predict(ClassifyFeatures(strategy), dataloaders=loaders, return_predictions=False)
    else:
        loaders = [stats_loader(data, cfg) for data in sets]
        evaluator.predict(strategy, dataloaders=loaders, return_predictions=False)
    return collector.matrix()


def stored_features(
    strategy: CILModule, sets: list[Dataset], cfg: DictConfig, store: FeatureStore, root=None
) -> list[DataLoader]:
    """Loaders over the stored frozen features of this process's share of each data set, in the batches
    ``stats_loader`` gives; features missing from the store are computed first (one Lightning predict)."""
    batch = cfg.stream.eval_batch_size
    digest = strategy.features_digest()
    keys = [store.key(digest, data, *shard_key(batch)) for data in sets]
    found = [store.get(key) for key in keys]
    todo = [i for i, f in enumerate(found) if f is None]
    if todo:
        extractor = make_trainer(cfg, root, logger=False, enable_checkpointing=False, use_distributed_sampler=False)
        outputs = extractor.predict(FeaturesOf(strategy), dataloaders=[stats_loader(sets[i], cfg) for i in todo])
        outputs = [outputs] if len(todo) == 1 else outputs  # Lightning unwraps a single loader's outputs
        for i, batches in zip(todo, outputs):
            features = torch.cat([f for f, _ in batches]) if batches else torch.empty(0)
            labels = torch.cat([y for _, y in batches]) if batches else torch.empty(0, dtype=torch.long)
            store.put(keys[i], features, labels)
            found[i] = (features, labels)
    return [DataLoader(TensorDataset(*f), batch_size=batch) for f in found]
