"""MNIST-format streams: ``fashion_mnist`` and ``mnist`` from their standard IDX files, offline.

``stream.data_root`` is either

- the folder holding the four IDX files, gzipped or not: ``train-images-idx3-ubyte[.gz]``,
  ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``
  (Debian's ``dataset-fashion-mnist`` installs them in ``/usr/share/datasets/fashion-mnist``), or
- torchvision's layout, with the files in ``<root>/FashionMNIST/raw/`` (``<root>/MNIST/raw/`` for ``mnist``).

The files are parsed by torchvision's IDX reader (``torchvision.datasets.mnist.read_image_file`` and
``read_label_file``, the code behind its ``FashionMNIST`` and ``MNIST``); it reads raw files only, so a gzipped file
is decompressed to a temporary file first. A missing file, a bad gzip stream, a wrong IDX header, a truncated file
or image and label counts that differ is a config error naming the file. No md5 check: Debian re-compresses the
files, so their md5 differs from the upstream ``.gz`` files'; gzip's CRC and the IDX sizes catch corruption.

Images are 28×28 grey, given to the transforms as RGB PIL images (the grey channel three times), so a pre-trained
3-channel backbone reads them unchanged; the whole image is resized to the input size (no centre crop, which would
cut the garments), unless ``stream.crop_pct`` says otherwise. The usual ``B{base}-Inc{k}`` splits, shots, seeded
class orders and per-class subsets (``stream.train_per_class``, ``stream.test_per_class``) apply.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from cil.backbones import Transforms
from cil.config import ConfigError
from cil.registry import register_stream
from cil.streams.common import GreyImages, Stream, build_stream

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def layout(folder: str) -> str:
    names = ", ".join(f"{n}[.gz]" for pair in FILES.values() for n in pair)
    return f"<root>/{{{names}}} (gzipped or not), or torchvision's <root>/{folder}/raw/ with the same files"


def find_idx_files(root: Path, folder: str) -> dict[str, Path]:
    """The four IDX files under ``root`` (flat, or in torchvision's ``<folder>/raw``), gzipped or not."""
    names = [n for pair in FILES.values() for n in pair]
    best: dict[str, Path] = {}
    for candidate in (root, root / folder / "raw"):
        found = {}
        for name in names:
            for file in (candidate / name, candidate / f"{name}.gz"):
                if file.is_file():
                    found[name] = file
                    break
        if len(found) == len(names):
            return found
        best = found if len(found) > len(best) else best
    missing = [n for n in names if n not in best]
    raise ConfigError(f"stream.data_root='{root}' lacks {missing}; expected layout: {layout(folder)}")


def read_idx(path: Path, labels: bool) -> torch.Tensor:
    """torchvision's IDX reader on ``path`` (decompressed first when it ends in ``.gz``); errors name the file."""
    reader = read_label_file if labels else read_image_file
    kind = "label" if labels else "image"
    try:
        if path.suffix != ".gz":
            return reader(str(path))
        with tempfile.TemporaryDirectory(prefix="cil-idx-") as tmp:
            raw = Path(tmp) / path.stem
            with gzip.open(path, "rb") as src, open(raw, "wb") as dst:
                shutil.copyfileobj(src, dst)
            return reader(str(raw))
    except (AssertionError, RuntimeError, ValueError, TypeError, KeyError, OSError, EOFError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{path} is not a readable IDX {kind} file ({reason}); re-install or re-download it"
        ) from None


def read_split(files: dict[str, Path], split: str, n_classes: int) -> GreyImages:
    image_name, label_name = FILES[split]
    images, labels = read_idx(files[image_name], labels=False), read_idx(files[label_name], labels=True)
    if len(images) != len(labels):
        raise ConfigError(
            f"{files[image_name]} holds {len(images)} images but {files[label_name]} {len(labels)} labels"
        )
    bad = labels[(labels < 0) | (labels >= n_classes)]
    if len(bad):
        raise ConfigError(f"{files[label_name]} holds label {int(bad[0])}; valid labels are 0..{n_classes - 1}")
    return GreyImages(images.numpy(), labels.tolist())


def _mnist_family(stream: str, folder: str, class_names: list[str]) -> Callable[..., Stream]:
    def build(cfg: Any, make_transforms: Callable[..., Transforms]) -> Stream:
        if cfg.data_root is None:
            hint = f" (Debian: {DEBIAN_FASHION_MNIST})" if stream == "fashion_mnist" else ""
            raise ConfigError(f"stream '{stream}' needs stream.data_root{hint}; expected layout: {layout(folder)}")
        root = Path(cfg.data_root).expanduser()
        if not root.is_dir():
            hint = " (Debian/Ubuntu: apt-get install dataset-fashion-mnist)" if stream == "fashion_mnist" else ""
            raise ConfigError(f"stream.data_root='{root}' is not a folder{hint}; expected layout: {layout(folder)}")
        files = find_idx_files(root, folder)
        train = read_split(files, "train", len(class_names))
        test = read_split(files, "test", len(class_names))
        names = dict(enumerate(class_names))
        return build_stream(stream, cfg, train, test, names, make_transforms(crop_pct=1.0))

    build.__doc__ = f"``{stream}`` from {layout(folder)}."
    return build


register_stream("fashion_mnist", _mnist_family("fashion_mnist", "FashionMNIST", FASHION_CLASSES))
register_stream("mnist", _mnist_family("mnist", "MNIST", [str(d) for d in range(10)]))
