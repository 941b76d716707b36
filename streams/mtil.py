"""MTIL: ZSCL's multi-domain task-incremental benchmark — one task per data set, all its classes at once.

``stream.name: mtil`` reads the data sets of ``stream.datasets`` (order I by default; ``ORDER_II`` for order II)
from ``stream.data_root`` with torchvision's readers, each in torchvision's own layout under the same root (as the
official code's ``--data-location``). Splits follow the official code: torchvision's train/test splits (Aircraft
``train``, Oxford Pets ``trainval``), and for Caltech101, EuroSAT and SUN397, which have none, a random 80/20 split
of the whole set with ``torch.Generator().manual_seed(42)`` (``torch.utils.data.random_split``, so the indices are
the code's). Each data set brings its own class names and prompt templates (``mtil_prompts.json``, extracted from the
official code), which become the stream's ``templates`` for CLIP strategies. ``stream.split`` is not used: a session is
a data set. Class ids run through the data sets in task order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch.utils.data import Dataset, random_split
from torchvision import datasets as tv

from cil.backbones import Transforms
from cil.config import ConfigError
from cil.registry import register_stream
from cil.streams.common import Stream, make_benchmark, per_class_subset, read_sample, to_rgb
from cil.streams.vision import SafeCIFAR100, _root, _torchvision_pair

ORDER_I = [
    "aircraft", "caltech101", "cifar100", "dtd", "eurosat", "flowers", "food", "mnist", "oxford_pet",
    "stanford_cars", "sun397",
]  # fmt: skip
ORDER_II = [
    "stanford_cars", "food", "mnist", "oxford_pet", "flowers", "sun397", "aircraft", "caltech101", "dtd", "eurosat",
    "cifar100",
]  # fmt: skip
PROMPTS = json.loads((Path(__file__).resolve().parent / "mtil_prompts.json").read_text(encoding="utf-8"))
LAYOUT = (
    "<root>/{fgvc-aircraft-2013b, caltech101/101_ObjectCategories, cifar-100-python, dtd/dtd, eurosat/2750, "
    "flowers-102, food-101, MNIST/raw, oxford-iiit-pet, stanford_cars, SUN397} (torchvision's layouts)"
)


class LabeledSubset(Dataset):
    """The samples ``indices`` of ``data`` with their labels as ``targets``; images converted to RGB (MNIST is grey)."""

    def __init__(self, data: Any, labels: list[int], indices: list[int] | None = None):
        self.data = data
        self.indices = list(range(len(labels))) if indices is None else list(indices)
        self.targets = [int(labels[i]) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image = read_sample(self.data, self.indices[i])[0]
        return (to_rgb(image) if isinstance(image, Image.Image) else image), self.targets[i]


class _UncheckedFlowers102(tv.Flowers102):
    """torchvision's Flowers102 reader without its md5 checks (``stream.verify_checksums=false``)."""

    def _check_integrity(self) -> bool:
        files = [self._file_dict[key][0] for key in ("label", "setid")]
        return self._images_folder.is_dir() and all((self._base_folder / name).is_file() for name in files)


def _split_80_20(data: Any, labels: list[int]) -> tuple[LabeledSubset, LabeledSubset]:
    """The official code's split of a data set without one: 80/20, ``random_split`` seeded with 42."""
    n_train = int(0.8 * len(labels))
    train, test = random_split(range(len(labels)), [n_train, len(labels) - n_train], torch.Generator().manual_seed(42))
    return LabeledSubset(data, labels, list(train)), LabeledSubset(data, labels, list(test))


def _pair(name: str, make: Callable[[str], Any], labels: Callable[[Any], list[int]], splits=("train", "test")):
    train, test = _torchvision_pair(f"mtil/{name}", LAYOUT, make, splits)
    return LabeledSubset(train, labels(train)), LabeledSubset(test, labels(test)), list(train.classes)


