"""Fashion-MNIST and MNIST through torchvision's IDX reader: tiny files in the real format, and the real data set
when Debian's dataset-fashion-mnist is installed."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from cil.config import ConfigError, load_config
from cil.streams.mnist import DEBIAN_FASHION_MNIST
from tests.helpers import CONFIGS, needs_debian
from tests.writers import idx_bytes, write_idx


def stream_of(name: str, root: Path, *overrides: str, size: int = 16):
    from cil.backbones import create_backbone, data_transforms
    from cil.streams import create_stream

    cfg = load_config(
        CONFIGS / "simplecil" / "digits.yaml",
        [f"stream.name={name}", f"stream.data_root={root}", f"backbone.image_size={size}", *overrides],
    )
    backbone = create_backbone(cfg.backbone.name)
    return create_stream(cfg.stream, lambda **kw: data_transforms(backbone, size, False, normalize=False, **kw))


def test_gzipped_flat_layout_reads_every_pixel(tmp_path):
    arrays = write_idx(tmp_path)
    stream = stream_of("fashion_mnist", tmp_path, "stream.split=B0-Inc2", "stream.shuffle_classes=false", size=28)
    assert stream.n_sessions == 5 and [len(d) for d in stream.train_data] == [6] * 5
    assert stream.class_names[:2] == ["T-shirt/top", "Trouser"]
    x, y = stream.stats_data[0][0][:2]
    assert tuple(x.shape) == (3, 28, 28)
    # first training sample of class 0 is the first image written; the grey channel is copied to R, G and B
    expected = arrays["train-images-idx3-ubyte"][0] / 255.0
    assert y == 0 and np.allclose(x.numpy(), expected[None].repeat(3, 0), atol=1e-6)


def test_same_samples_as_torchvision_fashionmnist_on_its_layout(tmp_path):
    from torchvision.datasets import FashionMNIST

    write_idx(tmp_path / "FashionMNIST" / "raw", gz=False)
    ours = stream_of("fashion_mnist", tmp_path, "stream.split=B0-Inc10", "stream.shuffle_classes=false", size=28)
    theirs = FashionMNIST(str(tmp_path), train=False, download=False)
    test = ours.eval_data[0]
    assert len(test) == len(theirs) == 20
    # our session orders the test set by class; torchvision keeps file order: compare class by class
    by_class = {}
    for img, label in theirs:
        by_class.setdefault(label, []).append(np.asarray(img) / 255.0)
    for i in range(len(test)):
        x, y = test[i][:2]
        assert np.allclose(x[0].numpy(), by_class[y].pop(0), atol=1e-6)


def test_mnist_reads_torchvision_layout_with_gz(tmp_path):
    write_idx(tmp_path / "MNIST" / "raw")
    stream = stream_of("mnist", tmp_path, "stream.split=B4-Inc3")
    assert [len(c) for c in stream.classes_per_session] == [4, 3, 3]
    assert sorted(stream.class_names) == [str(d) for d in range(10)]


def test_split_shots_order_and_subsets(tmp_path):
    write_idx(tmp_path, per_class=(8, 4))
    a = stream_of("fashion_mnist", tmp_path, "stream.split=B4-Inc2", "stream.shots=2", "stream.seed=3")
    b = stream_of("fashion_mnist", tmp_path, "stream.split=B4-Inc2", "stream.shots=2", "stream.seed=3")
    assert a.original_class_ids == b.original_class_ids != list(range(10))  # seeded shuffle, reproducible
    assert [len(d) for d in a.train_data] == [32, 4, 4, 4]
    sub = stream_of("fashion_mnist", tmp_path, "stream.train_per_class=5", "stream.test_per_class=3")
    assert [len(d) for d in sub.train_data] == [10] * 5 and [len(d) for d in sub.eval_data] == [6] * 5


def test_per_class_subset_is_seeded_stratified_and_in_file_order():
    from cil.streams.common import GreyImages, per_class_subset

    labels = np.array([c for _ in range(8) for c in range(10)])
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None].repeat(2, 1).repeat(2, 2)
    ds = GreyImages(images, labels)
    a, again, b = (per_class_subset(ds, 3, seed) for seed in (0, 0, 1))
    assert np.bincount(a.targets).tolist() == [3] * 10 and a.indices == sorted(a.indices)
    assert a.indices == again.indices and a.indices != b.indices
    assert all(labels[i] == t for i, t in zip(a.indices, a.targets))
    assert int(np.asarray(a[4][0])[0, 0, 0]) == a.indices[4]  # items come from the base data set
    assert per_class_subset(ds, None, 0) is ds and len(per_class_subset(ds, 100, 0)) == 80


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", r"lacks \['t10k-labels-idx1-ubyte'\]"),
        ("truncated", r"t10k-images-idx3-ubyte.gz is not a readable IDX image file"),
        ("bad_gzip", r"t10k-images-idx3-ubyte.gz is not a readable IDX image file"),
        ("bad_magic", r"t10k-images-idx3-ubyte.gz is not a readable IDX image file"),
        ("count", r"holds 20 images but .*t10k-labels-idx1-ubyte.gz 19 labels"),
        ("label", r"t10k-labels-idx1-ubyte.gz holds label 12; valid labels are 0..9"),
    ],
)
def test_missing_or_corrupt_file_is_a_config_error_naming_it(tmp_path, damage, message):
    write_idx(tmp_path)
    images, labels = tmp_path / "t10k-images-idx3-ubyte.gz", tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    if damage == "missing":
        labels.unlink()
    elif damage == "truncated":
        images.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "bad_gzip":
        images.write_bytes(images.read_bytes()[:40])
    elif damage == "bad_magic":
        images.write_bytes(gzip.compress(b"\x00\x00\x00\x00" + raw[4:]))
    elif damage == "count":
        labels.write_bytes(gzip.compress(idx_bytes(np.zeros(19, dtype=np.uint8))))
    elif damage == "label":
        labels.write_bytes(gzip.compress(idx_bytes(np.full(20, 12, dtype=np.uint8))))
    with pytest.raises(ConfigError, match=message):
        stream_of("fashion_mnist", tmp_path)


def test_absent_folder_says_how_to_install_it(tmp_path):
    with pytest.raises(ConfigError, match=r"is not a folder \(Debian/Ubuntu: apt-get install dataset-fashion-mnist\)"):
        stream_of("fashion_mnist", tmp_path / "absent")


def test_no_data_root_names_debian_path():
    with pytest.raises(ConfigError, match="needs stream.data_root.*/usr/share/datasets/fashion-mnist"):
        from cil.streams import create_stream

        create_stream(load_config(CONFIGS / "simplecil" / "digits.yaml", ["stream.name=fashion_mnist"]).stream, None)


@needs_debian
def test_real_fashion_mnist_from_debian_package():
    from cil.streams.mnist import find_idx_files, read_split

    files = find_idx_files(Path(DEBIAN_FASHION_MNIST), "FashionMNIST")
    train, test = read_split(files, "train", 10), read_split(files, "test", 10)
    assert (len(train), len(test)) == (60_000, 10_000)
    assert np.bincount(train.targets).tolist() == [6000] * 10 and np.bincount(test.targets).tolist() == [1000] * 10
    root = Path(DEBIAN_FASHION_MNIST)
    stream = stream_of("fashion_mnist", root, "stream.train_per_class=20", "stream.test_per_class=5")
    assert [len(d) for d in stream.train_data] == [40] * 5 and sum(stream.eval_counts()) == 50
