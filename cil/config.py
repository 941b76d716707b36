"""Typed experiment configuration: YAML files + ``key=value`` overrides, validated before any data is loaded.

A config has five groups — ``run``, ``stream``, ``backbone``, ``strategy``, ``trainer`` — each an omegaconf
structured config (a dataclass). The ``strategy`` group's schema is the dataclass the registry pairs with the
strategy's name (``cil.registry``), so every strategy validates its own hyper-parameters.

A config is a YAML path or the name of a packaged config (``simplecil/digits``: ``configs/simplecil/digits.yaml``,
installed as ``cil.configs``). A YAML file may start with ``extends: other.yaml`` (a path relative to the file, else
a packaged config's name, or a list of them): the file is merged on top of what it extends, which is how a paper
config builds on its base config.

Every problem raises :class:`ConfigError` with one line naming the key, the bad value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import II, MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cil import registry
from cil.errors import ConfigError


def param(
    default: Any, *, ge=None, gt=None, le=None, lt=None, choices=None, pattern=None, help: str = "", folder=False
):
    """A dataclass field with validation metadata (range, allowed values, regex) and a help string. ``folder``: a
    folder the run writes into (a cache), which ``cil run`` creates and checks before any work."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "pattern": pattern, "help": help}
    meta["folder"] = folder
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


SPLIT_PATTERN = r"B(\d+)-Inc(\d+)"


@dataclass
class RunConfig:
    name: str = "${strategy.name}-${stream.name}"
    seed: int = param(0, ge=0, le=2**32 - 1, help="seeds model init, class order, data order and every session")
    output_dir: str = param("runs", help="run folders go to <output_dir>/<name>/<timestamp>/")
    keep_session_checkpoints: bool = param(False, help="keep session_<k>.ckpt of every session, not just the newest")
    checkpoint_every: float = param(
        30.0,
        ge=0.0,
        help="minutes between mid-session resume points (last.ckpt, written at an epoch end once this long has "
        "passed since the last one; 0: every epoch end); session checkpoints are written at every session end",
    )
    reuse_features: bool = param(
        True,
        help="a strategy with a frozen body (features_frozen) computes each test image's features once per run and "
        "reuses them at every later evaluation (same predictions); false: every evaluation runs the body again",
    )
    feature_memory_mb: float = param(
        2048.0, ge=0.0, help="reused features held in memory up to this size; beyond it in <run folder>/features/"
    )
    requeue: bool = param(
        False,
        help="in a SLURM job: a scheduler's stop signal (SIGTERM, SIGUSR1, SIGUSR2) requeues the job (scontrol "
        "requeue), and the same `cil run` command in the requeued job resumes this run folder",
    )


