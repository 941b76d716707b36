"""cil: class-incremental learning with pre-trained backbones, as Lightning modules.

The public names: :func:`create_strategy`, :func:`create_backbone`, :func:`load_config`, the registries
(:func:`register_strategy`, :func:`register_stream`), the strategy contract (:class:`CILModule`,
:class:`Session`), and :func:`cil.runs.load_run` for analysis.
"""

from cil.backbones import create_backbone
from cil.config import ConfigError, load_config
from cil.module import CILModule, Session, create_strategy
from cil.registry import register_strategy, register_stream

__all__ = [
    "CILModule",
    "ConfigError",
    "Session",
    "create_backbone",
    "create_strategy",
    "load_config",
    "register_strategy",
    "register_stream",
]
__version__ = "0.1.0"
