"""Backbones: any timm model as a feature extractor, with weights from timm (online) or a local file;
CLIP models from open_clip with ``open_clip:<model>`` names (:mod:`cil.backbones.clip`).

``create_backbone(name)`` returns the model with ``num_classes=0`` (pooled features, ``model.num_features`` wide);
:func:`data_transforms` builds the matching train/eval transforms from timm's data config.
"""

from __future__ import annotations

from cil.backbones import _timm  # noqa: F401  (first: timm loads without wandb, see there)

# isort: split
import difflib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch import nn

from cil.backbones import resnet12 as _resnet12  # noqa: F401  (registers "resnet12" with timm)
from cil.config import ConfigError


def check_backbone_name(name: str) -> None:
    """Unknown name → error listing the closest timm model names (``open_clip:`` names: open_clip's)."""
    from cil.backbones.clip import check_clip_name, is_clip_name

    if is_clip_name(name):
        return check_clip_name(name)
    if timm.is_model(name):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if not close:
        close = [n for n in names if name.split("_")[0] in n][:5]
    hint = f"; close timm names: {', '.join(close)}" if close else "; see timm.list_models()"
    raise ConfigError(f"unknown backbone '{name}' (backbone.name){hint}")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict into ``model``; the classifier head of the file is ignored.

    ``path`` may be ``package:<name>``, a file an installed package ships (``package:efficientnet_lite0``, see
    :mod:`cil.backbones.weights`). A file in lukemelas/EfficientNet-PyTorch naming is converted to timm's keys by name.
    Raises :class:`ConfigError` naming the file and the missing, unexpected or mis-shaped keys.
    """
    from cil.backbones.weights import is_lukemelas_efficientnet, lukemelas_to_timm, resolve_weights

    path = resolve_weights(path)
    if path.is_dir():
        raise ConfigError(f"backbone.weights='{path}' is a folder; give the weights file itself")
    if not path.is_file():
        raise ConfigError(f"backbone.weights file '{path}' not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # one line, and never torch's advice to unpickle an untrusted file
        unsafe = "weights only load failed" in str(e).lower() or "pickle" in type(e).__name__.lower()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = "not a tensor file saved with torch.save (or a truncated one)" if unsafe else first
        raise ConfigError(f"backbone.weights file '{path}' is not a torch state dict: {why}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ConfigError(f"backbone.weights file '{path}' holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ConfigError(f"backbone.weights file '{path}' holds values that are not tensors: {_few(not_tensors)}")
    # finite weights only (NaN or inf would train and report numbers that mean nothing); integer buffers are finite
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise ConfigError(f"backbone.weights file '{path}' holds NaN or infinite values in {_few(broken)}")
    if is_lukemelas_efficientnet(state):
        state = lukemelas_to_timm(state, model, source=f"backbone.weights file '{path}'")
        if type(getattr(model, "conv_stem", None)).__name__ != "Conv2dSame":
            warnings.warn(
                f"backbone.weights file '{path}' holds TensorFlow-ported EfficientNet weights (lukemelas naming); "
                "they expect TF 'same' padding: use timm's tf_ model (e.g. tf_efficientnet_b0) for the same features",
                stacklevel=2,
            )
    own = model.state_dict()
    head = model.pretrained_cfg.get("classifier", "head") if hasattr(model, "pretrained_cfg") else "head"
    heads = (head,) if isinstance(head, str) else tuple(head)
    unexpected = [k for k in state if k not in own and not k.startswith(heads)]
    missing = [k for k in own if k not in state]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if shapes:
        problems.append(f"mismatched shapes (file vs model) {_few(shapes)}")
    if problems:
        raise ConfigError(f"backbone.weights file '{path}' does not fit the model: {'; '.join(problems)}")
    model.load_state_dict({k: state[k] for k in own}, strict=True)


def _few(items: list[str], n: int = 5) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + "]" + more


def _download_failure(error: BaseException) -> bool:
    """Whether timm's ``pretrained=True`` failed to fetch its weights (no network, a hub error, no cache entry)."""
    module = type(error).__module__ or ""
    network = ("huggingface_hub", "urllib", "requests", "http", "socket", "ssl", "urllib3")
    return isinstance(error, (OSError, ConnectionError, TimeoutError)) or module.startswith(network)


