"""ZSCL's reference data: captions and images it distils on (the paper's Conceptual Captions and ImageNet), read
from the files a user gives (``strategy.reference_captions``, ``strategy.reference_images``).

Readers of data live in ``cil.streams``; the strategy reads them when its first session begins, not when it is built.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from torch.utils.data import Dataset

from cil.errors import ConfigError
from cil.streams.common import UNREADABLE_IMAGE, read_rgb

CAPTION_COLUMNS = ("title", "caption", "captions", "text")


def read_captions(path: str | Path) -> list[str]:
    """Captions from a text file (one per line), the Conceptual Captions TSV (caption, then URL, per row), the
    code's ``*_output.csv`` (tab-separated, header ``title  filepath``) or a comma-separated CSV.

    Tab-separated and plain files are split by line and tab only: no quote processing, so a caption that starts
    with a quote cannot swallow the lines after it. A header row naming the caption column (title, caption,
    text) is skipped and picks that column. A missing or empty file is a :class:`ConfigError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"reference captions file '{path}' not found (strategy.reference_captions)")
    with open(path, newline="", encoding="utf-8") as f:
        lines = f.read().splitlines()
    first = next((line for line in lines if line.strip()), "")
    if "\t" in first or path.suffix.lower() == ".tsv":
        rows = [line.split("\t") for line in lines]
    elif path.suffix.lower() == ".csv":  # a comma-separated file: CSV quoting is part of its format
        rows = list(csv.reader(lines))
    else:
        rows = [[line] for line in lines]
    rows = [row for row in rows if row and row[0].strip()]
    column = 0
    if rows and len(rows[0]) > 1:
        header = [field.strip().lower() for field in rows[0]]
        named = [i for i, field in enumerate(header) if field in CAPTION_COLUMNS]
        if named:
            column, rows = named[0], rows[1:]
    captions = [row[column].strip() for row in rows if len(row) > column and row[column].strip()]
    if not captions:
        raise ConfigError(f"reference captions file '{path}' holds no caption (strategy.reference_captions)")
    return captions


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFiles(Dataset):
    """Every image file under ``root`` (searched recursively, sorted), without labels: ``ds[i]`` is an image.

    Built for ImageNet's 1.28 M training files: one ``os.scandir`` walk, and the relative paths kept as one
    numpy byte array (about 40 bytes a file, a single buffer that loader workers share without copying, where a
    list of ``Path`` objects takes ~10x that and is copied page by page as workers touch its reference counts).
    """

    def __init__(self, root: str | Path, transform: Callable | None = None):
        self.root, self.transform = Path(root), transform
        if not self.root.is_dir():
            raise ConfigError(f"reference image folder '{root}' not found (strategy.reference_images)")
        names = sorted(_image_files(str(self.root), ""), key=lambda name: name.split("/"))  # as sorted Paths
        self.files = np.array([n.encode("utf-8", "surrogateescape") for n in names], dtype=np.bytes_)
        if not len(self.files):
            raise ConfigError(
                f"reference image folder '{root}' holds no image ({', '.join(IMAGE_SUFFIXES)}; "
                "strategy.reference_images)"
            )

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i].decode("utf-8", "surrogateescape")

    def __getitem__(self, i: int):
        try:
            image = read_rgb(self.path(i))
        except UNREADABLE_IMAGE as e:  # a corrupt or truncated image, a non-image file, a decompression bomb
            from cil.errors import UnreadableSample

            advice = "replace or delete the file (strategy.reference_images)"
            raise UnreadableSample.reading(self.path(i), e, advice, what="reference image ") from None
        return self.transform(image) if self.transform else image


def _image_files(folder: str, prefix: str) -> Iterator[str]:
    """Relative paths of the image files under ``folder`` (recursive, any order)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):  # as os.walk: symlinked folders are not entered
                yield from _image_files(entry.path, prefix + entry.name + "/")
            elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                yield prefix + entry.name


class ImagesOnly(Dataset):
    """The images of any data set whose items are ``(image, label, ...)`` or images: its labels are never read."""

    def __init__(self, data: Dataset, transform: Callable | None = None):
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        item = self.data[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        return self.transform(image) if self.transform else image


def reference_image_set(source: str | Path | Dataset, transform: Callable | None = None) -> Dataset:
    """The reference image set: a folder of images, ``"digits"`` (the embedded 1,797 digits), or a data set object.

    A missing or empty set is a :class:`ConfigError`: ZSCL's distillation needs reference images.
    """
    if isinstance(source, Dataset):
        if len(source) == 0:
            raise ConfigError("the reference image set is empty (strategy.reference_images)")
        return ImagesOnly(source, transform)
    if str(source) == "digits":
        from sklearn.datasets import load_digits

        from cil.streams.digits import DigitsImages

        digits = load_digits()
        return ImagesOnly(DigitsImages(digits.images, digits.target), transform)
    return ImageFiles(source, transform)
