"""Modules whose tensors grow with the classes seen so far, so a checkpoint of any session loads into a fresh model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Growing(nn.Module):
    """A module whose tensors grow with the classes: loading a state of another size adopts that size.

    This is what lets a checkpoint written after session k be loaded into a freshly built strategy.
    """

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, tensor in [*self._parameters.items(), *self._buffers.items()]:
            key = prefix + name
            if tensor is None or key not in state_dict or state_dict[key].shape == tensor.shape:
                continue
            new = tensor.new_empty(state_dict[key].shape)
            if name in self._parameters:
                self._parameters[name] = nn.Parameter(new, requires_grad=tensor.requires_grad)
            else:
                self._buffers[name] = new
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GrowingClassifier(Growing):
    """A linear head over the classes seen so far; ``grow(n)`` adds rows, keeping the trained ones.

    New rows get ``nn.Linear``'s initialisation, or with ``init="trunc_normal"`` timm's ``trunc_normal_(std=0.02)``
    weights and zero biases (LAMDA-PILOT's ``SimpleContinualLinear``, MOS's head).
    """

    def __init__(self, num_features: int, init: str = "linear"):
        super().__init__()
        if init not in ("linear", "trunc_normal"):
            raise ValueError(f"init={init!r} is not valid; choose 'linear' or 'trunc_normal'")
        self.num_features, self.init = num_features, init
        self.weight = nn.Parameter(torch.empty(0, num_features))
        self.bias = nn.Parameter(torch.empty(0))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def grow(self, num_classes: int) -> None:
        extra = num_classes - self.num_classes
        if extra <= 0:
            return
        fresh = nn.Linear(self.num_features, extra).to(self.weight.device, self.weight.dtype)  # nn.Linear's init
        if self.init == "trunc_normal":
            from timm.layers import trunc_normal_

            trunc_normal_(fresh.weight, std=0.02)
            nn.init.zeros_(fresh.bias)
        self.weight = nn.Parameter(torch.cat([self.weight.data, fresh.weight.data]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, fresh.bias.data]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight, self.bias)