def _hub_offline_check(name: str) -> bool:
    """Before timm downloads ``name``'s weights from the Hugging Face Hub: whether to load them offline.

    Without network, huggingface_hub retries each file five times with back-off (about 45 s) before it fails or
    falls back to its cache. One connection attempt with a short timeout tells first: unreachable and cached →
    load from the cache in offline mode (True); unreachable and not cached → one-line error now.
    """
    import socket
    from urllib.parse import urlparse

    import huggingface_hub
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # a model registered without pretrained configs (e.g. our resnet12): timm decides
        return False
    if constants.HF_HUB_OFFLINE or cfg is None or not cfg.hf_hub_id:
        return False  # offline already, or weights from a plain URL (torch.hub fails at once without network)
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
        return False
    except OSError as e:
        reason = f"{endpoint.hostname} unreachable: {e}"
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    repo = cfg.hf_hub_id.split("@")[0]
    if any(isinstance(huggingface_hub.try_to_load_from_cache(repo, f), str) for f in files):
        return True
    raise ConfigError(
        f"backbone.pretrained=true: timm's weights of '{name}' could not be downloaded ({reason}) and are not in "
        f"the Hugging Face cache; without network, give a local file with backbone.weights=FILE (a torch.save'd "
        "state dict) or put the weights in the Hugging Face cache (HF_HOME) on a machine with network first"
    )


def _timm_model(name: str, pretrained: bool, **timm_kwargs: Any) -> nn.Module:
    if not (pretrained and _hub_offline_check(name)):
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub: no retries, the cache only
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **timm_kwargs)
    finally:
        constants.HF_HUB_OFFLINE = False


def create_backbone(
    name: str, pretrained: bool = False, weights: str | Path | None = None, **timm_kwargs: Any
) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): ``model(x)`` gives ``(B, model.num_features)``.

    ``pretrained=True`` downloads timm's weights (network needed); ``weights=FILE`` loads a local state dict
    instead (e.g. one saved with ``torch.save(model.state_dict(), FILE)``).
    """
    check_backbone_name(name)
    if pretrained and weights is not None:
        raise ConfigError("set either backbone.pretrained=true or backbone.weights=FILE, not both")
    try:
        model = _timm_model(name, pretrained, **timm_kwargs)
    except ConfigError:
        raise
    except Exception as e:
        if pretrained and _download_failure(e):
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"backbone.pretrained=true: timm's weights of '{name}' could not be downloaded ({type(e).__name__}: "
                f"{first}); without network, give a local file with backbone.weights=FILE (a torch.save'd state "
                "dict) or put the weights in the Hugging Face cache (HF_HOME) on a machine with network first"
            ) from None
        if not isinstance(e, (TypeError, ValueError, RuntimeError, AssertionError)):
            raise

        if not timm_kwargs and not isinstance(e, TypeError):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"backbone.kwargs {timm_kwargs} not accepted by timm model '{name}': {first}") from None
    if weights is not None:
        load_weights(model, weights)
    return model


@dataclass
class Transforms:
    """The train and eval transforms of a backbone, as timm's data config defines them."""

    train: Callable[[Any], torch.Tensor]
    eval: Callable[[Any], torch.Tensor]
    input_size: tuple[int, int, int]


