"""Avalanche's own strategies as cil runs: Replay, LwF, EWC, iCaRL, GDumb, DER, ER-ACE, ... beside cil's methods.

``strategy.avalanche`` names a strategy class exported by ``avalanche.training`` and ``strategy.kwargs`` its own
keyword arguments; cil gives it the rest, as Avalanche's examples do and as for cil's ``finetune``:

- the model: cil's backbone (timm, a weights file, ``package:`` weights) followed by Avalanche's
  ``IncrementalClassifier``; iCaRL gets the backbone as its ``feature_extractor`` and a linear ``classifier`` over
  every class of the stream, as its signature asks;
- the optimiser (``strategy.optimizer``, ``lr``, ``momentum``, ``weight_decay``) and the per-session schedule
  (``strategy.scheduler: cosine`` → ``LRSchedulerPlugin(CosineAnnealingLR(T_max=epochs))``, reset at each
  experience as Avalanche does), ``train_epochs=strategy.epochs``, ``train_mb_size=stream.batch_size``;
- the data: each session's training set with task label 0 (a class-incremental stream, as Avalanche's own
  SplitMNIST), as experience ``k`` of a benchmark of the sessions seen so far, with the class timeline and the
  legacy ``benchmark.n_classes_per_exp`` / ``classes_order`` that iCaRL reads.

Training is Avalanche's ``strategy.train(experience)``, unchanged: cil's Lightning fit is skipped (``epochs_for``
is 0; the run records Avalanche's epochs). Evaluation is cil's, after every session, as for every strategy, so the
accuracy matrix, metrics, report and notebook treat both alike; Avalanche's evaluator gets no metric and no logger.

Checkpoints are what PyTorch's safe loader reads (no pickled objects): the model, the optimiser (with its
parameters by name), the scheduler, and every plugin's and the strategy's own state encoded as tensors, numbers,
strings and containers. Objects of Avalanche's, torch's, timm's and cil's classes are stored as their attributes
and rebuilt without running their code; a data set in a buffer is stored as the (session, item) of each of its
samples and rebuilt as the same subset of the same session data (transform group and extra attributes such as
DER's logits included), so a replay buffer survives a resume exactly.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import warnings
from types import FunctionType, SimpleNamespace
from typing import Any

import torch
from torch import nn

from cil.errors import ConfigError
from cil.module import CILModule, Session
from cil.strategies.configs import AvalancheConfig

# what cil gives every strategy (a config cannot give objects); `strategy.kwargs` may not set them
PROVIDED = ("model", "optimizer", "criterion", "train_mb_size", "train_epochs", "eval_mb_size", "device", "plugins",
            "evaluator", "eval_every")  # fmt: skip
ICARL_PROVIDED = ("feature_extractor", "classifier")
# classes that cannot run on a cil stream from a config, and why
REFUSED = {
    "PNNStrategy": "needs task labels (one column per task); cil streams are class-incremental (one task label)",
    "ExpertGateStrategy": "needs task labels (one expert per task); cil streams are class-incremental",
    "PackNet": "needs task labels (one mask per task); cil streams are class-incremental",
    "JointTraining": "trains on the whole stream at once; cil's `joint` strategy is its session-wise counterpart",
    "StreamingLDA": "has no optimiser; cil's `fsa` with adaptation=none, lda_mode=slda is the same head",
    "AR1": "builds and downloads its own MobileNet instead of taking a model",
    "LearningToPrompt": "builds its own ViT by name (model_name) instead of taking a model",
    "AETraining": "trains an autoencoder, not a classifier",
    "VAETraining": "trains a variational autoencoder, not a classifier",
    "GenerativeReplay": "needs a generator model of its own",
}
# packages whose objects a checkpoint may store as their attributes, and rebuild without running their code
TRUSTED = ("avalanche", "torch", "timm", "cil", "open_clip", "collections")
BUILTINS = ("builtins:dict", "builtins:list", "builtins:set", "builtins:int", "builtins:float")


def _is_trusted(path: str) -> bool:
    """``path`` ("module:qualname") names an attribute of a trusted package (or a plain builtin type)."""
    module = path.partition(":")[0]
    return path in BUILTINS or any(module == p or module.startswith(p + ".") for p in TRUSTED)


TRANSIENT = (torch.utils.data.DataLoader,)  # rebuilt by Avalanche at every experience


@contextlib.contextmanager
def _expected_warnings():
    """Avalanche's warnings that are not news in a cil run: qpsolvers' "no QP solver" at import (GEM's solver is
    quadprog), "no loggers" (cil evaluates and logs), its own deprecations of 0.7. Its deprecation decorator resets
    the warning filters at every call, so they are dropped where they are shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="no QP solver found")
        warnings.filterwarnings("ignore", message="No loggers specified")
        show = warnings.showwarning

        def shown(message, category, filename, *args, **kwargs):
            if issubclass(category, DeprecationWarning) and "avalanche" in str(filename):
                return
            show(message, category, filename, *args, **kwargs)

        warnings.showwarning = shown
        yield


