"""Registries of strategies and streams (timm-style: a name → a factory, one file per family).

A strategy file ends with ``register_strategy("name", StrategyClass, StrategyConfig)``; a stream file ends with
``register_stream("name", builder)``. User code can register its own at any time.

The built-in names are known without importing anything: listing them and checking a config (whose strategy
hyper-parameters come from the torch-free ``cil.strategies.configs``) never imports torch, timm or Lightning. A built-in
strategy's or stream's module is imported the first time its class or builder is needed.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

from cil.config import ConfigError, StrategyConfig

_STRATEGIES: dict[str, tuple[type, type[StrategyConfig]]] = {}
_STREAMS: dict[str, Callable[..., Any]] = {}
# built-in name -> the module whose import registers it
BUILTIN_STRATEGIES = {n: f"cil.strategies.{n}" for n in ("dkvb", "finetune", "fsa", "joint", "mamba_fscil", "mos",
                                                     "simplecil", "zscl")}  # fmt: skip
BUILTIN_STREAMS = {
    "digits": "cil.streams.digits", "fashion_mnist": "cil.streams.mnist", "mnist": "cil.streams.mnist",
    "mtil": "cil.streams.mtil",
    "avalanche": "cil.interop",
    **{n: "cil.streams.vision" for n in ("cifar10", "cifar100", "cub200", "fgvc_aircraft", "imagenet_a", "imagenet_r",
                                     "miniimagenet", "objectnet", "omnibenchmark", "stanford_cars", "svhn",
                                     "tinyimagenet", "vtab")},
}  # fmt: skip


def _load_builtin(registry: dict, builtins: dict[str, str], name: str) -> None:
    if name not in registry and name in builtins:
        importlib.import_module(builtins[name])


def register_strategy(name: str, cls: type, config: type[StrategyConfig]) -> type:
    """Register a strategy (a ``CILModule`` subclass) and the dataclass of its hyper-parameters."""
    if not issubclass(config, StrategyConfig):
        raise TypeError(f"config of strategy '{name}' must subclass cil.config.StrategyConfig")
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
    _load_builtin(_STRATEGIES, BUILTIN_STRATEGIES, name)
    if name not in _STRATEGIES:
        raise _unknown("strategy", name, strategy_names())
    return _STRATEGIES[name][0]


def strategy_config(name: str) -> type[StrategyConfig]:
    if name in _STRATEGIES:
        return _STRATEGIES[name][1]
    if name in BUILTIN_STRATEGIES:
        from cil.strategies.configs import CONFIGS  # torch-free

        return CONFIGS[name]
    raise _unknown("strategy", name, strategy_names())


def check_stream(name: str) -> None:
    if name not in _STREAMS and name not in BUILTIN_STREAMS:
        raise _unknown("stream", name, stream_names())


def stream_builder(name: str) -> Callable[..., Any]:
    check_stream(name)
    _load_builtin(_STREAMS, BUILTIN_STREAMS, name)
    return _STREAMS[name]
