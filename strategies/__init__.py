"""Strategies: one file per method, each registering itself (``register_strategy``) when imported.

``from strategies import FSA`` works as before; the modules (torch, timm, Lightning) load on first use, so that
``cil.strategies.configs`` — every strategy's hyper-parameters — can be read without them.
"""

from __future__ import annotations

import importlib

_CLASSES = {"DKVB": "dkvb", "FSA": "fsa", "Finetune": "finetune", "Joint": "joint", "MOS": "mos",
            "MambaFSCIL": "mamba_fscil", "SimpleCIL": "simplecil", "ZSCL": "zscl"}  # fmt: skip


def __getattr__(name: str):
    if name in _CLASSES:
        return getattr(importlib.import_module(f"cil.strategies.{_CLASSES[name]}"), name)
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")


__all__ = sorted(_CLASSES)