@dataclass
class StreamConfig:
    name: str = "digits"
    data_root: Optional[str] = param(None, help="folder holding the data set in its usual on-disk layout")
    split: str = param(
        "B0-Inc2",
        pattern=SPLIT_PATTERN,
        help="B{base}-Inc{k}: a base session of `base` classes (none if 0), then sessions of k classes",
    )
    class_order: Optional[list[int]] = param(None, help="fixed class order (original ids); overrides shuffle")
    shuffle_classes: bool = param(True, help="seeded shuffle of the class order")
    shuffle_rng: str = param(
        "numpy",
        choices=["numpy", "python"],
        help="generator of the shuffle: numpy (RandomState(seed).permutation) or python (random.seed(seed); "
        "random.shuffle(ids): DKVB's official code)",
    )
    seed: int = param(II("run.seed"), ge=0, le=2**32 - 1, help="seed of the class order, splits and k-shot sampling")
    shots: Optional[int] = param(None, ge=1, help="k-shot incremental sessions (base session stays full)")
    base_shots: Optional[int] = param(
        None, ge=1, help="k-shot base session too (with shots; FSA's few-shot+ uses shots=base_shots=50)"
    )
    index_dir: Optional[str] = param(
        None,
        help="FSCIL index lists session_1.txt ... (session_1 = base); they fix the sessions and class order, "
        "so split, class_order and shuffle_classes are not used",
    )
    datasets: Optional[list[str]] = param(
        None, help="the data sets of a multi-data-set stream in task order (mtil; default: MTIL order I)"
    )
    train_per_class: Optional[int] = param(
        None, ge=1, help="use at most this many training images per class: a seeded sample (stream.seed); null: all"
    )
    test_per_class: Optional[int] = param(
        None, ge=1, help="evaluate on at most this many test images per class: a seeded sample; null: all"
    )
    test_size: float = param(0.2, gt=0.0, lt=1.0, help="held-out fraction (streams without a test split)")
    augment: bool = param(False, help="timm's training augmentation on train data")
    crop_pct: Optional[float] = param(
        None, gt=0.0, le=1.0, help="eval crop fraction; 1.0 resizes the whole image (default: stream's, then model's)"
    )
    interpolation: Optional[str] = param(
        None,
        choices=["bilinear", "bicubic", "nearest", "lanczos"],
        help="resize interpolation of the evaluation transform (default: the backbone's data config)",
    )
    crop_mode: Optional[str] = param(
        None,
        choices=["center", "squash", "border"],
        help="eval resize: center (short side, centre crop), squash (both sides to the input size, aspect ratio "
        "not kept), border (long side, pad); default: the backbone's data config",
    )
    mean: Optional[list[float]] = param(None, help="normalisation mean per channel (default: the backbone's)")
    std: Optional[list[float]] = param(None, help="normalisation std per channel (default: the backbone's)")
    augment_kwargs: dict[str, Any] = param(
        {},
        help="keyword arguments of timm's create_transform for the training transform (with augment=true), "
        "e.g. {scale: [1, 1], ratio: [1, 1], hflip: 0.5, vflip: 0.5, color_jitter: null}",
    )
    normalize: bool = param(
        True, help="normalise with the backbone's mean/std; false feeds [0, 1] pixels (LAMDA-PILOT's convention)"
    )
    unlabelled: Optional[str] = param(
        None,
        help="a registered stream whose training images are offered to strategies without their labels (DKVB's key "
        "initialisation), or 'self' for this stream's own; null: none",
    )
    unlabelled_root: Optional[str] = param(None, help="data_root of stream.unlabelled (default: stream.data_root)")
    online: bool = param(
        False, help="present the whole stream as one sequence of mini-batches: one session, no boundaries"
    )
    verify_checksums: bool = param(True, help="check the md5 of data files where the format defines one")
    batch_size: int = param(32, ge=1)
    drop_last: bool = param(
        False,
        help="drop a ragged last training batch; default false keeps every sample as every official code does "
        "(a last batch of one sample joins the one before it: BatchNorm cannot train on one)",
    )
    eval_batch_size: int = param(256, ge=1)
    num_workers: int = param(0, ge=0)
    skip_unreadable: bool = param(
        False,
        help="skip image files that cannot be decoded (corrupt, truncated, not images) instead of stopping; each is "
        "named once in <run folder>/skipped_files.jsonl and counted after every session",
    )


@dataclass
class BackboneConfig:
    name: str = "resnet10t"
    pretrained: bool = param(False, help="download timm's pre-trained weights (needs network)")
    weights: Optional[str] = param(None, help="local weights file (a state dict) to load instead")
    image_size: Optional[int] = param(None, ge=8, help="input size; default: the model's own")
    bn_momentum: Optional[float] = param(
        None, gt=0.0, le=1.0, help="momentum of every BatchNorm layer (PyTorch's convention: TF's decay 0.99 is 0.01)"
    )
    bn_group_size: Optional[int] = param(
        None,
        ge=2,
        help="BatchNorm statistics per group of this many samples in training, as N GPUs without synchronised "
        "BatchNorm compute them (cil.backbones.batchnorm); running statistics from the first group",
    )
    memory_format: str = param(
        "auto",
        choices=["auto", "channels_last", "contiguous"],
        help="the body's memory format; auto: channels_last for convolutional bodies at inputs of 64 px and more "
        "(faster on CPU, benchmarks/train_step.py), contiguous otherwise",
    )
    kwargs: dict[str, Any] = param({}, help="extra keyword arguments for timm.create_model")


@dataclass
class StrategyConfig:
    """Base of every strategy's hyper-parameters; a strategy subclasses it and registers the subclass."""

    name: str = MISSING


