"""Strategies: one file per method; importing this package registers them all."""

from strategies import finetune, fsa, joint, simplecil  # noqa: F401  (registration)
from strategies.finetune import Finetune
from strategies.fsa import FSA
from strategies.joint import Joint
from strategies.simplecil import SimpleCIL

__all__ = ["FSA", "Finetune", "Joint", "SimpleCIL"]
