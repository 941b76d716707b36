"""Real image data sets through their real loaders, from a local ``stream.data_root`` (never downloaded).

- ``cifar10``: torchvision's CIFAR-10 format, ``<root>/cifar-10-batches-py/``.
- ``cifar100``: torchvision's CIFAR-100 format, ``<root>/cifar-100-python/{meta,train,test}``.
- ``imagenet_r``, ``cub200``, ``imagenet_a``, ``objectnet``, ``omnibenchmark`` and ``vtab``: the LAMDA-PILOT
  layout (the train/test splits PILOT distributes for these), ``<root>/train/<class>/*.jpg`` and
  ``<root>/test/<class>/*.jpg``, read with torchvision's ``ImageFolder``.
- ``svhn``: torchvision's SVHN (cropped digits) format, ``<root>/train_32x32.mat`` and ``<root>/test_32x32.mat``.
- ``fgvc_aircraft``: the FGVC-Aircraft 2013b archive as torchvision reads it (100 variants, trainval/test), under
  ``<root>/fgvc-aircraft-2013b/``.
- ``stanford_cars``: the Stanford Cars layout torchvision reads (196 classes, train/test), under
  ``<root>/stanford_cars/``.
- ``tinyimagenet``: Tiny ImageNet 200 as distributed, ``<root>/tiny-imagenet-200/`` (``wnids.txt``, ``train/``,
  ``val/images`` with ``val/val_annotations.txt`` as the test set).
- ``miniimagenet``: the FSCIL layout (CEC, xyutao/fscil), ``<root>/images/*.jpg`` with
  ``<root>/split/train.csv`` and ``<root>/split/test.csv`` (``filename,label`` rows, label = WordNet id);
  ``<root>/miniimagenet/`` is accepted as well.

A missing or malformed root is a config error that shows the expected layout.
"""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100, SVHN, FGVCAircraft, ImageFolder, StanfordCars
from torchvision.datasets.vision import VisionDataset

from cil.backbones import Transforms
from cil.config import ConfigError
from cil.io import UnsafePickle, safe_unpickle
from cil.registry import register_stream
from cil.streams.common import Stream, build_stream, read_rgb

CIFAR_LAYOUT = "<root>/cifar-100-python/{meta,train,test} (torchvision's CIFAR-100 python format)"
FOLDER_LAYOUT = "<root>/train/<class>/<image> and <root>/test/<class>/<image> (LAMDA-PILOT layout)"
CIFAR10_LAYOUT = "<root>/cifar-10-batches-py/{batches.meta,data_batch_1..5,test_batch} (torchvision's CIFAR-10 format)"
SVHN_LAYOUT = "<root>/train_32x32.mat and <root>/test_32x32.mat (torchvision's SVHN format)"
AIRCRAFT_LAYOUT = (
    "<root>/fgvc-aircraft-2013b/data/{variants.txt, images_variant_trainval.txt, images_variant_test.txt, images/}"
)
CARS_LAYOUT = (
    "<root>/stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_train/, "
    "cars_test_annos_withlabels.mat, cars_test/}"
)
TINY_LAYOUT = (
    "<root>/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt}"
)
MINI_LAYOUT = "<root>/images/<file>.jpg, <root>/split/train.csv and <root>/split/test.csv (filename,label rows)"


def _root(cfg: Any, stream: str, layout: str) -> Path:
    if cfg.data_root is None:
        raise ConfigError(f"stream '{stream}' needs stream.data_root; expected layout: {layout}")
    root = Path(cfg.data_root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"stream.data_root='{root}' is not a folder; expected layout: {layout}")
    _readable(root)
    return root


def _readable(folder: Path) -> None:
    """A folder that can be listed, or one line saying permission is denied (``os.walk``, which torchvision's
    ImageFolder uses, would skip it silently and report "no valid file")."""
    try:
        with os.scandir(folder):
            pass
    except PermissionError:
        raise ConfigError(f"permission denied: '{folder}' cannot be read (check its permissions)") from None