@dataclass
class TrainingConfig(StrategyConfig):
    """Hyper-parameters shared by strategies trained with gradient descent."""

    epochs: int = param(5, ge=0, help="epochs per session")
    lr: float = param(0.01, gt=0.0)
    optimizer: str = param("sgd", choices=["sgd", "adamw"])
    momentum: float = param(0.9, ge=0.0, lt=1.0)
    weight_decay: float = param(0.0, ge=0.0)
    scheduler: str = param("cosine", choices=["cosine", "constant"], help="learning-rate schedule per session")


# class statistics a strategy may keep for classifier alignment (cil.layers.statistics.ClassGaussians)
STORAGES = ("covariance", "variance", "multi-centroid")


@dataclass
class TrainerConfig:
    accelerator: str = param("auto", choices=["auto", "cpu", "gpu", "cuda", "mps", "tpu"])
    devices: Any = param("auto", help="'auto', a count >= 1, or a list of device ids")
    num_nodes: int = param(1, ge=1)
    strategy: str = param("auto", help="Lightning strategy: auto, ddp, ddp_find_unused_parameters_true, ...")
    precision: str = param(
        "32-true", choices=["32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true"]
    )
    deterministic: bool = param(False, help="torch deterministic algorithms (Trainer(deterministic=True))")
    log_every_n_steps: int = param(5, ge=1)
    enable_progress_bar: bool = True
    gradient_clip_val: Optional[float] = param(None, gt=0.0)
    eval_unseen: bool = param(True, help="also evaluate on future sessions' test data (forward transfer)")
    loggers: list[str] = param(
        ["csv", "tensorboard"],
        help="Lightning loggers of each session's fit: csv, tensorboard, wandb, mlflow (the last two need their "
        "package: pip install wandb / mlflow)",
    )


@dataclass
class ExperimentConfig:
    run: RunConfig = field(default_factory=RunConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ---------------------------------------------------------------------------------------------- loading


def packaged_configs() -> Path:
    """The folder of the packaged configs (the repository's ``configs/``, installed as ``cil.configs``)."""
    import cil.configs

    return Path(cil.configs.__file__).resolve().parent


def config_names() -> list[str]:
    """The packaged configs by name (``strategy/name``), bases (``base/...``) left out."""
    root = packaged_configs()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.glob("*/*.yaml") if p.parent.name != "base")


def find_config(name: str | Path, relative_to: Path | None = None) -> Path:
    """The YAML file a config argument names: a path (relative to ``relative_to`` for ``extends``, else to the
    working folder) if it exists, else a packaged config (``fsa/digits`` or ``fsa/digits.yaml``)."""
    path = Path(name) if relative_to is None else relative_to / name
    if path.exists():
        return path
    packaged = packaged_configs() / Path(name)
    packaged = packaged if packaged.suffix in (".yaml", ".yml") else packaged.with_suffix(".yaml")
    if not Path(name).is_absolute() and packaged.is_file():
        return packaged
    close = difflib.get_close_matches(str(Path(name).with_suffix("")), config_names(), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConfigError(
        f"config file '{path}' not found, and no packaged config is named '{name}'{hint}; cil list names them"
    )


def _yaml_error(e: Exception) -> str:
    """A YAML error in one line: what is wrong and where (line and column), e.g. a duplicate key or a tab."""
    import yaml

    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        where = f"line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}"
        return f"{where}: {e.problem}" + (f" ({e.context})" if e.context else "")
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = find_config(path)
    # a regular file is known by its real path (cycles of `extends`); a pipe (`cil run <(...)`) by its own name
    path = path.resolve() if path.is_file() else path
    if path in seen:
        raise ConfigError(f"config file '{path}' extends itself (cycle: {' -> '.join(map(str, seen))})")
    if path.is_dir():
        raise ConfigError(f"config file '{path}' is a folder; give a YAML file (e.g. configs/fsa/digits.yaml)")
    if not path.exists():
        raise ConfigError(f"config file '{path}' not found")
    try:
        cfg = OmegaConf.load(path)
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e.strerror or e}") from None
    except Exception as e:  # yaml syntax errors: one line naming the file, the line and the column
        raise ConfigError(f"config file '{path}' is not valid YAML: {_yaml_error(e)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file '{path}' must hold a mapping of groups, not a {type(cfg).__name__}")
    parents = cfg.pop("extends", None)
    if parents is None:
        return cfg
    if isinstance(parents, str):
        parents = [parents]
    merged = OmegaConf.create()
    for parent in parents:
        merged = OmegaConf.merge(merged, _read_yaml(find_config(str(parent), path.parent), (*seen, path)))
    return OmegaConf.merge(merged, cfg)


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. run.seed=1)")
    parsed = OmegaConf.create()
    for item in overrides:  # one at a time, so that an error names the override
        try:
            parsed = OmegaConf.merge(parsed, OmegaConf.from_dotlist([item]))
        except Exception as e:  # OmegaConf's own errors, and YAML's for a malformed value (`[1,2`)
            raise ConfigError(f"override '{_cut(item)}' cannot be parsed: {_yaml_error(e)}") from None
    return parsed