def _avalanche_training():
    with _expected_warnings():
        import avalanche.training

        return avalanche.training


def strategy_classes() -> dict[str, type]:
    """Every strategy class ``avalanche.training`` exports, by name."""
    training = _avalanche_training()
    from avalanche.training.templates import BaseTemplate

    return {
        n: c
        for n in dir(training)
        if inspect.isclass(c := getattr(training, n)) and issubclass(c, BaseTemplate) and not n.endswith("Template")
    }


def check_strategy(name: str, kwargs: dict[str, Any]) -> type:
    """The Avalanche class ``name``, after checking ``kwargs`` against its signature: one line naming what is
    valid otherwise (raised when the strategy is built, before any data loads)."""
    import difflib

    classes = strategy_classes()
    if name in REFUSED:
        raise ConfigError(f"strategy.avalanche={name}: {REFUSED[name]}")
    if name not in classes:
        close = difflib.get_close_matches(name, list(classes), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        usable = sorted(set(classes) - set(REFUSED))
        raise ConfigError(
            f"strategy.avalanche={name!r} is not a strategy of avalanche.training{hint}; valid: {', '.join(usable)}"
        )
    cls = classes[name]
    parameters = inspect.signature(cls).parameters
    provided = PROVIDED + (ICARL_PROVIDED if name == "ICaRL" else ())
    taken = sorted(set(kwargs) & set(provided))
    if taken:
        raise ConfigError(
            f"strategy.kwargs.{taken[0]}: set by cil for every Avalanche strategy (model from backbone.*, optimiser "
            "from strategy.optimizer/lr/momentum/weight_decay, train_epochs from strategy.epochs, train_mb_size from "
            "stream.batch_size); remove it"
        )
    # the templates pass **kwargs up the class chain to object.__init__, which refuses any: the valid names are
    # those of every __init__ on the way
    named = list(dict.fromkeys(
        n
        for klass in cls.__mro__
        if "__init__" in vars(klass) and klass is not object
        for n, p in inspect.signature(klass.__init__).parameters.items()
        if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ))  # fmt: skip
    valid = [n for n in named if n not in provided]
    for key in kwargs:
        if key not in named:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"strategy.kwargs.{key}: not an argument of {name}{hint}; valid: {', '.join(valid)}")
    defaults = {"buffer_transform": None, "fixed_memory": True} if name == "ICaRL" else {}
    missing = [
        n
        for n, p in parameters.items()
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        and n not in provided and n not in kwargs and n not in defaults
    ]  # fmt: skip
    if missing:
        raise ConfigError(
            f"strategy.kwargs: {name} needs {', '.join(missing)} (no default in its signature); e.g. "
            f"strategy.kwargs.{missing[0]}=..."
        )
    return cls


