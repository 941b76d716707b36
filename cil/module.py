"""The strategy contract: a LightningModule with two session hooks and a classifier that grows with the classes.

In any Lightning project a strategy is driven by three lines per session::

    strategy.begin_session(session)
    trainer.fit(strategy, loader)        # skipped when strategy.epochs_for(session) == 0
    strategy.end_session(session)

``forward(x)`` returns logits over every class seen so far (class ids are contiguous, in order of appearance).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from cil.config import TrainingConfig, strategy_settings  # TrainingConfig re-exported: strategies' configs extend it
from cil.features import tensor_digest
from cil.layers.growing import GrowingClassifier


@dataclass
class Session:
    """What a strategy learns about a session before and after it is trained on it.

    ``class_names``, ``session_classes`` and ``templates`` describe the whole stream up front (names by class id,
    the class ids of every session, and each session's text prompts, empty when the stream has none): what a
    zero-shot classifier such as ZSCL's needs to score classes it has not trained on. ``unlabelled_data`` is the
    data set of ``stream.unlabelled`` (items ``(x, y)`` whose labels must not be read): DKVB fits its keys on it.

    ``train_loader()`` gives this process's share of the session's training data with evaluation transforms
    and no shuffling: the input of statistics passes (prototypes, LDA, class covariances). Sums over it must be
    all-reduced (``cil.distributed.all_reduce_sum``) so the result is the same under DDP.
    """

    index: int
    new_classes: list[int]
    seen_classes: list[int]
    train_data: Optional[Dataset] = None
    seen_train_data: list[Dataset] = field(default_factory=list)
    loader_fn: Optional[Callable[[], Iterable]] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    class_names: list[str] = field(default_factory=list)
    session_classes: list[list[int]] = field(default_factory=list)
    templates: list[list[str]] = field(default_factory=list)
    unlabelled_data: Optional[Dataset] = None
    batch_size: int = 32  # the stream's training batch size (stream.batch_size)
    # the session's Lightning loggers (trainer.loggers) for a strategy that trains outside Lightning's fit
    make_loggers: Optional[Callable[[], list]] = None

    @property
    def num_seen(self) -> int:
        return len(self.seen_classes)

    def train_loader(self) -> Iterable:
        if self.loader_fn is None:
            raise RuntimeError(f"Session {self.index} has no loader_fn; pass Session(..., loader_fn=make_loader)")
        return self.loader_fn()


class CILModule(pl.LightningModule):
    """Base of every strategy: a backbone, a growing classifier and the session hooks.

    Subclasses take their hyper-parameters as keyword settings and build them with :meth:`save_settings` from
    their config dataclass (``cil.strategies.configs``), the one place their defaults and choices are written; they
    override the hooks they need. The defaults implement plain cross-entropy training of backbone and head.
    """

    def __init__(self, backbone: nn.Module, num_features: Optional[int] = None):
        super().__init__()
        self.backbone = backbone
        num_features = num_features if num_features is not None else getattr(backbone, "num_features", None)
        if num_features is None:
            raise ValueError("num_features is required for a backbone without a `num_features` attribute")
        self.num_features = int(num_features)
        self.classifier = GrowingClassifier(self.num_features)
        self.session_index = -1

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Checks of a validated config that need the strategy's own libraries, asked by ``cil run`` before a model
        is built or any data loads (the config schema has checked the rest). Nothing by default."""

    def save_settings(self, config: type, settings: dict[str, Any], exclude: Sequence[str] = ()) -> Any:
        """``config`` (a dataclass) built from the keyword ``settings`` and checked (:func:`cil.config.
        strategy_settings`), saved as Lightning hyper-parameters (``self.hparams``, every field); ``exclude``:
        settings that are objects rather than values (a data set given in place of a folder)."""
        made = strategy_settings(config, settings)
        names = [f.name for f in dataclasses.fields(made) if f.name != "name" and f.name not in exclude]
        self.save_hyperparameters({name: getattr(made, name) for name in names})  # no deep copy of objects
        return made

    # ---- session hooks --------------------------------------------------------------------------------
    def begin_session(self, session: Session) -> None:
        """Before ``fit``: grow the head to every class seen so far."""
        self.session_index = session.index
        self.classifier.grow(session.num_seen)

    def end_session(self, session: Session) -> None:
        """After ``fit``: statistics passes, merging, alignment. Nothing by default."""

    def epochs_for(self, session: Session) -> int:
        """Epochs to train in ``session``; 0 skips ``fit`` (the hooks still run)."""
        return int(self.hparams.get("epochs", 0))

    def epochs_trained(self, session: Session) -> int:
        """The epochs the run records for ``session``: those of ``fit``, unless the strategy trains by other
        means (Avalanche's own loop)."""
        return self.epochs_for(session)

    def steps_for(self, session: Session) -> Optional[int]:
        """Optimiser steps to train in ``session`` (``Trainer(max_steps=...)``, cycling the data); None: epochs."""
        return None

    def batch_size_for(self, session: Session) -> Optional[int]:
        """The training batch size of ``session``; None keeps ``stream.batch_size``."""
        return None

    def train_data(self, session: Session) -> Dataset:
        """The data ``fit`` trains on in ``session``: the session's own data by default."""
        return session.train_data

    # ---- features and head: ``forward(x) == classify(features(x))`` ---------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The body's output: the input of ``classify``."""
        return self.backbone(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over the classes seen so far, from ``features(x)``."""
        return self.classifier(features)

    @property
    def features_frozen(self) -> bool:
        """True while ``features(x)`` cannot change for the rest of the run (a frozen pre-trained body, FSA's body
        after session 1): the session loop then computes each evaluation image's features once per run and
        reuses them (:mod:`cil.features`). A strategy that opts in must keep ``forward(x)`` equal to
        ``classify(features(x))`` and name the tensors behind ``features`` in ``feature_prefixes``."""
        return False

    def feature_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of every tensor ``features`` reads: their digest keys the cached features."""
        return ("backbone.",)

    def features_digest(self) -> str:
        prefixes = self.feature_prefixes()
        return tensor_digest({k: v for k, v in self.state_dict().items() if k.startswith(prefixes)})

    # ---- Lightning -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0], batch[1]  # Avalanche items may carry a task label third
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        if self.logs_this_step():
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
        return loss

    def logs_this_step(self) -> bool:
        """Whether the loggers write this training step: one step in ``trainer.log_every_n_steps``, and a step the
        fit stops after (``trainer.should_stop`` set before it, as cil's step budget does). A strategy calls
        ``self.log`` in ``training_step`` only then: each call costs Lightning about 0.3 ms
        (``benchmarks/loop_overhead.py``), and the values of the other steps are never written. The logs stay the
        same (tested). The step must not log at all otherwise: Lightning would write the last logged value again
        under a later step. Under Lightning Fabric every step (Fabric writes each call); in a bare loop, never
        (``self.log`` would only warn that there is no Trainer)."""
        trainer = self._trainer
        if trainer is None:
            return self._fabric is not None
        # Lightning's own test for writing a step's metrics; it counts the step being run, so it holds before the
        # step as after
        return trainer._logger_connector.should_update_logs

    def on_fit_start(self) -> None:
        # Lightning keeps the mode the module is in, and statistics passes leave it in eval mode: train now
        # (a strategy's own ``train`` override decides what stays in eval mode, e.g. FSA's frozen body)
        self.train()

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0):
        """(predicted class, true class) per sample: what the evaluator counts."""
        return self(batch[0]).argmax(1), batch[1]

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "constant":
            return optimizer
        epochs = max(1, self.trainer.max_epochs or 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ---- checkpoints without the tensors the config rebuilds ----------------------------------------------
    def rebuildable_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes whose tensors are exactly what the constructor builds from the config and never
        change (a frozen pre-trained encoder, ZSCL's teacher): checkpoints leave them out, since rewriting ~1 GB
        of frozen weights at every checkpoint costs disk and time for nothing, and keep a digest that loading
        checks against the rebuilt tensors. None by default."""
        return ()

    def _split_state(self, state: dict[str, Any]) -> tuple[dict[str, Any], Optional[str]]:
        prefixes = self.rebuildable_prefixes()
        kept = {k: v for k, v in state.items() if not k.startswith(prefixes)} if prefixes else dict(state)
        left_out = {k: v for k, v in state.items() if k not in kept}
        return kept, (tensor_digest(left_out) if left_out else None)

    def checkpoint_state(self) -> tuple[dict[str, Any], Optional[str]]:
        """(the state dict without the rebuildable tensors, their digest or None)."""
        return self._split_state(self.state_dict())

    def complete_state(self, state: dict[str, Any], digest: Optional[str]) -> dict[str, Any]:
        """``state`` with the tensors it left out taken from this (freshly built) strategy, after checking that
        they are the ones the checkpoint was written with."""
        missing = {k: v for k, v in self.state_dict().items() if k not in state}
        if digest is None:
            return dict(state)
        rebuilt = {k: v for k, v in missing.items() if k.startswith(self.rebuildable_prefixes())}
        if tensor_digest(rebuilt) != digest:
            from cil.config import ConfigError

            names = sorted({k.split(".")[0] for k in rebuilt}) or ["(none)"]
            raise ConfigError(
                f"the checkpoint was written with other {'/'.join(names)} weights than the config builds now "
                "(backbone.name, backbone.weights or backbone.pretrained changed?); resume with the run's config.yaml"
            )
        return {**state, **rebuilt}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"], checkpoint["cil_rebuilt_digest"] = self._split_state(checkpoint["state_dict"])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.complete_state(checkpoint["state_dict"], checkpoint.get("cil_rebuilt_digest"))

    def load_checked(self, state: dict[str, Any]) -> None:
        """``load_state_dict`` (strict), with a ConfigError naming the keys that differ when the checkpoint does not
        fit this strategy (another backbone or strategy than the run's config.yaml), not a traceback. Modules that
        grow on load (heads, adapter snapshots, Mamba-FSCIL's new branch) keep doing so."""
        from cil.config import ConfigError

        try:
            self.load_state_dict(state)
        except RuntimeError as e:
            lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
            detail = "; ".join(line[:300] for line in lines[:2]) or str(e).splitlines()[0]
            raise ConfigError(
                f"the checkpoint does not fit the strategy its config.yaml builds now (another backbone or strategy?): "
                f"{detail}"
            ) from None


def run_session(
    strategy: CILModule, session: Session, make_trainer: Callable[[int], pl.Trainer], *fit_args: Any, **fit_kwargs: Any
) -> None:
    """The strategy contract's three lines for a Lightning project of its own: ``begin_session``,
    ``make_trainer(epochs).fit(strategy, *fit_args, **fit_kwargs)`` when the strategy trains in this session, then
    ``end_session``. ``make_trainer`` gets the epochs the strategy asks for (its ``steps_for`` budget, if any, is
    the caller's to pass as ``max_steps``)."""
    strategy.begin_session(session)
    epochs = strategy.epochs_for(session)
    if epochs > 0:
        make_trainer(epochs).fit(strategy, *fit_args, **fit_kwargs)
    strategy.end_session(session)


@torch.no_grad()
def accuracy_row(
    strategy: CILModule,
    test_sets: Iterable[Any],
    batch_size: int = 256,
    device: Optional[torch.device] = None,
    store: Any = None,
) -> list[float]:
    """Accuracy on each test set (one per session, seen or not yet): one row of the accuracy matrix R. A test set
    is a Dataset of ``(x, y, ...)`` items or a DataLoader of such batches.

    ``store``: a :class:`cil.features.FeatureStore` kept across calls. While ``strategy.features_frozen``, each
    test set's features are then computed once and reused by every later call (the same predictions: the same
    batches go through ``features`` and then ``classify``)."""
    from torch.utils.data import DataLoader

    device = device or next(strategy.parameters()).device
    strategy.eval()
    reuse = store is not None and strategy.features_frozen
    digest = strategy.features_digest() if reuse else ""
    row = []
    for data in test_sets:
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
        key = store.key(digest, loader.dataset, loader.batch_size, "accuracy_row") if reuse else None
        cached = store.get(key) if reuse else None
        if cached is not None:
            size = loader.batch_size or len(cached[0])
            batches = [(f, y, True) for f, y in zip(cached[0].split(size), cached[1].split(size))]
        else:
            batches = ((batch[0], batch[1], False) for batch in loader)
        right, total, kept = 0, 0, []
        for x, y, is_features in batches:
            if is_features:
                logits = strategy.classify(x.to(device))
            elif reuse:
                features = strategy.features(x.to(device))
                kept.append((features.cpu(), torch.as_tensor(y).cpu()))
                logits = strategy.classify(features)
            else:  # forward: a strategy that does not opt in to reuse may predict otherwise (MOS's retrieval)
                logits = strategy(x.to(device))
            predicted = logits.argmax(1).cpu()
            right += int((predicted == y).sum())
            total += len(y)
        if kept:
            store.put(key, torch.cat([f for f, _ in kept]), torch.cat([y for _, y in kept]))
        row.append(right / total if total else float("nan"))
    return row


def create_strategy(cfg: DictConfig) -> CILModule:
    """The strategy of a validated experiment config, on the backbone its ``backbone`` group describes."""
    from cil import registry
    from cil.backbones import backbone_from_config

    cls = registry.strategy_class(cfg.strategy.name)
    hparams = OmegaConf.to_container(cfg.strategy, resolve=True)
    hparams.pop("name")
    return cls(backbone_from_config(cfg.backbone), **hparams)


__all__ = [
    "Session",
    "CILModule",
    "TrainingConfig",
    "accuracy_row",
    "create_strategy",
    "run_session",
]
