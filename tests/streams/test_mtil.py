"""The MTIL stream: every data set through torchvision's reader, on tiny files written in each real layout."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import random_split

from cil.config import ConfigError
from cil.streams.mtil import ORDER_I, ORDER_II, PROMPTS, read_dataset
from tests.streams.test_vision import stream_of, write_aircraft, write_cars, write_cifar100


def _image(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value % 256, dtype=np.uint8)).save(path)


def write_mnist(root: Path, train: int = 4, test: int = 2) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 10 * train), ("t10k", 10 * test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = (labels[:, None, None] * 20 + np.zeros((n, 28, 28), dtype=np.uint8)).astype(np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def write_eurosat(root: Path, per_class: int = 3) -> None:
    names = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop"]
    names += ["Residential", "River", "SeaLake"]
    for k, name in enumerate(names):
        for i in range(per_class):
            _image(root / "eurosat" / "2750" / name / f"{name}_{i + 1}.jpg", 20 * k)


def write_caltech101(root: Path, per_class: int = 2) -> None:
    base = root / "caltech101" / "101_ObjectCategories"
    categories = ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes"]
    categories += [f"category_{k:03d}" for k in range(97)]  # 101 real classes, as the benchmark's name list
    for k, name in enumerate(categories):
        for i in range(per_class):
            _image(base / name / f"image_{i + 1:04d}.jpg", k)


def write_sun397(root: Path, per_class: int = 3) -> None:
    base = root / "SUN397"
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop"]
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("\n".join(classes) + "\n")
    for k, c in enumerate(classes):
        for i in range(per_class):
            _image(base / c.lstrip("/") / f"sun_{k}{i:03d}.jpg", 30 * k)


def write_dtd(root: Path, train: int = 2, test: int = 1) -> None:
    base = root / "dtd" / "dtd"
    (base / "labels").mkdir(parents=True)
    classes = ["banded", "blotchy", "braided"]
    for split, n in (("train", train), ("val", 1), ("test", test)):
        lines = []
        for k, c in enumerate(classes):
            for i in range(n):
                name = f"{c}/{c}_{split}{i:02d}.jpg"
                _image(base / "images" / name, 40 * k)
                lines.append(name)
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")


def write_flowers(root: Path, train: int = 1, test: int = 1) -> None:
    from scipy.io import savemat

    base = root / "flowers-102"
    labels, trn, tst, n = [], [], [], 0
    for k in range(102):
        for split, count in (("train", train), ("test", test)):
            for _ in range(count):
                n += 1
                _image(base / "jpg" / f"image_{n:05d}.jpg", k)
                labels.append(k + 1)  # the .mat counts classes from 1
                (trn if split == "train" else tst).append(n)
    savemat(base / "imagelabels.mat", {"labels": np.array(labels)})
    savemat(base / "setid.mat", {"trnid": np.array(trn), "valid": np.array(trn[:2]), "tstid": np.array(tst)})


def write_food(root: Path, train: int = 2, test: int = 1) -> None:
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    classes = ["apple_pie", "baby_back_ribs", "baklava"]
    for split, n in (("train", train), ("test", test)):
        meta = {c: [f"{c}/{split}{i}" for i in range(n)] for c in classes}
        for k, c in enumerate(classes):
            for item in meta[c]:
                _image(base / "images" / f"{item}.jpg", 50 * k)
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))


def write_pets(root: Path, train: int = 2, test: int = 1) -> None:
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    breeds = [("Abyssinian", 1), ("american_bulldog", 2), ("Bengal", 1)]
    for split, n in (("trainval", train), ("test", test)):
        lines = []
        for k, (breed, species) in enumerate(breeds):
            for i in range(n):
                image_id = f"{breed}_{split}{i}"
                _image(base / "images" / f"{image_id}.jpg", 60 * k)
                lines.append(f"{image_id} {k + 1} {species} {k + 1}")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


def write_all(root: Path) -> None:
    write_aircraft(root, ["707-320", "A300B4"])
    train_list = root / "fgvc-aircraft-2013b" / "data" / "images_variant_trainval.txt"
    (train_list.parent / "images_variant_train.txt").write_text(train_list.read_text())  # MTIL trains on `train`
    write_caltech101(root)
    write_cifar100(root)
    write_dtd(root)
    write_eurosat(root)
    write_flowers(root)
    write_food(root)
    write_mnist(root)
    write_pets(root)
    write_cars(root, ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"])
    write_sun397(root)


@pytest.fixture(scope="module")
def mtil_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtil")
    write_all(root)
    return root


def test_every_data_set_reads_with_the_official_names_and_splits(mtil_root):
    sizes = {}
    for name in ORDER_I:
        train, test, raw = read_dataset(name, mtil_root, verify_checksums=False)
        sizes[name] = (len(train), len(test), len(raw))
        image, label = train[0]
        assert image.mode == "RGB" and 0 <= label < len(raw)  # MNIST's grey images too
    assert sizes["mnist"] == (40, 20, 10)
    assert sizes["oxford_pet"] == (6, 3, 3)  # trainval / test
    assert sizes["aircraft"] == (6, 4, 2)
    assert sizes["caltech101"] == (161, 41, 101)  # 80/20 of 202 images
    assert sizes["eurosat"] == (24, 6, 10) and sizes["sun397"] == (7, 2, 3)
    # the split is the official one: torch's random_split of the whole set with seed 42
    train, test, _ = read_dataset("eurosat", mtil_root)
    expected = random_split(range(30), [24, 6], torch.Generator().manual_seed(42))
    assert train.indices == list(expected[0]) and test.indices == list(expected[1])


def test_order_one_stream_sessions_names_and_templates(mtil_root):
    stream = stream_of("mtil", mtil_root, "stream.verify_checksums=false")
    assert stream.task_names == ORDER_I and stream.n_sessions == 11
    sizes = [len(c) for c in stream.classes_per_session]
    assert sizes == [2, 101, 100, 3, 10, 102, 3, 10, 3, 2, 3]
    first = {name: stream.class_names[c[0]] for name, c in zip(ORDER_I, stream.classes_per_session)}
    assert first["caltech101"] == "off-center face" and first["eurosat"] == "annual crop land"
    assert first["flowers"] == "pink primrose" and first["food"] == "apple pie" and first["mnist"] == "0 - zero"
    assert first["oxford_pet"] == "Abyssinian" and first["sun397"] == "abbey"
    assert stream.templates[0] == ["a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."]
    assert stream.templates[ORDER_I.index("mnist")] == ['a photo of the number: "{}".']
    assert [len(t) for t in stream.templates] == [len(PROMPTS[n]["templates"]) for n in ORDER_I]
    # every session's test set holds its own data set's images only
    assert [len(d) for d in stream.eval_data][:3] == [4, 41, 100]


def test_order_two_and_bad_data_set_names(mtil_root, tmp_path):
    stream = stream_of("mtil", mtil_root, "stream.verify_checksums=false", f"stream.datasets=[{','.join(ORDER_II)}]")
    assert stream.task_names == ORDER_II and len(stream.classes_per_session[0]) == 2  # Stanford Cars first
    with pytest.raises(ConfigError, match="unknown MTIL data set|each once"):
        stream_of("mtil", mtil_root, "stream.datasets=[mnist,imagenet]")
    with pytest.raises(ConfigError, match="could not read stream.data_root.*dtd/dtd"):
        stream_of("mtil", tmp_path, "stream.datasets=[dtd]")  # an empty folder: the error shows the layouts


def test_per_class_subsets_apply_to_every_data_set(mtil_root):
    stream = stream_of("mtil", mtil_root, "stream.verify_checksums=false", "stream.datasets=[mnist,eurosat]",
                       "stream.train_per_class=2", "stream.test_per_class=1")  # fmt: skip
    assert len(stream.train_data[0]) == 20 and len(stream.eval_data[0]) == 10  # MNIST: 4 / 2 per class -> 2 / 1
    eurosat = np.bincount([int(stream.train_data[1][i][1]) for i in range(len(stream.train_data[1]))])
    assert eurosat.max() == 2 and (eurosat > 0).sum() == 10  # at most 2 per class, every class kept
