"""Strategies: one file per method; importing this package registers them all."""

from strategies import finetune, joint, simplecil  # noqa: F401  (registration)
from strategies.finetune import Finetune
from strategies.joint import Joint
from strategies.simplecil import SimpleCIL

__all__ = ["Finetune", "Joint", "SimpleCIL"]
