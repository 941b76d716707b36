"""In-memory grey images resized once (``cil.streams.common.presized``): every item the pipeline then gives is
bit-identical to the one it gives for the raw image, the copy is made only where it pays and fits, and augmented
training images are left alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import digits_stream, needs_debian


def timm_eval_transform(model: str, size: int, crop_pct: float | None):
    import timm

    from cil.backbones import data_transforms

    return data_transforms(timm.create_model(model, pretrained=False), size, False, crop_pct=crop_pct).eval


def images_with_edges(n: int, seed: int = 0) -> np.ndarray:
    """Random pixels with saturated blocks: bicubic overshoot is clipped at 0 and 255, where rounding differs most."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[:, 5:12, 5:12] = 255
    images[:, 15:20, 3:25] = 0
    return images


@pytest.mark.parametrize(
    "model, size, crop_pct",
    [("tf_efficientnet_lite0", 64, 1.0), ("tf_efficientnet_lite0", 64, None), ("resnet18", 40, 0.9)],
    ids=["lite0-64-whole", "lite0-64-centre-crop", "resnet18-40-bilinear-crop"],
)
def test_presized_items_are_bit_identical(model, size, crop_pct):
    from cil.streams.common import ClassSubset, GreyImages, presized, resize_prefix

    tf = timm_eval_transform(model, size, crop_pct)
    assert resize_prefix(tf), tf  # the transform does start with a resize: the test is not vacuous
    raw = GreyImages(images_with_edges(64), list(range(64)))
    resized = int(size / crop_pct) if crop_pct else int(size / 0.875)  # timm: the crop's size / crop_pct
    for data in (raw, ClassSubset(raw, list(range(3, 64, 2)))):
        copy = presized(data, tf)
        assert isinstance(copy, GreyImages) and copy.images.shape[1:] == (resized, resized)
        assert copy.targets == list(data.targets)
        for i in range(len(data)):
            assert torch.equal(tf(copy[i][0]), tf(data[i][0])), i


@needs_debian
def test_presized_real_fashion_mnist_is_bit_identical():
    from cil.streams.common import GreyImages, presized
    from cil.streams.mnist import DEBIAN_FASHION_MNIST, find_idx_files, read_split

    test = read_split(find_idx_files(Path(DEBIAN_FASHION_MNIST), "FashionMNIST"), "test", 10)
    sample = GreyImages(test.images[:300], test.targets[:300])
    tf = timm_eval_transform("tf_efficientnet_lite0", 64, 1.0)
    copy = presized(sample, tf)
    assert copy is not sample
    assert all(torch.equal(tf(copy[i][0]), tf(sample[i][0])) for i in range(len(sample)))


def test_a_grey_image_resized_equals_each_channel_of_its_rgb_copy_resized():
    from PIL import Image

    tf = timm_eval_transform("tf_efficientnet_lite0", 64, 1.0)
    for image in images_with_edges(20, seed=1):
        grey = np.asarray(tf.transforms[0](Image.fromarray(image, mode="L")))
        rgb = np.asarray(tf.transforms[0](Image.fromarray(image, mode="L").convert("RGB")))
        assert (rgb == grey[..., None]).all()


def test_a_stream_gives_the_same_tensors_with_and_without_presizing(monkeypatch):
    import cil.streams.common as common

    with_copy = digits_stream()  # that it does presize: test_what_is_presized
    monkeypatch.setattr(common, "PRESIZE_LIMIT_BYTES", 0)
    without = digits_stream()
    for ours, theirs in zip(with_copy.train_data + with_copy.eval_data, without.train_data + without.eval_data):
        assert len(ours) == len(theirs)
        for i in range(len(ours)):
            assert torch.equal(ours[i][0], theirs[i][0]) and ours[i][1] == theirs[i][1]


def augmented_digits_stream():
    from cil.backbones import create_backbone, data_transforms
    from cil.config import load_config
    from cil.streams import create_stream
    from tests.helpers import CONFIGS

    cfg = load_config(CONFIGS / "simplecil" / "digits.yaml", ["backbone.image_size=16", "stream.augment=true"])
    backbone = create_backbone(cfg.backbone.name)
    return create_stream(cfg.stream, lambda **kw: data_transforms(backbone, 16, True, **kw))


def test_what_is_presized(monkeypatch):
    """Test images always (they only meet the eval transform); training images only without augmentation; nothing
    beyond the size limit or without a leading resize."""
    import cil.streams.common as common

    calls = []
    original = common.presized

    def spy(data, transform):
        out = original(data, transform)
        calls.append((transform is None, out is not data, out))
        return out

    monkeypatch.setattr(common, "presized", spy)
    digits_stream()
    assert [(none, copied) for none, copied, _ in calls] == [(False, True), (False, True)]
    assert calls[0][2].images.shape[1:] == (16, 16)
    calls.clear()
    augmented_digits_stream()
    assert [(none, copied) for none, copied, _ in calls] == [(False, True), (True, False)]

    raw = common.GreyImages(images_with_edges(4), [0, 1, 2, 3])
    tf = timm_eval_transform("tf_efficientnet_lite0", 64, 1.0)
    monkeypatch.setattr(common, "PRESIZE_LIMIT_BYTES", 4 * 64 * 64 - 1)
    assert original(raw, tf) is raw  # one byte over the limit
    monkeypatch.setattr(common, "PRESIZE_LIMIT_BYTES", 4 * 64 * 64)
    assert original(raw, tf) is not raw
    from torchvision import transforms as T

    assert original(raw, T.Compose([T.ToTensor()])) is raw  # nothing to do once
