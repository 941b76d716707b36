"""Strategies: one file per method; importing this package registers them all."""

from strategies import dkvb, finetune, fsa, joint, mamba_fscil, mos, simplecil, zscl  # noqa: F401  (registration)
from strategies.dkvb import DKVB
from strategies.finetune import Finetune
from strategies.fsa import FSA
from strategies.joint import Joint
from strategies.mamba_fscil import MambaFSCIL
from strategies.mos import MOS
from strategies.simplecil import SimpleCIL
from strategies.zscl import ZSCL

__all__ = ["DKVB", "FSA", "Finetune", "Joint", "MOS", "MambaFSCIL", "SimpleCIL", "ZSCL"]
