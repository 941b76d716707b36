"""Registries of strategies and streams (timm-style: a name → a factory, one file per family).

A strategy file ends with ``register_strategy("name", StrategyClass, StrategyConfig)``; a stream file ends with
``register_stream("name", builder)``. The built-in ``strategies`` and ``streams`` packages are imported the first
time a name is looked up, so user code can register its own before or after.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

from cil.config import ConfigError, StrategyConfig

_STRATEGIES: dict[str, tuple[type, type[StrategyConfig]]] = {}
_STREAMS: dict[str, Callable[..., Any]] = {}
_builtins_loaded = False


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("strategies")
        importlib.import_module("streams")


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
    _load_builtins()
    return sorted(_STRATEGIES)


def stream_names() -> list[str]:
    _load_builtins()
    return sorted(_STREAMS)


def strategy_class(name: str) -> type:
    _load_builtins()
    if name not in _STRATEGIES:
        raise _unknown("strategy", name, list(_STRATEGIES))
    return _STRATEGIES[name][0]


def strategy_config(name: str) -> type[StrategyConfig]:
    _load_builtins()
    if name not in _STRATEGIES:
        raise _unknown("strategy", name, list(_STRATEGIES))
    return _STRATEGIES[name][1]


def check_stream(name: str) -> None:
    _load_builtins()
    if name not in _STREAMS:
        raise _unknown("stream", name, list(_STREAMS))


def stream_builder(name: str) -> Callable[..., Any]:
    check_stream(name)
    return _STREAMS[name]
