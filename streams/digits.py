"""The embedded default: scikit-learn's handwritten digits (1,797 8×8 images, 10 classes), offline.

A seeded, stratified train/test split (``stream.test_size``), then the usual class order and split
(default ``B0-Inc2``: 5 sessions of 2 classes). Images are grey 8×8 arrays turned into RGB PIL images, so the
backbone's own transform resizes them to its input size (without a centre crop, which would cut digits).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from cil.backbones import Transforms
from cil.errors import ConfigError
from cil.registry import register_stream
from cil.streams.common import GreyImages, Stream, build_stream


class DigitsImages(GreyImages):
    """8×8 digits (values 0..16) as RGB PIL images with integer targets."""

    def __init__(self, images: np.ndarray, targets: np.ndarray):
        super().__init__((images * (255.0 / 16.0)).round().astype(np.uint8), targets)


def digits_sets(test_size: float, seed: int) -> tuple[DigitsImages, DigitsImages]:
    data = load_digits()
    n, classes = len(data.target), len(np.unique(data.target))
    n_test = math.ceil(test_size * n)  # scikit-learn's rounding of a fractional test size
    if min(n_test, n - n_test) < classes:  # a stratified split needs every class on both sides
        raise ConfigError(
            f"stream.test_size={test_size} leaves {n - n_test} training and {n_test} test images of {n}; each side "
            f"needs at least one per class ({classes}): choose a test_size between {classes / n:.4f} and "
            f"{1 - classes / n:.4f}"
        )
    x_train, x_test, y_train, y_test = train_test_split(
        data.images, data.target, test_size=test_size, random_state=seed, stratify=data.target
    )
    return DigitsImages(x_train, y_train), DigitsImages(x_test, y_test)


def build_digits(cfg: Any, make_transforms: Callable[..., Transforms]) -> Stream:
    train, test = digits_sets(cfg.test_size, cfg.seed)
    names = {c: str(c) for c in range(10)}
    return build_stream("digits", cfg, train, test, names, make_transforms(crop_pct=1.0))


register_stream("digits", build_digits)
