"""Real data sets through their real loaders, on tiny files written in each real on-disk format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cil.config import ConfigError, load_config
from tests.conftest import CONFIGS


def stream_of(name: str, root: Path, *overrides: str):
    from cil.backbones import create_backbone, data_transforms
    from cil.streams import create_stream

    cfg = load_config(
        CONFIGS / "simplecil" / "digits.yaml",
        [f"stream.name={name}", f"stream.data_root={root}", "backbone.image_size=16", *overrides],
    )
    backbone = create_backbone(cfg.backbone.name)
    return create_stream(cfg.stream, lambda **kw: data_transforms(backbone, 16, False, **kw))


def write_cifar100(root: Path, per_class_train: int = 2, per_class_test: int = 1) -> None:
    """torchvision's CIFAR-100 python format: pickled dicts with data (N, 3072) uint8 and fine_labels."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = [c for c in range(100) for _ in range(per_class)]
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        entry = {"data": data, "fine_labels": labels, "coarse_labels": [c // 5 for c in labels]}
        (folder / split).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"class{c:02d}" for c in range(100)]}))


def test_cifar100_real_format(tmp_path):
    write_cifar100(tmp_path)
    stream = stream_of("cifar100", tmp_path, "stream.split=B50-Inc10", "stream.verify_checksums=false")
    assert [len(c) for c in stream.classes_per_session] == [50, 10, 10, 10, 10, 10]
    assert len(stream.train_data[0]) == 100 and len(stream.eval_data[1]) == 10
    assert stream.class_names[0] == f"class{stream.original_class_ids[0]:02d}"
    x, y = stream.train_data[0][0][:2]
    assert tuple(x.shape) == (3, 16, 16)


def test_cifar100_checksums_are_verified_by_default(tmp_path):
    write_cifar100(tmp_path)
    with pytest.raises(ConfigError, match="verify_checksums=false"):
        stream_of("cifar100", tmp_path, "stream.split=B50-Inc10")


def test_cifar100_missing_files_show_layout(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(ConfigError, match=r"lacks \['meta', 'train', 'test'\].*cifar-100-python/\{meta,train,test\}"):
        stream_of("cifar100", tmp_path)


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 20, 3), value % 256, dtype=np.uint8)).save(path)


def write_image_folders(root: Path, classes: list[str], train: int = 3, test: int = 2) -> None:
    for c, name in enumerate(classes):
        for i in range(train):
            _image(root / "train" / name / f"{name}_{i}.jpg", 10 * c + i)
        for i in range(test):
            _image(root / "test" / name / f"{name}_t{i}.jpg", 10 * c + i)


@pytest.mark.parametrize("name", ["imagenet_r", "cub200", "imagenet_a", "objectnet", "omnibenchmark", "vtab"])
def test_image_folder_layout(tmp_path, name):
    classes = ["001.albatross", "002.auklet", "003.blackbird", "004.bunting"]
    write_image_folders(tmp_path, classes)
    stream = stream_of(name, tmp_path, "stream.split=B0-Inc2", "stream.shuffle_classes=false")
    assert stream.class_names == classes
    assert [len(d) for d in stream.train_data] == [6, 6] and stream.eval_counts() == [4, 4]
    assert tuple(stream.eval_data[1][0][0].shape) == (3, 16, 16)


def test_image_folder_malformed_root_shows_layout(tmp_path):
    write_image_folders(tmp_path, ["a", "b"])
    import shutil

    shutil.rmtree(tmp_path / "test")
    with pytest.raises(ConfigError, match=r"no class folders in test/.*<root>/train/<class>/<image>"):
        stream_of("imagenet_r", tmp_path, "stream.split=B0-Inc1")


