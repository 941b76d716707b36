"""Backbones from timm, with weights from a local file; transforms from timm's data config."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image

from cil.backbones import create_backbone, data_transforms
from cil.config import ConfigError


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
