"""timm, imported without wandb.

``timm.utils.summary`` imports wandb whenever it is installed (Avalanche requires it), for the summaries of timm's own
training scripts, which cil never writes: 0.3 s of every run's start (``benchmarks/startup.py``). While timm loads,
wandb is marked absent, as if it were not installed, and timm skips it; a later ``import wandb`` (Lightning's
``WandbLogger``, ``trainer.loggers=[wandb]``) imports it as usual. ``cil.backbones`` imports this module first.
"""

from __future__ import annotations

import sys

if "timm" not in sys.modules and "wandb" not in sys.modules:
    sys.modules["wandb"] = None  # `import wandb` now raises ImportError, which timm catches
    try:
        import timm  # noqa: F401
    finally:
        del sys.modules["wandb"]