class AvalancheStrategy(CILModule):
    """An Avalanche strategy trained by Avalanche's own code, evaluated and checkpointed by cil."""

    def __init__(self, backbone: nn.Module, num_features: int | None = None, **settings: Any):
        super().__init__(backbone, num_features)
        hp = self.save_settings(AvalancheConfig, settings)
        self.avalanche_class = check_strategy(hp.avalanche, dict(hp.kwargs))
        del self.classifier  # the head is Avalanche's (built with the strategy, at the first session)
        self.model: nn.Module | None = None
        self.trainer_: Any = None  # the Avalanche strategy
        self._sessions: list[Any] = []  # each session's training set with task labels and item ids
        self._pending: dict[str, Any] | None = None  # a checkpoint to apply once the strategy is built

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        check_strategy(str(cfg.strategy.avalanche), dict(cfg.strategy.kwargs or {}))
        devices = cfg.trainer.devices
        several = isinstance(devices, int) and devices > 1 or not isinstance(devices, (int, str)) and len(devices) > 1
        if several or cfg.trainer.num_nodes > 1:
            raise ConfigError(
                f"strategy.name=avalanche trains in one process (Avalanche's loop, not Lightning's): trainer.devices="
                f"{devices} trainer.num_nodes={cfg.trainer.num_nodes} would train one copy per process; use one device"
            )

    # ---- the Avalanche strategy -------------------------------------------------------------------------------
    def _build(self, session: Session) -> None:
        from avalanche.models import IncrementalClassifier
        from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin

        hp = self.hparams
        kwargs = dict(hp.kwargs)
        if hp.avalanche == "ICaRL":
            n_classes = sum(len(c) for c in session.session_classes)
            parts = {"feature_extractor": self.backbone, "classifier": nn.Linear(self.num_features, n_classes)}
            params = [p for m in parts.values() for p in m.parameters()]
            kwargs = {"buffer_transform": None, "fixed_memory": True, **parts, **kwargs}
        else:
            first = len(session.session_classes[0]) if session.session_classes else 2
            model = nn.Sequential(self.backbone, IncrementalClassifier(self.num_features, first))
            params = list(model.parameters())
            kwargs = {"model": model, "criterion": nn.CrossEntropyLoss(), **kwargs}
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        plugins = [_progress_plugin()]
        if hp.scheduler == "cosine":
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, hp.epochs))
            plugins.append(LRSchedulerPlugin(cosine))
        with _expected_warnings():
            self.trainer_ = self.avalanche_class(
                optimizer=optimizer,
                train_mb_size=session.batch_size,
                train_epochs=hp.epochs,
                eval_mb_size=session.batch_size,
                device=session.device,
                plugins=plugins,
                evaluator=EvaluationPlugin(loggers=[]),
                eval_every=-1,
                **kwargs,
            )
        self._adopt_model()
        if self._pending is not None:
            _restore(self.trainer_, self._pending, self._sessions)
            self._adopt_model()
            self._pending = None

    def _adopt_model(self) -> None:
        """The Avalanche strategy's model (a restored checkpoint's, or GDumb's fresh copy of every experience) as
        this module's ``model``, and its body as ``backbone``: the replaced ones are not kept alive beside it."""
        self.model = self.trainer_.model
        icarl = hasattr(self.model, "feature_extractor")  # iCaRL's TrainEvalModel, else our Sequential
        self.backbone = self.model.feature_extractor if icarl else self.model[0]

    def _experience(self, session: Session):
        """Session ``k`` as experience ``k`` of a benchmark of the sessions seen so far (task label 0)."""
        from avalanche.benchmarks import benchmark_from_datasets, with_classes_timeline, with_task_labels
        from avalanche.benchmarks.utils.classification_dataset import TaskAwareClassificationDataset
        from avalanche.benchmarks.utils.data_attribute import DataAttribute, TaskLabels
        from avalanche.benchmarks.utils.flat_data import ConstantSequence

        for k in range(len(self._sessions), len(session.seen_train_data)):
            data = session.seen_train_data[k]
            ids = torch.arange(len(data), dtype=torch.long) + (k << 32)  # (session, item) of every sample
            self._sessions.append(
                TaskAwareClassificationDataset(
                    [data], data_attributes=[TaskLabels(ConstantSequence(0, len(data))), DataAttribute(ids, "cil_item")]
                )
            )
        bench = with_task_labels(
            with_classes_timeline(benchmark_from_datasets(train=self._sessions[: session.index + 1]))
        )
        experience = bench.train_stream[session.index]
        # Avalanche 0.6's iCaRL reads these legacy attributes, which benchmark_from_datasets' experiences lack
        # (labels are in order of appearance, so the class order is 0..n-1)
        sizes = [len(c) for c in session.session_classes]
        experience.benchmark = SimpleNamespace(n_classes_per_exp=sizes, classes_order=list(range(sum(sizes))))
        return experience

    # ---- the session hooks ----------------------------------------------------------------------------------
    def begin_session(self, session: Session) -> None:
        from cil import distributed

        if distributed.world_size() > 1:
            raise ConfigError("strategy.name=avalanche trains in one process: run it on one device (trainer.devices=1)")
        self.session_index = session.index
        experience = self._experience(session)
        if self.trainer_ is None:
            # on a fork of the random generator: the draws of the head's initialisation must not shift the
            # session's own draws, as they would in a resumed run that builds the strategy at a later session
            with torch.random.fork_rng(devices=[]):
                self._build(session)
        progress = next(p for p in self.trainer_.plugins if getattr(p, "cil_progress", False))
        progress.loggers = session.make_loggers() if session.make_loggers is not None else []
        with _expected_warnings():
            self.trainer_.train(experience, num_workers=0)
        for logger in progress.loggers:  # as Lightning ends a fit's loggers
            logger.save()
            logger.finalize("success")
        progress.loggers = []
        self._adopt_model()  # a strategy may have replaced it (GDumb retrains a fresh copy)

    def epochs_for(self, session: Session) -> int:
        return 0  # Avalanche trained in begin_session; Lightning fits nothing

    def epochs_trained(self, session: Session) -> int:
        return int(self.hparams.epochs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("an Avalanche model predicts from images (forward), not from stored features")

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in (self.model or self).parameters() if p.requires_grad)

    # ---- checkpoints: what the safe loader reads --------------------------------------------------------------
    def checkpoint_state(self) -> tuple[dict[str, Any], None]:
        return {"avalanche": _snapshot(self.trainer_, self._sessions), "session_index": self.session_index}, None

    def complete_state(self, state: dict[str, Any], digest: Any) -> dict[str, Any]:
        return dict(state)

    def load_checked(self, state: dict[str, Any]) -> None:
        if set(state) != {"avalanche", "session_index"} or state["avalanche"].get("class") != self.hparams.avalanche:
            raise ConfigError(
                "the checkpoint was not written by this Avalanche strategy (strategy.avalanche changed?); resume "
                "with the run's config.yaml"
            )
        _check_names(state["avalanche"])  # a crafted checkpoint is refused now, before any session runs
        self._pending = state["avalanche"]  # applied once the strategy is built, at the next session


