"""Strategies: one file per method; ``cil.registry.BUILTIN_STRATEGIES`` names them.

``from cil.strategies import FSA`` works; the modules (torch, timm, Lightning) load on first use, so that
``cil.strategies.configs`` — every strategy's hyper-parameters — can be read without them.
"""

from __future__ import annotations

from cil.registry import BUILTIN_STRATEGIES, resolve

_CLASSES = {path.partition(":")[2]: path for path, _ in BUILTIN_STRATEGIES.values()}


def __getattr__(name: str):
    if name in _CLASSES:
        return resolve(_CLASSES[name])
    raise AttributeError(f"module 'cil.strategies' has no attribute {name!r}")


__all__ = sorted(_CLASSES)
