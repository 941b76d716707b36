"""BatchNorm as a multi-GPU run without synchronised BatchNorm computes it, on one device (``backbone.bn_group_size``).

Data-parallel training with plain ``nn.BatchNorm`` normalises each GPU's share of the global batch with that share's
own statistics: 8 GPUs x 64 images give 8 groups of 64, not one group of 512. The noise BatchNorm adds in training
depends on that group size, so a one-device run of a recipe trained that way needs the same grouping.
:class:`GroupedBatchNorm` splits each training batch into consecutive groups of ``group_size`` samples and
normalises each with its own mean and variance (the gradient flows through each group's statistics, as on the GPUs).

Running statistics follow what such a run saves. With ``DistributedDataParallel(broadcast_buffers=False)`` (mmcls'
and Mamba-FSCIL's training code) each replica keeps its own running mean and variance, and rank 0 writes the
checkpoint: they come from rank 0's groups alone. Here they are updated from the first group of every batch.

A batch whose size is not a multiple of ``group_size`` (an epoch's last) is cut into ``ceil(N / group_size)`` groups
of sizes differing by at most one; a distributed sampler would spread it over all GPUs instead (every GPU a smaller
share). Evaluation uses the running statistics, as ``nn.BatchNorm`` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from cil.errors import ConfigError


class GroupedBatchNorm(_BatchNorm):
    """A BatchNorm layer (any dimension) whose training-mode statistics are per group of ``group_size`` samples.

    The state dict is that of the ``nn.BatchNorm*d`` it replaces (same keys), so checkpoints load either way."""

    def __init__(self, num_features: int, group_size: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.group_size = int(group_size)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training or len(x) <= self.group_size:
            return super().forward(x)
        groups = -(-len(x) // self.group_size)
        first = x[: -(-len(x) // groups)]  # tensor_split's first chunk: rank 0's share
        self._update_running(first)
        if len(x) % groups:  # a ragged batch: groups of unequal sizes, one call each
            return torch.cat([self._normalise(chunk) for chunk in torch.tensor_split(x, groups)])
        shape = (groups, len(x) // groups, *x.shape[1:])
        dims = [1, *range(3, x.dim() + 1)]  # every axis but the group's and the channel
        grouped = x.reshape(shape)
        var, mean = torch.var_mean(grouped, dim=dims, keepdim=True, correction=0)
        out = (grouped - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            view = (1, 1, -1, *[1] * (x.dim() - 2))
            out = out * self.weight.view(view) + self.bias.view(view)
        return out.reshape(x.shape)

    def _normalise(self, chunk: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(chunk, None, None, self.weight, self.bias, True, 0.0, self.eps)

    @torch.no_grad()
    def _update_running(self, first: torch.Tensor) -> None:
        """The running statistics a plain BatchNorm would keep on ``first`` alone."""
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        dims = [0, *range(2, first.dim())]
        var, mean = torch.var_mean(first.float(), dim=dims, correction=1)
        self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(var.to(self.running_var.dtype), alpha=momentum)


PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def group_batch_norm(model: nn.Module, group_size: int) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` by a :class:`GroupedBatchNorm` with the same parameters and
    buffers (``backbone.bn_group_size``); an error if there is none."""
    if group_size < 2:
        raise ConfigError(f"backbone.bn_group_size={group_size}: BatchNorm needs groups of at least 2 samples")
    replaced = 0

    def convert(module: nn.Module) -> nn.Module:
        nonlocal replaced
        if isinstance(module, _BatchNorm) and type(module) not in PLAIN:
            if not isinstance(module, GroupedBatchNorm):  # e.g. timm's BatchNormAct2d: its forward does more
                raise ConfigError(
                    f"backbone.bn_group_size: the backbone's {type(module).__name__} layers are not plain BatchNorm "
                    f"({', '.join(t.__name__ for t in PLAIN)}); grouping them is not supported"
                )
            return module
        if type(module) in PLAIN:
            grouped = GroupedBatchNorm(
                module.num_features,
                group_size,
                eps=module.eps,
                momentum=module.momentum,
                affine=module.affine,
                track_running_stats=module.track_running_stats,
            )
            grouped.load_state_dict(module.state_dict())
            grouped.train(module.training)
            if module.affine:
                grouped.weight.requires_grad_(module.weight.requires_grad)
                grouped.bias.requires_grad_(module.bias.requires_grad)
            replaced += 1
            like = next(iter(module.parameters()), None)
            return grouped if like is None else grouped.to(device=like.device, dtype=like.dtype)
        for name, child in module.named_children():
            setattr(module, name, convert(child))
        return module

    model = convert(model)
    if not replaced:
        raise ConfigError(f"backbone.bn_group_size={group_size} but the backbone has no BatchNorm layer")
    return model