def _cut(text: Any, limit: int = 80) -> str:
    """A value as an error message shows it: at most ``limit`` characters (a 100 kB value is not echoed whole)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Read a YAML config (following ``extends``), apply ``key=value`` overrides, validate, return it.

    The result is a structured, read-only DictConfig whose ``strategy`` group is typed by the strategy's own
    config dataclass. Raises :class:`ConfigError` on any problem, before any data or weights are touched.
    """
    user = _read_yaml(Path(path)) if path is not None else OmegaConf.create()
    user = OmegaConf.merge(user, _parse_overrides(list(overrides)))
    return validate(user)


def validate(user: DictConfig | dict) -> DictConfig:
    """Check a user config against the schema and the registries; return the merged, typed config.

    The backbone name is checked against timm's and open_clip's models by ``cil run`` before any data is loaded
    (``cil.backbones.check_backbone_name``): that needs timm, which checking a config does not import."""
    if not isinstance(user, DictConfig):
        user = OmegaConf.create(user)
    groups = [f.name for f in dataclasses.fields(ExperimentConfig)]
    for group in groups:
        node = user._get_node(group) if group in user else None
        if node is not None and not isinstance(node, DictConfig) and node._value() is not None:
            raise ConfigError(
                f"config group '{group}' must be a mapping of keys (e.g. {group}: {{...}}), not {node._value()!r}"
            )
    strategy_name = OmegaConf.select(user, "strategy.name", default=None)
    if strategy_name is None:
        raise ConfigError(f"strategy.name is required; registered strategies: {registry.strategy_names()}")
    strategy_cls = registry.strategy_config(str(strategy_name))  # raises with the registered names
    if not issubclass(strategy_cls, StrategyConfig):
        raise ConfigError(f"the hyper-parameters of strategy '{strategy_name}' must subclass cil.config.StrategyConfig")

    schema = OmegaConf.structured(ExperimentConfig(strategy=strategy_cls()))
    _check_keys(user, ExperimentConfig(strategy=strategy_cls()), prefix="")
    try:
        cfg = OmegaConf.merge(schema, user)
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{key}: {msg}") from None
    _check_values(cfg, ExperimentConfig(strategy=strategy_cls()), prefix="")
    _check_devices(cfg.trainer.devices)
    _check_run_name(str(cfg.run.name))
    registry.check_stream(cfg.stream.name)
    if cfg.stream.unlabelled not in (None, "self"):
        registry.check_stream(cfg.stream.unlabelled)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def strategy_settings(config: type, settings: typing.Mapping[str, Any]) -> Any:
    """A strategy's hyper-parameters as its constructor receives them (keyword settings): its config dataclass
    with the dataclass's defaults for the rest, an unknown name refused with the valid ones, and every value checked
    as ``cil run`` checks a config's. The one place a strategy's defaults and choices live is that dataclass."""
    fields = {f.name: f for f in dataclasses.fields(config) if f.name != "name"}
    for key in settings:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"unknown setting '{key}' of {config.__name__}; {hint}valid: {', '.join(fields)}")
    made = config(**settings)
    for name, f in fields.items():
        _check_one(f"strategy.{name}", getattr(made, name), f.metadata)
    return made