def test_cub_index_lists_by_file_name(tmp_path):
    classes = ["001.albatross", "002.auklet", "003.blackbird", "004.bunting"]
    write_image_folders(tmp_path / "data", classes)
    lists = tmp_path / "index_list"
    lists.mkdir()
    base = [f"CUB_200_2011/images/{c}/{c}_{i}.jpg" for c in classes[:2] for i in range(3)]
    (lists / "session_1.txt").write_text("\n".join(base))
    (lists / "session_2.txt").write_text("\n".join(f"CUB_200_2011/images/{c}/{c}_0.jpg" for c in classes[2:]))
    stream = stream_of("cub200", tmp_path / "data", f"stream.index_dir={lists}")
    assert stream.class_names == classes
    assert [len(d) for d in stream.train_data] == [6, 2]
    assert set(stream.benchmark.test_stream[1].dataset.targets) == {0, 1, 2, 3}


def write_miniimagenet(root: Path, wnids: list[str], train: int = 3, test: int = 2) -> None:
    (root / "split").mkdir(parents=True)
    rows = {"train": ["filename,label"], "test": ["filename,label"]}
    for c, wnid in enumerate(wnids):
        for split, n in (("train", train), ("test", test)):
            for i in range(n):
                name = f"{wnid}{split}{i:08d}.jpg"
                _image(root / "images" / name, 10 * c + i)
                rows[split].append(f"{name},{wnid}")
    for split, lines in rows.items():
        (root / "split" / f"{split}.csv").write_text("\n".join(lines) + "\n")


def test_miniimagenet_fscil_layout_with_index_lists(tmp_path):
    wnids = ["n01532829", "n01558993", "n01704323", "n01749939", "n01770081", "n01843383"]
    write_miniimagenet(tmp_path / "miniimagenet", wnids)
    lists = tmp_path / "lists"
    lists.mkdir()
    base = [f"MINI-ImageNet/train/{w}/{w}train{i:08d}.jpg" for w in wnids[:4] for i in range(3)]
    (lists / "session_1.txt").write_text("\n".join(base))
    (lists / "session_2.txt").write_text("\n".join(f"MINI-ImageNet/train/{w}/{w}train00000001.jpg" for w in wnids[4:]))
    stream = stream_of("miniimagenet", tmp_path, f"stream.index_dir={lists}")  # <root>/miniimagenet/ accepted
    assert stream.class_names == wnids
    assert [len(c) for c in stream.classes_per_session] == [4, 2]
    assert [len(d) for d in stream.train_data] == [12, 2] and stream.eval_counts() == [8, 4]


def test_miniimagenet_missing_split_shows_layout(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ConfigError, match=r"split/train.csv.*filename,label"):
        stream_of("miniimagenet", tmp_path)


