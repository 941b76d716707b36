"""FiLM adapters (feature-wise linear modulation) attached to a timm backbone without copying its code.

``FiLMAdapters(backbone)`` finds the places to modulate, creates one per-channel ``gamma``/``beta`` pair for
each, and attaches them with forward hooks, so the backbone's own modules and state-dict keys are untouched and
its pre-trained weights load as usual. ``gamma = 1``, ``beta = 0`` at init: the network is then exactly the
pre-trained one.

Where (``film_sites``):

- timm ``EfficientNet`` — as the official FSA code places FiLM on EfficientNet-B0: after the stem BN, after
  the BN that follows each block's depthwise conv (``bn1`` of ``DepthwiseSeparableConv``, ``bn2`` of
  ``InvertedResidual``) and after the head BN; always between the BN and its activation. timm fuses BN and
  activation (``BatchNormAct2d``), so the FiLM is a pre-hook on the fused layer's ``act``.
- timm ``ResNet`` — our extension (not in the FSA code): after every BatchNorm.
- timm ``VisionTransformer`` — our extension: after every LayerNorm, one (gamma, beta) per embedding channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class FiLM(nn.Module):
    """``y = gamma * x + beta`` with one (gamma, beta) per channel; the identity at init."""

    def __init__(self, channels: int, channel_dim: int = 1):
        super().__init__()
        self.channel_dim = channel_dim
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.ndim
        shape[self.channel_dim] = -1
        return x * self.gamma.view(shape) + self.beta.view(shape)

    def output_hook(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return self(output)

    def input_hook(self, module: nn.Module, inputs: tuple) -> tuple:
        return (self(inputs[0]), *inputs[1:])


@dataclass(frozen=True)
class Site:
    """Modulate the output of module ``name`` (``where="output"``) or the input of it (``"input"``)."""

    name: str
    channels: int
    where: str = "output"
    channel_dim: int = 1


def _after_bn(name: str, bn: nn.Module) -> Site:
    """FiLM after a BatchNorm, before its activation when timm fused the two (``BatchNormAct2d``)."""
    from timm.layers import BatchNormAct2d

    if isinstance(bn, BatchNormAct2d):
        return Site(f"{name}.act", bn.num_features, "input")
    return Site(name, bn.num_features, "output")


def film_sites(backbone: nn.Module) -> list[Site]:
    """The FiLM sites of a timm EfficientNet, ResNet or VisionTransformer (see the module docstring)."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(backbone, EfficientNet):
        sites = [_after_bn("bn1", backbone.bn1)]
        for i, stage in enumerate(backbone.blocks):
            for j, block in enumerate(stage):
                if isinstance(block, DepthwiseSeparableConv):
                    sites.append(_after_bn(f"blocks.{i}.{j}.bn1", block.bn1))  # the BN after conv_dw
                elif isinstance(block, InvertedResidual):
                    sites.append(_after_bn(f"blocks.{i}.{j}.bn2", block.bn2))  # the BN after conv_dw
                else:
                    raise ValueError(
                        f"FiLM: block blocks.{i}.{j} is a {type(block).__name__}; only DepthwiseSeparableConv and "
                        "InvertedResidual blocks (EfficientNet-B0..B7) have a known FiLM site"
                    )
        return sites + [_after_bn("bn2", backbone.bn2)]
    if isinstance(backbone, ResNet):
        return [_after_bn(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if isinstance(backbone, VisionTransformer):
        return [Site(n, m.normalized_shape[0], "output", -1) for n, m in backbone.named_modules() if _is_ln(m)]
    raise ValueError(
        f"FiLM adaptation supports timm EfficientNet, ResNet and VisionTransformer backbones, "
        f"not {type(backbone).__name__}; use adaptation=full or adaptation=none"
    )


def _is_ln(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1


class FiLMAdapters(nn.Module):
    """One :class:`FiLM` per site of ``backbone``, attached by hooks; holds only the FiLM parameters."""

    def __init__(self, backbone: nn.Module, sites: list[Site] | None = None):
        super().__init__()
        self.sites = film_sites(backbone) if sites is None else sites
        modules = dict(backbone.named_modules())
        self.layers = nn.ModuleDict()
        for site in self.sites:
            film = FiLM(site.channels, site.channel_dim)
            self.layers[site.name.replace(".", "_")] = film
            target = modules[site.name]
            if site.where == "input":
                target.register_forward_pre_hook(film.input_hook)
            else:
                target.register_forward_hook(film.output_hook)

    def __len__(self) -> int:
        return len(self.layers)


__all__ = ["FiLM", "FiLMAdapters", "Site", "film_sites"]