class SafeCIFAR100(CIFAR100):
    """torchvision's CIFAR100 (the same items, classes and targets), but its pickled batches are read with a
    restricted unpickler (:func:`cil.io.safe_unpickle`: dicts, lists, strings, numbers, numpy arrays only), so a
    tampered file is refused before any of it runs, with or without the md5 checks (``verify_checksums``)."""

    def __init__(self, root: str, train: bool = True, verify_checksums: bool = True):
        VisionDataset.__init__(self, root)
        self.train = train
        folder = Path(root) / self.base_folder
        if verify_checksums and not self._check_integrity():
            raise RuntimeError(f"{folder}: a file's md5 differs from the published one")
        data, targets = [], []
        for name, _ in self.train_list if train else self.test_list:
            entry = _unpickle(folder / name)
            data.append(entry["data"])
            targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC, as torchvision keeps it
        self.targets = targets
        self.classes = _unpickle(folder / self.meta["filename"])[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class SafeCIFAR10(SafeCIFAR100):
    """CIFAR-10's batches through the same restricted reader."""

    base_folder, train_list, test_list, meta = CIFAR10.base_folder, CIFAR10.train_list, CIFAR10.test_list, CIFAR10.meta


def _unpickle(path: Path) -> Any:
    """One CIFAR pickle through the restricted reader; a refused or foreign one is one line naming the file."""
    try:
        entry = safe_unpickle(path)
    except UnsafePickle as e:
        why = f"{e} (CIFAR's batches hold only dicts, lists, strings and arrays)"
        raise ConfigError(f"{path} is refused: {why}") from None
    if not isinstance(entry, dict):
        raise ConfigError(f"{path} is not a CIFAR batch: it holds a {type(entry).__name__}, not a dict")
    return entry


def _cifar(cfg: Any, make_transforms: Callable[..., Transforms], name: str) -> Stream:
    layout = CIFAR_LAYOUT if name == "cifar100" else CIFAR10_LAYOUT
    root = _root(cfg, name, layout)
    checked = SafeCIFAR100 if name == "cifar100" else SafeCIFAR10
    folder = root / checked.base_folder
    files = [checked.meta["filename"]] + [n for n, _ in checked.train_list + checked.test_list]
    missing = [n for n in files if not (folder / n).is_file()]
    if missing:
        raise ConfigError(f"stream.data_root='{root}' lacks {missing}; expected layout: {layout}")
    try:
        train, test = (checked(str(root), split == "train", cfg.verify_checksums) for split in ("train", "test"))
    except ConfigError:  # a refused pickle, already one line naming the file
        raise
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:  # a truncated or foreign pickle
        raise ConfigError(
            f"stream.data_root='{root}': a file of {folder} is not a readable CIFAR pickle ({type(e).__name__}: "
            f"{e}); replace the copy (it may be truncated); expected layout: {layout}"
        ) from None
    except RuntimeError as e:
        raise ConfigError(
            f"stream.data_root='{root}': {e} (set stream.verify_checksums=false for a re-packed copy)"
        ) from None
    return build_stream(name, cfg, train, test, dict(enumerate(train.classes)), make_transforms())


def build_cifar100(cfg: Any, make_transforms: Callable[..., Transforms]) -> Stream:
    return _cifar(cfg, make_transforms, "cifar100")


def build_cifar10(cfg: Any, make_transforms: Callable[..., Transforms]) -> Stream:
    return _cifar(cfg, make_transforms, "cifar10")


class _UncheckedSVHN(SVHN):
    """torchvision's SVHN reader without its md5 checks (``stream.verify_checksums=false``)."""

    def _check_integrity(self) -> bool:
        return (Path(self.root) / self.filename).is_file()


def _torchvision_pair(stream: str, layout: str, make: Callable[[str], Any], splits=("train", "test")):
    """Train and test sets of a torchvision reader; its errors become config errors showing the layout."""
    try:
        return tuple(make(split) for split in splits)
    except (RuntimeError, FileNotFoundError, KeyError, ValueError) as e:
        raise ConfigError(
            f"stream '{stream}' could not read stream.data_root: {e}; expected layout: {layout}"
        ) from None


def build_svhn(cfg: Any, make_transforms: Callable[..., Transforms]) -> Stream:
    root = _root(cfg, "svhn", SVHN_LAYOUT)
    cls = SVHN if cfg.verify_checksums else _UncheckedSVHN
    train, test = _torchvision_pair("svhn", SVHN_LAYOUT, lambda split: cls(str(root), split=split))
    for ds in (train, test):
        ds.targets = [int(t) for t in ds.labels]  # torchvision maps the file's label 10 to digit 0
    return build_stream("svhn", cfg, train, test, {d: str(d) for d in range(10)}, make_transforms())


def build_fgvc_aircraft(cfg: Any, make_transforms: Callable[..., Transforms]) -> Stream:
    """The 100 variants; trainval for training and test for evaluation, as the FSA code reads them."""
    root = _root(cfg, "fgvc_aircraft", AIRCRAFT_LAYOUT)
    train, test = _torchvision_pair(
        "fgvc_aircraft", AIRCRAFT_LAYOUT, lambda split: FGVCAircraft(str(root), split=split), ("trainval", "test")
    )
    for ds in (train, test):
        ds.targets = list(ds._labels)
    names = dict(enumerate(train.classes))
    return build_stream("fgvc_aircraft", cfg, train, test, names, make_transforms(), sample_names=_file_name(train))


def build_stanford_cars(cfg: Any, make_transforms: Callable[..., Transforms]) -> Stream:
    root = _root(cfg, "stanford_cars", CARS_LAYOUT)
    train, test = _torchvision_pair("stanford_cars", CARS_LAYOUT, lambda split: StanfordCars(str(root), split=split))
    for ds in (train, test):
        ds.targets = [int(label) for _, label in ds._samples]
    names = dict(enumerate(train.classes))
    return build_stream("stanford_cars", cfg, train, test, names, make_transforms())


def _file_name(ds: Any) -> Callable[[int], str]:
    return lambda i: Path(ds._image_files[i]).name


def _image_folders(cfg: Any, stream: str) -> tuple[ImageFolder, ImageFolder]:
    root = _root(cfg, stream, FOLDER_LAYOUT)
    sets = []
    for split in ("train", "test"):
        folder = root / split
        if folder.is_dir():
            _readable(folder)
        if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
            raise ConfigError(f"stream.data_root='{root}' has no class folders in {split}/; expected {FOLDER_LAYOUT}")
        for class_folder in sorted(p for p in folder.iterdir() if p.is_dir()):
            _readable(class_folder)
        try:
            sets.append(ImageFolder(str(folder), loader=read_rgb))  # by value range: 16-bit PNGs too
        except (FileNotFoundError, RuntimeError) as e:
            raise ConfigError(f"stream.data_root='{root}': {e}; expected layout: {FOLDER_LAYOUT}") from None
    train, test = sets
    if train.classes != test.classes:
        extra = sorted(set(train.classes) ^ set(test.classes))[:5]
        raise ConfigError(f"stream.data_root='{root}': train/ and test/ hold different classes (e.g. {extra})")
    return train, test


def _folder_stream(stream: str) -> Callable[..., Stream]:
    def build(cfg: Any, make_transforms: Callable[..., Transforms]) -> Stream:
        train, test = _image_folders(cfg, stream)
        names = dict(enumerate(train.classes))
        return build_stream(
            stream,
            cfg,
            train,
            test,
            names,
            make_transforms(),
            sample_names=lambda i: Path(train.samples[i][0]).name,
        )

    build.__doc__ = f"``{stream}`` from {FOLDER_LAYOUT}."
    return build


class ImageList(Dataset):
    """Images named in a ``filename,label`` CSV (miniImageNet's split files); labels in order of appearance."""

    def __init__(self, images: Path, csv_file: Path, classes: list[str] | None = None):
        with open(csv_file, newline="") as f:
            rows = [r for r in csv.reader(f) if r]
        if rows and rows[0][0] == "filename":
            rows = rows[1:]
        self.files = [images / r[0] for r in rows]
        wnids = [r[1] for r in rows]
        self.classes = classes if classes is not None else list(dict.fromkeys(wnids))
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted(set(wnids) - set(index))
        if unknown:
            raise ConfigError(f"{csv_file} names classes absent from the training split: {unknown[:5]}")
        self.targets = [index[w] for w in wnids]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return read_rgb(self.files[i]), self.targets[i]


class LabeledFiles(Dataset):
    """Image files with their labels."""

    def __init__(self, files: list[Path], targets: list[int]):
        self.files, self.targets = files, targets

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return read_rgb(self.files[i]), self.targets[i]


def build_tinyimagenet(cfg: Any, make_transforms: Callable[..., Transforms]) -> Stream:
    """Tiny ImageNet (200 classes, 64x64): class ids in ``wnids.txt`` order (as continuum's reader, which the ZSCL
    CIL code uses, so its class orders apply), the validation split as test set, names from ZSCL's class list."""
    base = _root(cfg, "tinyimagenet", TINY_LAYOUT) / "tiny-imagenet-200"
    annotations = base / "val" / "val_annotations.txt"
    if not (base / "wnids.txt").is_file() or not annotations.is_file():
        raise ConfigError(f"stream.data_root='{base.parent}' lacks wnids.txt or val_annotations.txt; {TINY_LAYOUT}")
    wnids = (base / "wnids.txt").read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    train_files = [(f, index[w]) for w in wnids for f in sorted((base / "train" / w / "images").glob("*.JPEG"))]
    rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
    unknown = sorted({r[1] for r in rows} - set(index))
    if unknown:
        raise ConfigError(f"{annotations} names classes absent from wnids.txt: {unknown[:5]}")
    train = LabeledFiles([f for f, _ in train_files], [t for _, t in train_files])
    test = LabeledFiles([base / "val" / "images" / r[0] for r in rows], [index[r[1]] for r in rows])
    table = Path(__file__).resolve().parent / "tinyimagenet_classes.tsv"
    known = dict(line.split("\t") for line in table.read_text(encoding="utf-8").splitlines() if line.strip())
    names = {i: known.get(w, w) for i, w in enumerate(wnids)}
    return build_stream("tinyimagenet", cfg, train, test, names, make_transforms())


def build_miniimagenet(cfg: Any, make_transforms: Callable[..., Transforms]) -> Stream:
    root = _root(cfg, "miniimagenet", MINI_LAYOUT)
    if not (root / "split").is_dir() and (root / "miniimagenet").is_dir():
        root = root / "miniimagenet"
    needed = [root / "images", root / "split" / "train.csv", root / "split" / "test.csv"]
    missing = [str(p.relative_to(root)) for p in needed if not p.exists()]
    if missing:
        raise ConfigError(f"stream.data_root='{root}' lacks {missing}; expected layout: {MINI_LAYOUT}")
    train = ImageList(root / "images", root / "split" / "train.csv")
    test = ImageList(root / "images", root / "split" / "test.csv", classes=train.classes)
    absent = [str(p) for p in train.files[:1] + test.files[:1] if not p.is_file()]
    if absent:
        raise ConfigError(f"stream.data_root='{root}': image {absent[0]} listed in split/ does not exist")
    names = dict(enumerate(train.classes))
    return build_stream(
        "miniimagenet", cfg, train, test, names, make_transforms(), sample_names=lambda i: train.files[i].name
    )


register_stream("cifar100", build_cifar100)
register_stream("cifar10", build_cifar10)
register_stream("imagenet_r", _folder_stream("imagenet_r"))
register_stream("cub200", _folder_stream("cub200"))
for _name in ("imagenet_a", "objectnet", "omnibenchmark", "vtab"):
    register_stream(_name, _folder_stream(_name))
register_stream("miniimagenet", build_miniimagenet)
register_stream("tinyimagenet", build_tinyimagenet)
register_stream("svhn", build_svhn)
register_stream("fgvc_aircraft", build_fgvc_aircraft)
register_stream("stanford_cars", build_stanford_cars)
