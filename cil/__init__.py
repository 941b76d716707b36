"""cil: class-incremental learning with pre-trained backbones, as Lightning modules.

The public names: :func:`create_strategy`, :func:`create_backbone`, :func:`load_config`, the registries
(:func:`register_strategy`, :func:`register_stream`), the strategy contract (:class:`CILModule`,
:class:`Session`), and :func:`cil.runs.load_run` for analysis.

They are imported on first use (PEP 562), so ``cil --help`` and a config error do not wait for torch, timm and
Lightning to load.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "CILModule": "cil.module",
    "ConfigError": "cil.config",
    "Session": "cil.module",
    "create_backbone": "cil.backbones",
    "create_strategy": "cil.module",
    "load_config": "cil.config",
    "register_strategy": "cil.registry",
    "register_stream": "cil.registry",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'cil' has no attribute {name!r}")
