"""The few-shot ResNet-12 (MetaOptNet / mmfewshot), registered with timm: ``create_backbone("resnet12")``.

Four residual stages of 64, 160, 320 and 640 channels; each block is three 3x3 conv + BN layers with LeakyReLU(0.1),
a 1x1 conv + BN shortcut, and a 2x2 max-pool at its end. ``forward_features`` returns the last feature map
((B, 640, 2, 2) at 32 px, (B, 640, 5, 5) at 84 px), what Mamba-FSCIL's projector reads; ``forward`` pools it like
any timm model with ``num_classes=0``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import register_model
from torch import nn


class ResNet12Block(nn.Module):
    def __init__(self, in_channels: int, channels: int, slope: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [
                nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
            ]
            if i < 2:
                layers.append(nn.LeakyReLU(slope))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.act = nn.LeakyReLU(slope)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.body(x) + self.shortcut(x)))


class ResNet12(nn.Module):
    def __init__(self, channels: tuple[int, ...] = (64, 160, 320, 640), num_classes: int = 0, in_chans: int = 3):
        super().__init__()
        stages, previous = [], in_chans
        for width in channels:
            stages.append(ResNet12Block(previous, width))
            previous = width
        self.stages = nn.Sequential(*stages)
        self.num_features = previous
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(previous, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, global_pool: Any = None) -> None:
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


@register_model
def resnet12(pretrained: bool = False, **kwargs: Any) -> ResNet12:
    """ResNet-12 for few-shot learning (84 px miniImageNet inputs by default; no pre-trained weights)."""
    if pretrained:
        raise ValueError("resnet12 has no pre-trained weights in timm; load a local file with backbone.weights=FILE")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = ResNet12(**kwargs)
    model.pretrained_cfg = {
        "input_size": (3, 84, 84),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "classifier": "head",
    }
    return model


__all__ = ["ResNet12", "resnet12"]
