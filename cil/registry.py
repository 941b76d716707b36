"""Registries of strategies and streams (timm-style: a name → a factory).

``BUILTIN_STRATEGIES`` below is the one list of the built-in strategies: each name with the import paths of its
class and of its hyper-parameter dataclass. Everything else that needs the names (``cil list``, the demo,
``from cil.strategies import FSA``, config validation) reads it. A stream file ends with
``register_stream("name", builder)``. User code adds its own with :func:`register_strategy` and
:func:`register_stream` at any time.

Nothing is imported to know a name: listing them and checking a config (whose strategy hyper-parameters come from
the torch-free ``cil.strategies.configs``) never imports torch, timm or Lightning, and this module imports nothing
of cil but its errors. A built-in strategy's or stream's module is imported the first time it is needed.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any, Callable

from cil.errors import ConfigError

_STRATEGIES: dict[str, tuple[type, type]] = {}
_STREAMS: dict[str, Callable[..., Any]] = {}
# name -> ("module:Class" of the strategy, "module:Class" of its hyper-parameters); the demo runs them in this order
BUILTIN_STRATEGIES = {
    "finetune": ("cil.strategies.finetune:Finetune", "cil.strategies.configs:FinetuneConfig"),
    "joint": ("cil.strategies.joint:Joint", "cil.strategies.configs:JointConfig"),
    "simplecil": ("cil.strategies.simplecil:SimpleCIL", "cil.strategies.configs:SimpleCILConfig"),
    "fsa": ("cil.strategies.fsa:FSA", "cil.strategies.configs:FSAConfig"),
    "mos": ("cil.strategies.mos:MOS", "cil.strategies.configs:MOSConfig"),
    "mamba_fscil": ("cil.strategies.mamba_fscil:MambaFSCIL", "cil.strategies.configs:MambaFSCILConfig"),
    "zscl": ("cil.strategies.zscl:ZSCL", "cil.strategies.configs:ZSCLConfig"),
    "dkvb": ("cil.strategies.dkvb:DKVB", "cil.strategies.configs:DKVBConfig"),
    "avalanche": ("cil.strategies.avalanche:AvalancheStrategy", "cil.strategies.configs:AvalancheConfig"),
}
# built-in stream name -> the module whose import registers it
BUILTIN_STREAMS = {
    "digits": "cil.streams.digits", "fashion_mnist": "cil.streams.mnist", "mnist": "cil.streams.mnist",
    "mtil": "cil.streams.mtil",
    "avalanche": "cil.interop",
    **{n: "cil.streams.vision" for n in ("cifar10", "cifar100", "cub200", "fgvc_aircraft", "imagenet_a", "imagenet_r",
                                     "miniimagenet", "objectnet", "omnibenchmark", "stanford_cars", "svhn",
                                     "tinyimagenet", "vtab")},
}  # fmt: skip


def resolve(path: str) -> Any:
    """The object a ``"module:attribute"`` path names (imported now)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _load_builtin(registry: dict, builtins: dict[str, str], name: str) -> None:
    if name not in registry and name in builtins:
        importlib.import_module(builtins[name])


def register_strategy(name: str, cls: type, config: type) -> type:
    """Register a strategy (a ``CILModule`` subclass) and the dataclass of its hyper-parameters (a subclass of
    ``cil.config.StrategyConfig``, which config validation checks)."""
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise TypeError(f"config of strategy '{name}' must be a dataclass subclassing cil.config.StrategyConfig")
    _STRATEGIES[name] = (cls, config)
    return cls


def register_stream(name: str, builder: Callable[..., Any]) -> Callable[..., Any]:
    """Register a stream builder ``builder(cfg: StreamConfig, transforms: Transforms) -> cil.Stream``."""
    _STREAMS[name] = builder
    return builder


def _unknown(kind: str, name: str, names: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    kinds = {"strategy": "strategies"}.get(kind, f"{kind}s")
    return ConfigError(f"unknown {kind} '{name}'{hint}; registered {kinds}: {', '.join(sorted(names))}")


def strategy_names() -> list[str]:
    return sorted({*_STRATEGIES, *BUILTIN_STRATEGIES})


def stream_names() -> list[str]:
    return sorted({*_STREAMS, *BUILTIN_STREAMS})


def strategy_class(name: str) -> type:
    if name in _STRATEGIES:
        return _STRATEGIES[name][0]
    if name in BUILTIN_STRATEGIES:
        return resolve(BUILTIN_STRATEGIES[name][0])
    raise _unknown("strategy", name, strategy_names())


def strategy_config(name: str) -> type:
    if name in _STRATEGIES:
        return _STRATEGIES[name][1]
    if name in BUILTIN_STRATEGIES:
        return resolve(BUILTIN_STRATEGIES[name][1])  # torch-free
    raise _unknown("strategy", name, strategy_names())


def check_stream(name: str) -> None:
    if name not in _STREAMS and name not in BUILTIN_STREAMS:
        raise _unknown("stream", name, stream_names())


def stream_builder(name: str) -> Callable[..., Any]:
    check_stream(name)
    _load_builtin(_STREAMS, BUILTIN_STREAMS, name)
    return _STREAMS[name]