def check_folders(cfg: DictConfig) -> None:
    """Every strategy setting declared ``param(folder=True)`` (a cache the run writes into) is created now, or a
    ConfigError names it: one line before any work, not a traceback when the first entry is written."""
    import tempfile

    config = registry.strategy_config(str(cfg.strategy.name))
    for f in dataclasses.fields(config):
        value = cfg.strategy.get(f.name)
        if not f.metadata.get("folder") or value is None:
            continue
        folder = Path(str(value)).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()  # writable, not merely present
        except OSError as e:
            why = e.strerror or type(e).__name__
            raise ConfigError(
                f"strategy.{f.name}='{_cut(value)}' cannot be created or written ({why}); give a writable folder"
                " (or null to keep nothing)"
            ) from None


def _check_keys(node: DictConfig, schema: Any, prefix: str) -> None:
    """Unknown keys → error naming the key and the closest valid ones."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            valid = f"valid keys{' in ' + prefix[:-1] if prefix else ''}: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{_cut(full)}'; {hint + ' ' if hint else ''}{valid}")
        value = getattr(schema, key)
        child = node._get_node(key)
        if dataclasses.is_dataclass(value) and isinstance(child, DictConfig):
            _check_keys(child, value, prefix=f"{full}.")


def _check_values(node: DictConfig, schema: Any, prefix: str) -> None:
    """Ranges, allowed values and patterns declared with :func:`param`."""
    for f in dataclasses.fields(schema):
        value = node[f.name]
        full = f"{prefix}{f.name}"
        sub = getattr(schema, f.name)
        if dataclasses.is_dataclass(sub):
            _check_values(value, sub, prefix=f"{full}.")
            continue
        _check_one(full, value, f.metadata)


def _check_run_name(name: str) -> None:
    """A run name is a folder name inside run.output_dir, never a path."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ConfigError(
            f"run.name={name!r} is not a plain name; use letters, digits, '-', '_' or '.' without '/' "
            "(the run folder goes to run.output_dir/run.name/)"
        )
    if len(name.encode()) > 255:  # the longest file name Linux, macOS and Windows file systems allow
        raise ConfigError(
            f"run.name is {len(name.encode())} bytes long; a folder name may have at most 255 ({_cut(name)!r})"
        )


def _check_one(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    for v in value if isinstance(value, (list, ListConfig)) else [value]:
        if isinstance(v, float) and not math.isfinite(v) and not (meta or {}).get("allow_nonfinite"):
            raise ConfigError(f"{key}={_cut(repr(value))} is not a finite number")
    if value is None or not meta:
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{key}={_cut(repr(value))} is not valid; choose one of {meta['choices']}")
    if meta.get("pattern") is not None and not re.fullmatch(meta["pattern"], str(value)):
        raise ConfigError(
            f"{key}={_cut(repr(value))} is not valid; expected the form {meta['pattern']} (e.g. B0-Inc10)"
        )
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b)]
    bounds += [("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b)]
    for name, symbol, ok in bounds:
        if meta.get(name) is not None and not ok(value, meta[name]):
            raise ConfigError(f"{key}={_cut(repr(value))} is out of range; it must be {symbol} {meta[name]}")


def _check_devices(devices: Any) -> None:
    if devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1):
        return
    if isinstance(devices, (list, ListConfig)) and devices and all(isinstance(d, int) for d in devices):
        return
    if isinstance(devices, str) and re.fullmatch(r"\d+(,\d+)*,?", devices):
        return
    raise ConfigError(f"trainer.devices={devices!r} is not valid; use 'auto', a count >= 1, or a list of device ids")


def to_yaml(cfg: DictConfig) -> str:
    """The fully resolved config as YAML: what ran, loadable again with :func:`load_config`."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def split_sizes(split: str) -> tuple[int, int]:
    """``"B50-Inc10"`` → ``(50, 10)``."""
    match = re.fullmatch(SPLIT_PATTERN, split)
    if match is None:
        raise ConfigError(f"stream.split={split!r} is not valid; expected the form B{{base}}-Inc{{k}}")
    base, inc = int(match.group(1)), int(match.group(2))
    if inc < 1:
        raise ConfigError(f"stream.split={split!r} is not valid; the increment must be >= 1")
    return base, inc