def write_svhn(root: Path, per_class: int = 3) -> None:
    """SVHN's cropped-digits .mat files: X (32, 32, 3, N) uint8, y (N, 1) with 10 standing for digit 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        labels = np.repeat(np.arange(1, 11), per_class).reshape(-1, 1)
        images = rng.integers(0, 256, size=(32, 32, 3, len(labels)), dtype=np.uint8)
        savemat(root / f"{split}_32x32.mat", {"X": images, "y": labels})


def test_svhn_real_format(tmp_path):
    write_svhn(tmp_path)
    stream = stream_of("svhn", tmp_path, "stream.split=B2-Inc2", "stream.verify_checksums=false")
    assert [len(c) for c in stream.classes_per_session] == [2, 2, 2, 2, 2]
    assert sorted(stream.original_class_ids) == list(range(10))  # label 10 became digit 0
    assert len(stream.train_data[0]) == 6
    with pytest.raises(ConfigError, match="could not read stream.data_root.*train_32x32.mat"):
        stream_of("svhn", tmp_path)  # the md5 of these tiny files is not the real one


def write_aircraft(root: Path, variants: list[str], train: int = 3, test: int = 2) -> None:
    data = root / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    n = 0
    for split, per_class in (("trainval", train), ("test", test)):
        lines = []
        for k, variant in enumerate(variants):
            for _ in range(per_class):
                name = f"{1000000 + n}"
                _image(data / "images" / f"{name}.jpg", 10 * k)
                lines.append(f"{name} {variant}")
                n += 1
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")


def test_fgvc_aircraft_real_format(tmp_path):
    variants = ["707-320", "727-200", "A300B4", "Cessna 172"]  # names may contain spaces
    write_aircraft(tmp_path, variants)
    stream = stream_of("fgvc_aircraft", tmp_path, "stream.split=B2-Inc1", "stream.shuffle_classes=false")
    assert stream.class_names == variants
    assert [len(d) for d in stream.train_data] == [6, 3, 3]
    assert tuple(stream.train_data[0][0][0].shape) == (3, 16, 16)


def write_cars(root: Path, classes: list[str], train: int = 3, test: int = 2) -> None:
    from scipy.io import savemat

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(classes, dtype=object).reshape(1, -1)})
    for split, per_class, annos in (
        ("train", train, base / "devkit" / "cars_train_annos.mat"),
        ("test", test, base / "cars_test_annos_withlabels.mat"),
    ):
        (base / f"cars_{split}").mkdir()
        rows = []
        for k in range(len(classes)):
            for i in range(per_class):
                name = f"{k:03d}{i:02d}.jpg"
                _image(base / f"cars_{split}" / name, 10 * k)
                rows.append((name, k + 1))  # the .mat counts classes from 1
        annotations = np.array(rows, dtype=[("fname", object), ("class", object)]).reshape(1, -1)
        savemat(annos, {"annotations": annotations})


def test_stanford_cars_real_format(tmp_path):
    classes = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
    write_cars(tmp_path, classes)
    stream = stream_of("stanford_cars", tmp_path, "stream.split=B1-Inc1", "stream.shuffle_classes=false")
    assert stream.class_names == classes
    assert [len(d) for d in stream.train_data] == [3, 3, 3]
    assert len(stream.eval_data[2]) == 2


@pytest.mark.parametrize("name", ["svhn", "fgvc_aircraft", "stanford_cars"])
def test_torchvision_streams_show_the_layout_when_files_are_missing(tmp_path, name):
    with pytest.raises(ConfigError, match="expected layout"):
        stream_of(name, tmp_path)


def write_tinyimagenet(root: Path, wnids: list[str], train: int = 3, test: int = 2) -> None:
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rows = []
    for k, w in enumerate(wnids):
        for i in range(train):
            _image(base / "train" / w / "images" / f"{w}_{i}.JPEG", 10 * k)
        for i in range(test):
            name = f"val_{k * test + i}.JPEG"
            _image(base / "val" / "images" / name, 10 * k)
            rows.append(f"{name}\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")


def test_tinyimagenet_real_layout_with_wnids_order_and_names(tmp_path):
    write_tinyimagenet(tmp_path, ["n02124075", "n04067472", "n09999999"])  # the last has no name in the table
    stream = stream_of("tinyimagenet", tmp_path, "stream.split=B1-Inc1", "stream.shuffle_classes=false")
    assert stream.class_names == ["Egyptian Mau", "fishing casting reel", "n09999999"]
    assert [len(d) for d in stream.train_data] == [3, 3, 3] and [len(d) for d in stream.eval_data] == [2, 2, 2]
    assert tuple(stream.train_data[0][0][0].shape) == (3, 16, 16)


def write_cifar10(root: Path, per_class_train: int = 3, per_class_test: int = 2) -> None:
    """torchvision's CIFAR-10 python format: data_batch_1..5 and test_batch (data, labels), batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    train = [c for c in range(10) for _ in range(per_class_train)]
    for b in range(5):
        labels = train[b::5]
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps({"data": data, "labels": labels}))
    labels = [c for c in range(10) for _ in range(per_class_test)]
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": labels}))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


def test_cifar10_real_format(tmp_path):
    write_cifar10(tmp_path)
    stream = stream_of("cifar10", tmp_path, "stream.verify_checksums=false", "stream.shuffle_classes=false")
    assert stream.class_names[:3] == ["airplane", "automobile", "bird"]
    assert [len(d) for d in stream.train_data] == [6] * 5 and [len(d) for d in stream.eval_data] == [4] * 5
    with pytest.raises(ConfigError, match="could not read|verify_checksums"):
        stream_of("cifar10", tmp_path)  # the md5 of these tiny files is not the real one