def data_transforms(
    model: nn.Module,
    image_size: int | None = None,
    augment: bool = False,
    crop_pct: float | None = None,
    augment_kwargs: dict[str, Any] | None = None,
    normalize: bool = True,
    interpolation: str | None = None,
    crop_mode: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Transforms:
    """timm's transforms for ``model``: resize (+ crop) to its input size, normalise with its mean/std.

    ``augment=True`` uses timm's training pipeline (random-resized crop, flip) for the train transform, with
    ``augment_kwargs`` passed on to ``timm.data.create_transform`` (e.g. ``scale=(1, 1), ratio=(1, 1),
    vflip=0.5``); otherwise train and eval use the same deterministic transform. ``crop_pct=1.0`` resizes the
    whole image without a centre crop (used for tiny images such as the 8×8 digits). ``normalize=False`` keeps
    pixels in [0, 1] (mean 0, std 1), as LAMDA-PILOT's methods (MOS) feed their ViTs. ``interpolation`` overrides
    the data config's resize interpolation (e.g. mmcls' bilinear default on miniImageNet), ``crop_mode`` its
    crop mode (``squash`` resizes both sides to the input size, as ``Resize((224, 224))``), ``mean``/``std`` its
    normalisation.
    """
    augment_kwargs = dict(augment_kwargs or {})
    if augment_kwargs and not augment:
        raise ConfigError(f"stream.augment_kwargs={augment_kwargs} needs stream.augment=true")
    overrides: dict[str, Any] = {}
    if image_size is not None:
        overrides["input_size"] = (3, image_size, image_size)
    if crop_pct is not None:
        overrides["crop_pct"] = crop_pct
    if interpolation is not None:
        overrides["interpolation"] = interpolation
    if crop_mode is not None:
        overrides["crop_mode"] = crop_mode
    for key, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        if not normalize:
            raise ConfigError(f"stream.{key}={list(values)} needs stream.normalize=true")
        if len(values) != 3 or (key == "std" and min(values) <= 0):
            raise ConfigError(
                f"stream.{key}={list(values)} must be 3 numbers (one per channel){', all > 0' * (key == 'std')}"
            )
        overrides[key] = tuple(float(v) for v in values)
    if not normalize:
        overrides.update(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    config = resolve_data_config(overrides, model=model)
    eval_tf = create_transform(**config, is_training=False)
    train_tf = eval_tf
    if augment:
        try:
            train_tf = create_transform(**{**config, **augment_kwargs}, is_training=True)
        except TypeError as e:  # an argument create_transform does not take
            raise ConfigError(f"stream.augment_kwargs: {e}") from None
    return Transforms(train=train_tf, eval=eval_tf, input_size=tuple(config["input_size"]))


def backbone_from_config(cfg: Any) -> nn.Module:
    """``create_backbone`` with the ``backbone`` group of an experiment config."""
    from cil.backbones.clip import create_clip, is_clip_name

    kwargs = dict(cfg.kwargs) if cfg.kwargs else {}
    if is_clip_name(cfg.name):
        model = create_clip(cfg.name, pretrained=cfg.pretrained, weights=cfg.weights, **kwargs)
    else:
        model = create_backbone(cfg.name, pretrained=cfg.pretrained, weights=cfg.weights, **kwargs)
    if cfg.get("bn_momentum") is not None:
        set_bn_momentum(model, cfg.bn_momentum)
    if cfg.get("bn_group_size") is not None:
        from cil.backbones.batchnorm import group_batch_norm

        group_batch_norm(model, cfg.bn_group_size)
    if memory_format(model, cfg.get("memory_format", "contiguous"), cfg.get("image_size")) == "channels_last":
        model.to(memory_format=torch.channels_last)  # the parameters in place: optimisers built later see them
    return model


# channels_last is faster on CPU for convolutional bodies from this input size on (benchmarks/train_step.py: Lite0 at
# 64 px 1.86x per training step, resnet18 at 112 px 1.19x, resnet10t at 64 px 1.08x, at 32 px 0.97x): below it the
# feature maps are too small for the NHWC kernels to pay, and the digits demo (32 px) keeps its numbers
CHANNELS_LAST_MIN_SIZE = 64


def memory_format(model: nn.Module, setting: str, image_size: int | None) -> str:
    """The memory format ``backbone.memory_format`` selects for ``model``: ``auto`` picks channels_last for a
    convolutional body (at least 8 convolutions with kernels larger than 1x1: a ViT's single patch convolution
    does not count) at inputs of ``CHANNELS_LAST_MIN_SIZE`` px or more, contiguous otherwise. The two formats
    compute the same function; the convolution kernels sum in another order, so results differ in the last bits
    (as with another thread count), and a run keeps its format on resume (it is in its config.yaml)."""
    if setting != "auto":
        return setting
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]
    size = image_size or getattr(model, "pretrained_cfg", {}).get("input_size", (3, 0, 0))[-1]
    return "channels_last" if len(convs) >= 8 and size >= CHANNELS_LAST_MIN_SIZE else "contiguous"


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    """Every BatchNorm layer's running-statistics momentum (``backbone.bn_momentum``); an error if there is none."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        raise ConfigError(f"backbone.bn_momentum={momentum} but the backbone has no BatchNorm layer")
    for m in norms:
        m.momentum = momentum