# ---- the encoding of an Avalanche strategy's state -----------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _base_attributes() -> frozenset[str]:
    """The attributes every supervised template has (the per-batch, per-experience state Avalanche rebuilds):
    a strategy's own attributes are the others."""
    from avalanche.training import Naive

    probe = nn.Linear(1, 1)
    with _expected_warnings():
        naive = Naive(model=probe, optimizer=torch.optim.SGD(probe.parameters(), lr=0.1), evaluator=_quiet())
    return frozenset(vars(naive))


def _quiet():
    from avalanche.training.plugins import EvaluationPlugin

    return EvaluationPlugin(loggers=[])


def _kept_plugins(strategy) -> list[Any]:
    """The plugins whose state a checkpoint keeps: all but cil's own (evaluator, progress bar, scheduler)."""
    from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin

    ours = (EvaluationPlugin, LRSchedulerPlugin)
    return [p for p in strategy.plugins if not isinstance(p, ours) and not getattr(p, "cil_progress", False)]


def _progress_plugin():
    """A progress bar per epoch of Avalanche's training loop, under cil's rule (:mod:`cil.progress`)."""
    from avalanche.core import SupervisedPlugin

    from cil.progress import progress

    class Progress(SupervisedPlugin):
        """The bar, and the loss of every step for the session's Lightning loggers (``trainer.loggers``), as a
        Lightning fit logs ``train/loss``."""

        cil_progress = True
        loggers: list = []

        def before_training_epoch(self, strategy, **kwargs):
            clock = strategy.clock
            epoch = f"epoch {clock.train_exp_epochs + 1}/{strategy.train_epochs}"
            desc = f"session {clock.train_exp_counter + 1} {epoch}"
            self.bar = progress(total=len(strategy.dataloader), desc=desc, leave=False)

        def after_training_iteration(self, strategy, **kwargs):
            self.bar.update(1)
            if self.bar.disable and not self.loggers:
                return  # the loss is read back (a device sync) only for a bar or a logger
            loss = float(strategy.loss.detach())
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            step = strategy.clock.train_exp_iterations  # the Clock (a later plugin) counts this step after us
            for logger in self.loggers:
                logger.log_metrics({"train/loss": loss, "epoch": strategy.clock.train_exp_epochs}, step=step)

        def after_training_epoch(self, strategy, **kwargs):
            self.bar.close()

    return Progress()


