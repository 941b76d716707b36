"""The embedded default: scikit-learn's handwritten digits (1,797 8×8 images, 10 classes), offline.

A seeded, stratified train/test split (``stream.test_size``), then the usual class order and split
(default ``B0-Inc2``: 5 sessions of 2 classes). Images are grey 8×8 arrays turned into RGB PIL images, so the
backbone's own transform resizes them to its input size (without a centre crop, which would cut digits).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from cil.backbones import Transforms
from cil.registry import register_stream
from cil.streams.common import GreyImages, Stream, build_stream


class DigitsImages(GreyImages):
    """8×8 digits (values 0..16) as RGB PIL images with integer targets."""

    def __init__(self, images: np.ndarray, targets: np.ndarray):
        super().__init__((images * (255.0 / 16.0)).round().astype(np.uint8), targets)


def digits_sets(test_size: float, seed: int) -> tuple[DigitsImages, DigitsImages]:
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.images, data.target, test_size=test_size, random_state=seed, stratify=data.target
    )
    return DigitsImages(x_train, y_train), DigitsImages(x_test, y_test)


def build_digits(cfg: Any, make_transforms: Callable[..., Transforms]) -> Stream:
    train, test = digits_sets(cfg.test_size, cfg.seed)
    names = {c: str(c) for c in range(10)}
    return build_stream("digits", cfg, train, test, names, make_transforms(crop_pct=1.0))


register_stream("digits", build_digits)
