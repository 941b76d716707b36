"""Tiny data sets written in each benchmark's real on-disk format (the files the real loaders read), for the tests and
for the paper-scale rehearsal (``benchmarks/paper_scale.py``)."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from cil.streams.mnist import FILES


def image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 20, 3), value % 256, dtype=np.uint8)).save(path)


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


def write_image_folders(root: Path, classes: list[str], train: int = 3, test: int = 2) -> None:
    for c, name in enumerate(classes):
        for i in range(train):
            image(root / "train" / name / f"{name}_{i}.jpg", 10 * c + i)
        for i in range(test):
            image(root / "test" / name / f"{name}_t{i}.jpg", 10 * c + i)


def write_miniimagenet(root: Path, wnids: list[str], train: int = 3, test: int = 2) -> None:
    (root / "split").mkdir(parents=True)
    rows = {"train": ["filename,label"], "test": ["filename,label"]}
    for c, wnid in enumerate(wnids):
        for split, n in (("train", train), ("test", test)):
            for i in range(n):
                name = f"{wnid}{split}{i:08d}.jpg"
                image(root / "images" / name, 10 * c + i)
                rows[split].append(f"{name},{wnid}")
    for split, lines in rows.items():
        (root / "split" / f"{split}.csv").write_text("\n".join(lines) + "\n")


def write_svhn(root: Path, per_class: int = 3) -> None:
    """SVHN's cropped-digits .mat files: X (32, 32, 3, N) uint8, y (N, 1) with 10 standing for digit 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        labels = np.repeat(np.arange(1, 11), per_class).reshape(-1, 1)
        images = rng.integers(0, 256, size=(32, 32, 3, len(labels)), dtype=np.uint8)
        savemat(root / f"{split}_32x32.mat", {"X": images, "y": labels})


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
                image(data / "images" / f"{name}.jpg", 10 * k)
                lines.append(f"{name} {variant}")
                n += 1
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")


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
                image(base / f"cars_{split}" / name, 10 * k)
                rows.append((name, k + 1))  # the .mat counts classes from 1
        annotations = np.array(rows, dtype=[("fname", object), ("class", object)]).reshape(1, -1)
        savemat(annos, {"annotations": annotations})


def write_tinyimagenet(root: Path, wnids: list[str], train: int = 3, test: int = 2) -> None:
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rows = []
    for k, w in enumerate(wnids):
        for i in range(train):
            image(base / "train" / w / "images" / f"{w}_{i}.JPEG", 10 * k)
        for i in range(test):
            name = f"val_{k * test + i}.JPEG"
            image(base / "val" / "images" / name, 10 * k)
            rows.append(f"{name}\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")


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


def small_image(path: Path, value: int, size: int = 8) -> None:
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
            small_image(root / "eurosat" / "2750" / name / f"{name}_{i + 1}.jpg", 20 * k)


def write_caltech101(root: Path, per_class: int = 2) -> None:
    base = root / "caltech101" / "101_ObjectCategories"
    categories = ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes"]
    categories += [f"category_{k:03d}" for k in range(97)]  # 101 real classes, as the benchmark's name list
    for k, name in enumerate(categories):
        for i in range(per_class):
            small_image(base / name / f"image_{i + 1:04d}.jpg", k)


def write_sun397(root: Path, per_class: int = 3) -> None:
    base = root / "SUN397"
    classes = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop"]
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("\n".join(classes) + "\n")
    for k, c in enumerate(classes):
        for i in range(per_class):
            small_image(base / c.lstrip("/") / f"sun_{k}{i:03d}.jpg", 30 * k)


def write_dtd(root: Path, train: int = 2, test: int = 1) -> None:
    base = root / "dtd" / "dtd"
    (base / "labels").mkdir(parents=True)
    classes = ["banded", "blotchy", "braided"]
    for split, n in (("train", train), ("val", 1), ("test", test)):
        lines = []
        for k, c in enumerate(classes):
            for i in range(n):
                name = f"{c}/{c}_{split}{i:02d}.jpg"
                small_image(base / "images" / name, 40 * k)
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
                small_image(base / "jpg" / f"image_{n:05d}.jpg", k)
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
                small_image(base / "images" / f"{item}.jpg", 50 * k)
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
                small_image(base / "images" / f"{image_id}.jpg", 60 * k)
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


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX format written by hand: magic 0x0000 08 <ndim> (unsigned bytes), big-endian dims, then the data."""
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, per_class=(3, 2), gz: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """Train and test IDX files of 10 classes (``per_class`` images each) in ``folder``; returns the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for (images, labels), n in zip(FILES.values(), per_class):
        y = np.array([c for _ in range(n) for c in range(10)], dtype=np.uint8)  # classes interleaved
        x = rng.integers(0, 256, size=(len(y), 28, 28), dtype=np.uint8)
        for name, array in ((images, x), (labels, y)):
            data = idx_bytes(array)
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
            arrays[name] = array
    return arrays


def fscil_index_entries(name: str, root: Path, base: int, way: int, shots: int) -> list[list[str]]:
    """The standard FSCIL index lists (CEC's ``session_<t>.txt``) for data written by the writers above: every
    training sample of the first ``base`` classes, then ``way`` classes of ``shots`` samples per session. CIFAR-100's
    lines are integer indices into the training set, miniImageNet's and CUB's image paths as CEC ships them (the
    reader matches their file names)."""
    by_class: dict[str, list[str]] = {}
    if name == "cifar100":
        labels = pickle.loads((root / "cifar-100-python" / "train").read_bytes())["fine_labels"]
        for i, c in enumerate(labels):
            by_class.setdefault(f"{c:03d}", []).append(str(i))
    elif name == "miniimagenet":
        for row in (root / "split" / "train.csv").read_text().splitlines()[1:]:
            file, wnid = row.split(",")
            by_class.setdefault(wnid, []).append(f"MINI-ImageNet/train/{wnid}/{file}")
    else:  # CUB in PILOT's class folders; CEC's lines name CUB_200_2011/images/<class>/<file>
        for folder in sorted((root / "train").iterdir()):
            files = sorted(p.name for p in folder.iterdir())
            by_class[folder.name] = [f"CUB_200_2011/images/{folder.name}/{f}" for f in files]
    classes = sorted(by_class)
    sessions = [[e for c in classes[:base] for e in by_class[c]]]
    for first in range(base, len(classes), way):
        sessions.append([e for c in classes[first : first + way] for e in by_class[c][:shots]])
    return sessions


def write_fscil_index(folder: Path, sessions: list[list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for t, entries in enumerate(sessions, 1):
        (folder / f"session_{t}.txt").write_text("\n".join(entries) + "\n")