def _scheduler(strategy):
    from avalanche.training.plugins import LRSchedulerPlugin

    found = [p.scheduler for p in strategy.plugins if isinstance(p, LRSchedulerPlugin)]
    return found[0] if found else None


def _snapshot(strategy, sessions: list[Any]) -> dict[str, Any]:
    model = strategy.model
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in strategy.optimizer.param_groups:
        missing = [p for p in group["params"] if id(p) not in names]
        if missing:
            raise RuntimeError("the optimiser holds parameters that are not the model's: cannot checkpoint it")
        groups.append([names[id(p)] for p in group["params"]])
    scheduler = _scheduler(strategy)
    own = {k: v for k, v in vars(strategy).items() if k not in _base_attributes()}
    encoder = _Encoder(sessions)
    return {
        "class": type(strategy).__name__,
        "model": encoder.encode(model, "model"),
        "optimizer": strategy.optimizer.state_dict(),
        "optimizer_params": groups,
        "optimized_param_id": None if strategy.optimized_param_id is None else list(strategy.optimized_param_id),
        "scheduler": None if scheduler is None else scheduler.state_dict(),
        "plugins": [
            {"class": type(p).__name__, "state": encoder.encode(dict(vars(p)), type(p).__name__)}
            for p in _kept_plugins(strategy)
        ],
        "own": encoder.encode(own, type(strategy).__name__),
    }


def _restore(strategy, state: dict[str, Any], sessions: list[Any]) -> None:
    decoder = _Decoder(sessions)
    model = decoder.decode(state["model"])
    strategy.model = model
    named = dict(model.named_parameters())
    for group, names in zip(strategy.optimizer.param_groups, state["optimizer_params"]):
        group["params"] = [named[n] for n in names]
    strategy.optimizer.load_state_dict(state["optimizer"])
    if state["optimized_param_id"] is not None:
        strategy.optimized_param_id = {n: named[n] for n in state["optimized_param_id"]}
    scheduler = _scheduler(strategy)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    plugins = _kept_plugins(strategy)
    if [type(p).__name__ for p in plugins] != [p["class"] for p in state["plugins"]]:
        raise ConfigError("the checkpoint's Avalanche plugins differ from the strategy's (strategy.kwargs changed?)")
    for plugin, saved in zip(plugins, state["plugins"]):
        plugin.__dict__.update(decoder.decode(saved["state"]))
    for key, value in decoder.decode(state["own"]).items():
        setattr(strategy, key, value)


