"""The line every benchmark prints about the machine it ran on."""

from __future__ import annotations

import platform

import torch


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
