"""CLIP backbones from open_clip (the ``clip`` extra): ``backbone.name: open_clip:<model>[.<pretrained tag>]``.

``create_clip("open_clip:ViT-B-16.openai", pretrained=True)`` is OpenAI's ViT-B/16 (network needed), always built
with QuickGELU, the activation OpenAI trained it with (open_clip's plain names build GELU and only warn);
``weights=FILE`` loads a local state dict of the open_clip model instead, and without either the model is
randomly initialised. ``open_clip:cil-tiny-clip`` is a tiny CLIP (16-d embeddings, one layer per tower, 32×32
images, open_clip's own tokenizer) registered here for offline tests and the digits demo.

The returned :class:`ClipBackbone` is a backbone like any other (``backbone(x)`` → image embeddings,
``num_features`` wide, timm-style ``pretrained_cfg`` for the data transforms) that also encodes text.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cil.config import ConfigError

PREFIX = "open_clip:"
_CONFIGS = Path(__file__).resolve().parent / "clip_configs"
# CLIP's preprocessing: bicubic resize of the short side, centre crop of the same size, OpenAI's statistics
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)


def is_clip_name(name: str) -> bool:
    return name.startswith(PREFIX)


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ConfigError(
            "open_clip backbones need the `clip` extra: pip install -e '.[clip]' (open-clip-torch)"
        ) from None
    open_clip.add_model_config(_CONFIGS)
    return open_clip


def split_name(name: str) -> tuple[str, str | None]:
    """``open_clip:ViT-B-16.openai`` → ``("ViT-B-16", "openai")``; the tag is optional."""
    model, _, tag = name.removeprefix(PREFIX).partition(".")
    return model, tag or None


def check_clip_name(name: str) -> None:
    open_clip = _open_clip()
    model, tag = split_name(name)
    names = open_clip.list_models()
    if model not in names:
        close = difflib.get_close_matches(model, names, n=5, cutoff=0.6)
        hint = f"; close open_clip names: {', '.join(close)}" if close else "; see open_clip.list_models()"
        raise ConfigError(f"unknown backbone '{name}' (backbone.name): no open_clip model '{model}'{hint}")
    tags = open_clip.list_pretrained_tags_by_model(model)
    if tag is not None and tag not in tags:
        raise ConfigError(
            f"backbone.name '{name}': open_clip has no pretrained tag '{tag}' for {model}; tags: {', '.join(tags)}"
        )


class ClipBackbone(nn.Module):
    """An open_clip CLIP model: ``forward`` encodes images; ``tokenize`` + ``encode_text`` encode text."""

    def __init__(self, model: nn.Module, tokenizer: Any, name: str):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.num_features = int(model.text_projection.shape[1])
        size = model.visual.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        # what timm's resolve_data_config reads: CLIP's resize + centre crop (crop_pct 1.0), bicubic, OpenAI stats
        self.pretrained_cfg = {
            "input_size": (3, *size),
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": _MEAN,
            "std": _STD,
            "architecture": name,
        }

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts).to(self.model.logit_scale.device)


def create_clip(name: str, pretrained: bool = False, weights: str | Path | None = None, **kwargs: Any) -> ClipBackbone:
    """The open_clip model ``name`` (``open_clip:<model>[.<tag>]``) as a :class:`ClipBackbone`.

    ``pretrained=True`` loads the tag's weights (``openai`` when the name has no tag); ``kwargs`` go to
    ``open_clip.create_model`` (e.g. ``force_quick_gelu``).
    """
    from cil.backbones import load_weights

    open_clip = _open_clip()
    check_clip_name(name)
    model_name, tag = split_name(name)
    if pretrained and weights is not None:
        raise ConfigError("set either backbone.pretrained=true or backbone.weights=FILE, not both")
    if (tag or ("openai" if pretrained else None)) == "openai" and not model_name.endswith("-quickgelu"):
        # OpenAI's CLIP was trained with QuickGELU; open_clip's plain model names build GELU and only warn, which
        # changes every feature (ImageNet zero-shot drops by points): OpenAI weights always get QuickGELU here
        if kwargs.get("force_quick_gelu", True) is False:
            raise ConfigError(
                f"backbone.kwargs.force_quick_gelu=false with '{name}': OpenAI's CLIP weights need QuickGELU; "
                "drop the setting (QuickGELU is forced for .openai names)"
            )
        kwargs = {**kwargs, "force_quick_gelu": True}
    try:
        model = open_clip.create_model(model_name, pretrained=(tag or "openai") if pretrained else None, **kwargs)
    except TypeError as e:
        raise ConfigError(f"backbone.kwargs {kwargs} not accepted by open_clip model '{model_name}': {e}") from None
    if weights is not None:
        load_weights(model, weights)
    model.float()  # the official code trains CLIP in fp32 (clip.load casts to float)
    tokenizer = open_clip.get_tokenizer(model_name)
    return ClipBackbone(model, tokenizer, name)


__all__ = ["ClipBackbone", "create_clip", "check_clip_name", "is_clip_name", "split_name"]
