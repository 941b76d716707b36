"""AdaptFormer-style parallel adapters for timm ViTs, attached by hooks, and a bank of per-session adapter sets.

An :class:`Adapter` is ``x -> scale * up(dropout(relu(down(x))))`` (MOS / AdaptFormer: 768 -> 16 -> 768, dropout
0.1, fixed scale 0.1, no LayerNorm). Its up-projection starts at zero, so a fresh adapter adds exactly nothing.

In each transformer block it runs parallel to the MLP and reads the post-attention residual ``h``::

    h   = x + Attn(LN1(x))
    out = h + MLP(LN2(h)) + adapter(h)

The hooks capture ``h`` as the input of the block's ``norm2`` and add ``adapter(h)`` to the block's output, so
timm's block code, module tree and state-dict keys stay untouched.

:class:`AdapterBank` holds the adapter set being trained (``current``), frozen snapshots of the finished sessions
(``snapshots``) and their running sum (``total``, the prefix sum MOS's merge reads), and chooses which set the
hooks apply (``bank.active``: ``"current"``, a snapshot index, or ``None`` for the plain pre-trained model).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from functools import partial
from typing import Iterator, Optional, Union

import torch
from torch import nn


class Adapter(nn.Module):
    """``scale * up(dropout(relu(down(x))))``; LoRA-style init (kaiming-uniform down, zero up): an exact zero at
    init."""

    def __init__(self, dim: int, bottleneck: int = 16, dropout: float = 0.1, scale: float = 0.1):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale  # fixed, not learnt (MOS: ffn_adapter_scalar="0.1")
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.dropout(torch.relu(self.down(x))))


def vit_blocks(backbone: nn.Module) -> nn.Sequential:
    """The transformer blocks of a timm VisionTransformer (each with ``norm2`` before its MLP)."""
    blocks = getattr(backbone, "blocks", None)
    if blocks is None or not all(hasattr(b, "norm2") for b in blocks):
        raise ValueError(
            f"adapters attach to timm VisionTransformer blocks (with .blocks[i].norm2); got {type(backbone).__name__}"
        )
    return blocks


class AdapterBank(nn.Module):
    """Per-block adapters of the current session, frozen snapshots of earlier ones, and their running sum."""

    def __init__(self, backbone: nn.Module, bottleneck: int = 16, dropout: float = 0.1, scale: float = 0.1):
        super().__init__()
        blocks = vit_blocks(backbone)
        dim = backbone.embed_dim
        self.current = nn.ModuleList([Adapter(dim, bottleneck, dropout, scale) for _ in blocks])
        self.snapshots = nn.ModuleList()
        self.total = self._frozen_copy(self.current, zero=True)
        self.active: Optional[Union[str, int]] = "current"
        self._residual: list[Optional[torch.Tensor]] = [None] * len(blocks)
        # hooks are bound methods (through partial), so a deep copy of the model hooks the copied bank
        for i, block in enumerate(blocks):
            block.norm2.register_forward_pre_hook(partial(self._capture, i))
            block.register_forward_hook(partial(self._add, i))

    # ---- hooks ---------------------------------------------------------------------------------------
    def _capture(self, i: int, module: nn.Module, inputs: tuple) -> None:
        self._residual[i] = inputs[0]  # h = x + Attn(LN1(x)), the input of norm2

    def _add(self, i: int, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        h, self._residual[i] = self._residual[i], None
        adapters = self.selected()
        return output if adapters is None else output + adapters[i](h)

    @contextmanager
    def use(self, which: Optional[Union[str, int, nn.ModuleList]]) -> Iterator[AdapterBank]:
        """Apply ``which`` (``"current"``, a snapshot index, an adapter list, or ``None``) inside the block, then
        restore."""
        before = self.active
        object.__setattr__(self, "active", which)  # a plain attribute even when an adapter list: not a child
        try:
            yield self
        finally:
            object.__setattr__(self, "active", before)

    @contextmanager
    def use_mean(self, k: int) -> Iterator[AdapterBank]:
        """Apply ``mean(snapshots[:k])``, computed afresh into a scratch copy: the snapshots are never written."""
        if not 1 <= k <= len(self.snapshots):
            raise IndexError(f"the mean of {k} snapshots needs 1..{len(self.snapshots)}")
        scratch = self.__dict__.get("_scratch")  # not a submodule: no state-dict entry, no checkpoint bytes
        device = self.current[0].down.weight.device
        if scratch is None or next(scratch.parameters()).device != device:
            scratch = self.__dict__["_scratch"] = self._frozen_copy(self.current).to(device)
        with torch.no_grad():
            for p, *ps in zip(scratch.parameters(), *(s.parameters() for s in self.snapshots[:k])):
                p.copy_(sum(ps) / k)  # the code's prefix sums, in its order
        scratch.train(self.training)
        with self.use(scratch):
            yield self

    def selected(self) -> Optional[nn.ModuleList]:
        if self.active is None:
            return None
        if isinstance(self.active, nn.ModuleList):
            return self.active
        if self.active == "current":
            return self.current
        if not 0 <= self.active < len(self.snapshots):
            raise IndexError(f"adapter snapshot {self.active} does not exist; the bank holds {len(self.snapshots)}")
        return self.snapshots[self.active]

    # ---- sessions -------------------------------------------------------------------------------------
    @staticmethod
    def _frozen_copy(adapters: nn.ModuleList, zero: bool = False) -> nn.ModuleList:
        copied = copy.deepcopy(adapters)
        for p in copied.parameters():
            p.requires_grad_(False)
            if zero:
                p.data.zero_()
        return copied

    def __len__(self) -> int:
        return len(self.snapshots)

    @torch.no_grad()
    def snapshot(self) -> None:
        """Freeze a copy of the current adapters as the newest snapshot, and add it to the running sum."""
        self.snapshots.append(self._frozen_copy(self.current))
        for total, new in zip(self.total.parameters(), self.snapshots[-1].parameters()):
            total.add_(new)

    @torch.no_grad()
    def merge_toward_mean(self, momentum: float, snapshots: Optional[int] = None) -> None:
        """``current <- (1 - m) current + m * mean(snapshots[:k])`` for every adapter tensor (k = all by default).

        The mean of the first k snapshots is read from the running sum when k is all of them, else summed here.
        A no-op without snapshots or with m = 0.
        """
        k = len(self.snapshots) if snapshots is None else snapshots
        if k == 0 or momentum == 0:
            return
        if k == len(self.snapshots):
            sums = list(self.total.parameters())
        else:
            sums = [sum(ps) for ps in zip(*(s.parameters() for s in self.snapshots[:k]))]
        for p, s in zip(self.current.parameters(), sums):
            # on .data, as the official code: a merge inside a forward (MOS's official mode) must not trip
            # autograd's version check, and the backward then sees the merged values, as the official one does
            p.data.mul_(1 - momentum).add_(s, alpha=momentum / k)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint written after session k holds k snapshots: make room before the children load
        indices = {
            int(key[len(prefix) + 10 :].split(".")[0]) for key in state_dict if key.startswith(prefix + "snapshots.")
        }
        while len(self.snapshots) < (max(indices) + 1 if indices else 0):
            self.snapshots.append(self._frozen_copy(self.current))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


__all__ = ["Adapter", "AdapterBank", "vit_blocks"]