def read_dataset(name: str, root: Path, verify_checksums: bool = True):
    """(train, test, torchvision's class names) of one MTIL data set, split as the official code splits it."""
    r = str(root)
    private = lambda ds: list(ds._labels)  # noqa: E731  (the readers keep their labels in `_labels`)
    if name == "aircraft":
        return _pair(name, lambda s: tv.FGVCAircraft(r, split=s), private)
    if name == "caltech101":
        (whole,) = _torchvision_pair("mtil/caltech101", LAYOUT, lambda _: tv.Caltech101(r), ("all",))
        return (*_split_80_20(whole, list(whole.y)), list(whole.categories))
    if name == "cifar100":
        return _pair(name, lambda s: SafeCIFAR100(r, s == "train", verify_checksums), lambda ds: list(ds.targets))
    if name == "dtd":
        return _pair(name, lambda s: tv.DTD(r, split=s), private)
    if name == "eurosat":
        (whole,) = _torchvision_pair("mtil/eurosat", LAYOUT, lambda _: tv.EuroSAT(r), ("all",))
        return (*_split_80_20(whole, list(whole.targets)), list(whole.classes))
    if name == "flowers":
        cls = tv.Flowers102 if verify_checksums else _UncheckedFlowers102
        train, test = _torchvision_pair("mtil/flowers", LAYOUT, lambda s: cls(r, split=s))
        n = max(train._labels) + 1
        return LabeledSubset(train, private(train)), LabeledSubset(test, private(test)), [str(c) for c in range(n)]
    if name == "food":
        return _pair(name, lambda s: tv.Food101(r, split=s), private)
    if name == "mnist":
        return _pair(name, lambda s: tv.MNIST(r, train=s == "train"), lambda ds: ds.targets.tolist())
    if name == "oxford_pet":
        return _pair(name, lambda s: tv.OxfordIIITPet(r, split=s), private, ("trainval", "test"))
    if name == "stanford_cars":
        return _pair(name, lambda s: tv.StanfordCars(r, split=s), lambda ds: [int(y) for _, y in ds._samples])
    if name == "sun397":
        (whole,) = _torchvision_pair("mtil/sun397", LAYOUT, lambda _: tv.SUN397(r), ("all",))
        return (*_split_80_20(whole, private(whole)), list(whole.classes))
    raise ConfigError(f"stream.datasets: unknown MTIL data set '{name}'; choose from {ORDER_I}")


def class_names(name: str, raw: list[str]) -> list[str]:
    """The official code's names: its own list where it has one, else torchvision's with underscores as spaces."""
    own = PROMPTS[name].get("class_names")
    if own is not None:
        if len(own) != len(raw):
            raise ConfigError(f"mtil/{name}: {len(raw)} classes on disk, the benchmark has {len(own)}")
        return list(own)
    return [c.replace("_", " ") for c in raw]


class Tasks(Dataset):
    """Several data sets end to end, labels offset so that data set j's classes follow data set j-1's."""

    def __init__(self, parts: list[LabeledSubset], offsets: list[int]):
        self.parts = parts
        self.index = [(j, i) for j, part in enumerate(parts) for i in range(len(part))]
        self.targets = [offsets[j] + part.targets[i] for j, part in enumerate(parts) for i in range(len(part))]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int):
        j, i = self.index[k]
        return self.parts[j][i][0], self.targets[k]


def build_mtil(cfg: Any, make_transforms: Callable[..., Transforms]) -> Stream:
    names = list(cfg.datasets) if cfg.datasets is not None else list(ORDER_I)
    unknown = [n for n in names if n not in PROMPTS or n.startswith("_")]
    if unknown or len(set(names)) != len(names):
        raise ConfigError(f"stream.datasets={names}: each once, from {ORDER_I}")
    if cfg.shots is not None or cfg.index_dir is not None:
        raise ConfigError("stream 'mtil' trains on whole data sets: stream.shots and stream.index_dir are not used")
    root = _root(cfg, "mtil", LAYOUT)
    trains, tests, sessions, labels, offset = [], [], [], {}, 0
    for name in names:
        train, test, raw = read_dataset(name, root, cfg.verify_checksums)
        trains.append(train)
        tests.append(test)
        sessions.append([offset + c for c in range(len(raw))])
        labels.update({offset + c: n for c, n in enumerate(class_names(name, raw))})
        offset += len(raw)
    offsets = [s[0] for s in sessions]
    train_all, test_all = Tasks(trains, offsets), Tasks(tests, offsets)
    train_all = per_class_subset(train_all, cfg.train_per_class, cfg.seed)  # no-ops unless a subset is asked for
    test_all = per_class_subset(test_all, cfg.test_per_class, cfg.seed)
    # the official splits (random 80/20 of whole data sets) do not promise every class a test image: noted, not refused
    stream = make_benchmark("mtil", train_all, test_all, sessions, labels, make_transforms(), untested="note")
    stream.templates = [list(PROMPTS[n]["templates"]) for n in names]
    stream.task_names = names
    return stream


register_stream("mtil", build_mtil)