class _Encoder:
    """Python objects → tensors, numbers, strings, lists and tagged dicts (what ``torch.load(weights_only=True)``
    reads). Shared references stay shared (``__ref__``)."""

    def __init__(self, sessions: list[Any]):
        self.sessions, self.seen, self.alive = sessions, {}, []  # alive: ids stay unique while encoding

    def encode(self, obj: Any, path: str) -> Any:
        from avalanche.benchmarks.utils import AvalancheDataset

        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        if isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Parameter):
            return obj.detach().cpu()
        if id(obj) in self.seen:
            return {"__ref__": self.seen[id(obj)]}
        self.seen[id(obj)] = tag = len(self.seen)
        self.alive.append(obj)
        if isinstance(obj, nn.Parameter):
            return {"__parameter__": obj.detach().cpu(), "grad": obj.requires_grad, "id": tag}
        if isinstance(obj, torch.device):
            return {"__device__": str(obj), "id": tag}
        if isinstance(obj, torch.Size):
            return {"__size__": list(obj), "id": tag}
        if isinstance(obj, (list, tuple, set, frozenset)):
            kind = {list: "__list__", tuple: "__tuple__", set: "__set__", frozenset: "__frozenset__"}[type(obj)]
            return {kind: [self.encode(v, f"{path}[{i}]") for i, v in enumerate(obj)], "id": tag}
        if isinstance(obj, dict):
            pairs = [[self.encode(k, path), self.encode(v, f"{path}[{k!r}]")] for k, v in obj.items()]
            factory = getattr(obj, "default_factory", None)
            factory = None if factory is None else self.encode(factory, f"{path}.default_factory")
            return {"__dict__": pairs, "type": _kind(obj), "factory": factory, "id": tag}
        if isinstance(obj, AvalancheDataset):
            return self._dataset(obj, path, tag)
        if isinstance(obj, TRANSIENT) or inspect.isgenerator(obj) or type(obj).__name__.endswith("iterator"):
            return {"__transient__": type(obj).__name__, "id": tag}
        qualname = f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', '')}"
        if isinstance(obj, (FunctionType, type)) or inspect.isbuiltin(obj):
            for name in (qualname, f"{getattr(obj, '__module__', '')}:{getattr(obj, '__name__', '')}"):
                if _is_trusted(name) and "<" not in name and _resolves_to(name, obj):  # torch.zeros: torch:zeros
                    return {"__callable__": name, "id": tag}
            raise _unstorable(path, obj)
        kind = f"{type(obj).__module__}:{type(obj).__qualname__}"
        if _is_trusted(kind) and hasattr(obj, "__dict__"):
            return {"__object__": kind, "state": self.encode(dict(vars(obj)), path), "id": tag}
        raise _unstorable(path, obj)

    def _dataset(self, data: Any, path: str, tag: int) -> dict[str, Any]:
        attributes = getattr(data, "_data_attributes", {})
        if len(data) == 0:  # an empty placeholder (a buffer before its first update)
            return {"__dataset__": torch.zeros(0, dtype=torch.long), "group": None, "extra": {}, "empty": True,
                    "type": _kind(data), "id": tag}  # fmt: skip
        if "cil_item" not in attributes:
            raise _unstorable(path, data, "a data set that is not made of the sessions' data")
        items = torch.as_tensor(list(data.cil_item), dtype=torch.long)
        extra = {}
        for name, attribute in attributes.items():
            if name in ("cil_item", "targets", "targets_task_labels"):
                continue
            values = [torch.as_tensor(v) for v in attribute]
            extra[name] = {
                "data": torch.stack(values) if values else torch.zeros(0),
                "getitem": attribute.use_in_getitem,
            }
        group = data._flat_data._transform_groups.current_group
        return {"__dataset__": items, "group": group, "extra": extra, "type": _kind(data), "id": tag}


def _kind(obj: Any) -> str:
    return f"{type(obj).__module__}:{type(obj).__qualname__}"


def _unstorable(path: str, obj: Any, why: str = "") -> RuntimeError:
    what = why or f"an object of type {_kind(obj)}"
    return RuntimeError(f"cannot checkpoint {path}: {what} (cil stores only what PyTorch's safe loader reads)")


class _Decoder:
    def __init__(self, sessions: list[Any]):
        self.sessions, self.made = sessions, {}

    def decode(self, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if "__ref__" in value:
            return self.made[value["__ref__"]]
        tag = value.get("id")
        if "__parameter__" in value:
            made = nn.Parameter(value["__parameter__"].clone(), requires_grad=value["grad"])
        elif "__device__" in value:
            made = torch.device(value["__device__"])
        elif "__size__" in value:
            made = torch.Size(value["__size__"])
        elif "__list__" in value:
            made = self._keep(tag, [])
            made.extend(self.decode(v) for v in value["__list__"])
        elif "__tuple__" in value:
            made = tuple(self.decode(v) for v in value["__tuple__"])
        elif "__set__" in value or "__frozenset__" in value:
            kind = set if "__set__" in value else frozenset
            made = kind(self.decode(v) for v in value.get("__set__", value.get("__frozenset__")))
        elif "__dict__" in value:
            cls = _trusted(value["type"])
            factory = self.decode(value.get("factory"))
            made = self._keep(tag, cls(factory) if factory is not None else cls())
            for k, v in value["__dict__"]:
                made[self.decode(k)] = self.decode(v)
        elif "__dataset__" in value:
            made = self._dataset(value)
        elif "__transient__" in value:
            made = None
        elif "__callable__" in value:
            made = _trusted(value["__callable__"])
        elif "__object__" in value:
            cls = _trusted(value["__object__"])
            made = self._keep(tag, cls.__new__(cls))
            made.__dict__.update(self.decode(value["state"]))  # attributes only: none of the class's code runs
        else:
            raise ValueError(f"unknown entry in an Avalanche checkpoint: {sorted(value)[:3]}")
        return self._keep(tag, made)

    def _keep(self, tag: Any, made: Any) -> Any:
        if tag is not None:
            self.made[tag] = made
        return made

    def _dataset(self, value: dict[str, Any]) -> Any:
        from avalanche.benchmarks.utils.data_attribute import DataAttribute, TensorDataAttribute

        if value.get("empty"):
            return _trusted(value["type"])([])
        items = value["__dataset__"]
        offsets = [0]
        for data in self.sessions:
            offsets.append(offsets[-1] + len(data))
        every = self.sessions[0].concat(self.sessions[1]) if len(self.sessions) > 1 else self.sessions[0]
        for data in self.sessions[2:]:
            every = every.concat(data)
        session, index = items >> 32, items & 0xFFFFFFFF
        if len(items) and int(session.max()) >= len(self.sessions):
            raise ValueError("an Avalanche checkpoint's buffer holds samples of sessions not yet seen")
        positions = [offsets[s] + i for s, i in zip(session.tolist(), index.tolist())]
        data = every.subset(positions)
        if value["extra"]:
            attributes = [
                (TensorDataAttribute if isinstance(e["data"], torch.Tensor) else DataAttribute)(
                    list(e["data"]), name, use_in_getitem=e["getitem"]
                )
                for name, e in value["extra"].items()
            ]
            data = type(data)([data], data_attributes=attributes)
        return data.with_transforms(value["group"]) if value["group"] else data


def _check_names(value: Any) -> None:
    """Every class or function a checkpoint names belongs to a trusted package (nothing is imported or run)."""
    if isinstance(value, dict):
        for key in ("__callable__", "__object__", "type"):
            name = value.get(key)
            if isinstance(name, str) and (not _is_trusted(name) or "<" in name):
                raise ConfigError(
                    f"the Avalanche checkpoint names {name[:100]!r}, which is not of a trusted package "
                    f"({', '.join(TRUSTED)}): refused"
                )
        values = value.values()
    elif isinstance(value, (list, tuple)):
        values = value
    else:
        return
    for v in values:
        _check_names(v)


def _resolves_to(path: str, obj: Any) -> bool:
    try:
        return _trusted(path) is obj
    except (AttributeError, ImportError, ValueError):
        return False


def _trusted(path: str) -> Any:
    if not _is_trusted(path) or "<" in path:
        raise ValueError(f"an Avalanche checkpoint names {path!r}, which is not of a trusted package")
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


__all__ = ["AvalancheStrategy", "check_strategy", "strategy_classes"]
