"""What every stream shares: class order, ``B{base}-Inc{k}`` splits, and the Avalanche benchmark around them.

A stream builder loads a data set's raw train and test sets (anything with ``.targets``) and calls
:func:`build_stream`, which

1. fixes the class order (``stream.class_order``, or a seeded shuffle, or sorted ids),
2. cuts it into sessions (``stream.split``), or reads them from FSCIL index lists (``stream.index_dir``),
3. picks each session's training samples (all of them, or ``stream.shots`` per class after the base session),
4. remaps labels to their order of appearance (session 0's classes are 0..n0-1, and so on), and
5. wraps it all in an Avalanche benchmark (``benchmark_from_datasets`` + ``with_classes_timeline``), whose
   ``train_stream``/``test_stream`` any Avalanche user recognises.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from cil.backbones import Transforms
from cil.config import ConfigError, split_sizes
from cil.errors import UnreadableSample


@dataclass
class Stream:
    """A class-incremental stream: Avalanche's benchmark plus what the session loop asks of it.

    Class ids are contiguous and in order of appearance. ``eval_data[j]`` holds the test samples of the
    classes *new* in session j (disjoint across sessions); the Avalanche ``test_stream`` may instead be
    cumulative (few-shot streams: session t's test set covers every class seen so far).
    """

    name: str
    benchmark: Any
    classes_per_session: list[list[int]]
    class_names: list[str]
    original_class_ids: list[Any]
    train_data: list[Dataset]
    eval_data: list[Dataset]
    stats_data: list[Dataset]
    templates: list[list[str]] | None = None  # text prompts per session ("a photo of a {}."), for CLIP strategies
    task_names: list[str] | None = None  # a name per session where sessions are data sets (MTIL)

    @property
    def n_sessions(self) -> int:
        return len(self.classes_per_session)

    @property
    def n_classes(self) -> int:
        return sum(len(c) for c in self.classes_per_session)

    def seen_classes(self, session: int) -> list[int]:
        return [c for s in self.classes_per_session[: session + 1] for c in s]

    def eval_counts(self) -> list[int]:
        return [len(d) for d in self.eval_data]


class GreyImages(Dataset):
    """``(N, H, W)`` uint8 grey images given as RGB PIL images (the grey channel three times, so a 3-channel backbone
    reads them unchanged), with integer ``targets``."""

    def __init__(self, images: np.ndarray | Any, targets: Sequence[int] | Any):
        self.images = np.asarray(images, dtype=np.uint8)
        self.targets = [int(t) for t in targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i], mode="L").convert("RGB"), self.targets[i]


# A presized copy larger than this stays per-item work: it would hold memory for the whole run (Fashion-MNIST's
# 60,000 training images at 64 px are 246 MB grey; at 224 px, 3 GB)
PRESIZE_LIMIT_BYTES = 1 << 30


def resize_prefix(transform: Any) -> list:
    """The leading resize steps of a torchvision ``Compose`` (timm's eval transform starts with one): deterministic
    work that every epoch and every evaluation would repeat on the same images. Not the centre crop after it: the
    pipeline's resize, run again on a cropped image, would enlarge it."""
    from torchvision import transforms as T

    prefix = []
    for step in getattr(transform, "transforms", []):
        if not isinstance(step, T.Resize):
            break
        prefix.append(step)
    return prefix


def presized(data: Any, transform: Any) -> Any:
    """In-memory grey images (``GreyImages``, or a ``ClassSubset`` of them) with ``transform``'s leading resize
    already applied, kept as uint8; ``data`` itself where there is nothing to gain or the copy would exceed
    ``PRESIZE_LIMIT_BYTES``.

    The pipeline still runs in full on every item, unchanged: its resize finds the image at its target size already,
    and PIL returns a copy when asked to resize an image to its own size, so the tensors are bit-identical to those
    of the raw images (tested on Fashion-MNIST, digits, with and without a centre crop after the resize). What each
    item keeps: the resize, about a third of the 28 -> 64 px pipeline's time (``benchmarks/presize.py``). A grey
    image resized alone equals each channel of its RGB copy resized (PIL resamples each band with the same integer
    arithmetic; tested), so the copy stays one channel.
    """
    from PIL import Image
    from torchvision import transforms as T

    base, indices = (data.base, data.indices) if isinstance(data, ClassSubset) else (data, None)
    prefix = resize_prefix(transform) if transform is not None else []
    # a subclass that changes how an item is made would bypass the copy: only GreyImages' own items qualify
    if not isinstance(base, GreyImages) or type(base).__getitem__ is not GreyImages.__getitem__:
        return data
    if not prefix or not len(data):
        return data
    images = base.images if indices is None else base.images[indices]
    resize = T.Compose(prefix)
    first = np.asarray(resize(Image.fromarray(images[0], mode="L")))
    if first.nbytes * len(images) > PRESIZE_LIMIT_BYTES:
        return data
    out = np.empty((len(images), *first.shape), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(resize(Image.fromarray(image, mode="L")))
    return GreyImages(out, data.targets)


def sample_path(data: Any, i: int) -> str | None:
    """The file behind sample ``i`` of ``data``, followed through index wrappers (``base``/``data`` + ``indices``);
    None for samples that are not files."""
    while True:
        inner = next((getattr(data, n) for n in ("base", "data") if isinstance(getattr(data, n, None), Dataset)), None)
        if inner is None:
            break
        indices = getattr(data, "indices", None)
        i, data = (i if indices is None else indices[i]), inner
    for name in ("samples", "imgs", "_samples", "files", "_image_files", "_images", "paths"):
        items = getattr(data, name, None)
        if isinstance(items, (list, tuple)) and len(items) > i:
            item = items[i]
            return str(item[0] if isinstance(item, (tuple, list)) else item)
    return None


# PIL's modes of more than 8 bits per sample, and the largest value each can hold
_WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535}
# what an image that cannot be decoded raises: PIL's UnidentifiedImageError (OSError), truncated files, bad headers,
# and a decompression bomb (an image whose pixel count would exhaust memory; PIL's guard refuses it)
UNREADABLE_IMAGE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> Image.Image:
    """An RGB image of any PIL mode, converted by value range: 16-bit grey is scaled from 0..65535 to 0..255 (PIL's
    own ``convert("RGB")`` clips it, so that nearly every pixel saturates at 255), 32-bit integer grey from its
    bit depth, float grey from 0..1; palette images with transparency go through RGBA (alpha dropped, as for RGBA)."""
    if image.mode in _WIDE_MODES or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        top = _WIDE_MODES.get(image.mode) or (65535.0 if values.max(initial=0) > 255 else 255.0)
        image = Image.fromarray(np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def read_rgb(path: str | Path) -> Image.Image:
    """An image file as RGB (:func:`to_rgb`), read whole before the file is closed."""
    with open(path, "rb") as f:
        image = Image.open(f)
        image.load()
    return to_rgb(image)


def read_sample(data: Any, i: int) -> Any:
    """``data[i]``, or an UnreadableSample naming the file when it cannot be decoded."""
    try:
        return data[i]
    except UNREADABLE_IMAGE as e:
        path = sample_path(data, i)
        if path is None:
            raise
        advice = "replace or delete the file, or set stream.skip_unreadable=true to skip unreadable files"
        raise UnreadableSample.reading(path, e, advice) from None


class Relabeled(Dataset):
    """The samples of ``base`` whose class is in ``remap``, with labels mapped to their new ids."""

    def __init__(self, base: Any, remap: dict[Any, int]):
        self.base = base
        labels = _targets(base)
        self.indices = [i for i, t in enumerate(labels) if t in remap]
        self.position = {raw: pos for pos, raw in enumerate(self.indices)}
        self.targets = [remap[labels[i]] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, pos: int):
        x = read_sample(self.base, self.indices[pos])[0]
        return x, self.targets[pos]


def _targets(ds: Any) -> list[Any]:
    targets = getattr(ds, "targets", None)
    if targets is None:
        raise TypeError(f"{type(ds).__name__} needs a `targets` attribute to be split into sessions")
    return [int(t) if isinstance(t, (int, np.integer)) else t for t in list(targets)]


class ClassSubset(Dataset):
    """The samples of ``base`` at ``indices`` (in that order), with their ``targets``."""

    def __init__(self, base: Any, indices: list[int]):
        self.base, self.indices = base, indices
        labels = _targets(base)
        self.targets = [labels[i] for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


def per_class_subset(ds: Any, per_class: int | None, seed: int) -> Any:
    """At most ``per_class`` samples of each class of ``ds``: a seeded sample, kept in the data set's order.

    The sample depends only on the labels and ``seed`` (one generator per class, in sorted class order), so every
    strategy, and a peer framework given the same indices, sees the same images.
    """
    if per_class is None:
        return ds
    by_class = indices_by_class(_targets(ds))
    keep: list[int] = []
    for k, c in enumerate(sorted(by_class)):
        idx = by_class[c]
        if len(idx) > per_class:
            pick = np.random.RandomState([seed, k]).choice(len(idx), per_class, replace=False)
            idx = [idx[i] for i in sorted(pick)]
        keep += idx
    return ClassSubset(ds, sorted(keep))


def class_order(classes: Sequence[Any], cfg: Any, stream: str) -> list[Any]:
    """Fixed (``stream.class_order``), seeded shuffle, or sorted order of the original class ids."""
    classes = sorted(set(classes))
    if cfg.class_order is not None:
        order = list(cfg.class_order)
        if sorted(order) != classes or len(order) != len(set(order)):
            raise ConfigError(
                f"stream.class_order={order} is not a permutation of the {len(classes)} classes of {stream} "
                f"(ids {classes[0]}..{classes[-1]})"
            )
        return order
    if cfg.shuffle_classes and cfg.shuffle_rng == "python":  # random.seed(seed); random.shuffle(ids), as DKVB's code
        order = list(classes)
        random.Random(cfg.seed).shuffle(order)
        return order
    if cfg.shuffle_classes:
        return [classes[i] for i in np.random.RandomState(cfg.seed).permutation(len(classes))]
    return classes


def split_sessions(order: list[Any], split: str, stream: str) -> list[list[Any]]:
    """Cut the class order into a base session and increments: ``B50-Inc10`` on 100 classes → 6 sessions."""
    base, inc = split_sizes(split)
    rest = len(order) - base
    if base > len(order) or rest % inc != 0 or (base == 0 and rest == 0):
        raise ConfigError(
            f"stream.split={split!r} does not fit the {len(order)} classes of {stream}: after a base of {base}, "
            f"the remaining {rest} classes must split into sessions of {inc}"
        )
    sessions = [order[:base]] if base else []
    sessions += [order[i : i + inc] for i in range(base, len(order), inc)]
    return sessions


def build_stream(
    name: str,
    cfg: Any,
    train_set: Any,
    test_set: Any,
    class_names: dict[Any, str],
    transforms: Transforms,
    sample_names: Callable[[int], str] | None = None,
) -> Stream:
    """The full pipeline of the module docstring, for raw ``train_set``/``test_set`` with ``.targets``."""
    from cil.streams.fewshot import index_list_sessions, sample_shots

    if cfg.train_per_class is not None or cfg.test_per_class is not None:
        if cfg.index_dir is not None:
            raise ConfigError("stream.train_per_class/test_per_class cannot be combined with stream.index_dir")
        train_set = per_class_subset(train_set, cfg.train_per_class, cfg.seed)
        test_set = per_class_subset(test_set, cfg.test_per_class, cfg.seed)
    # resize in-memory images once, not every epoch; training images only where training does not augment them
    test_set = presized(test_set, transforms.eval)
    train_set = presized(train_set, transforms.eval if transforms.train is transforms.eval else None)
    train_labels = _targets(train_set)
    if cfg.index_dir is not None:
        if cfg.shots is not None or cfg.base_shots is not None:
            raise ConfigError(
                "set stream.index_dir (fixed FSCIL index lists) or stream.shots/base_shots (sampled), not both"
            )
        raw_indices, sessions = index_list_sessions(cfg.index_dir, train_labels, sample_names)
        fewshot = True
    else:
        sessions = split_sessions(class_order(train_labels, cfg, name), cfg.split, name)
        raw_indices = None
        fewshot = cfg.shots is not None
        if cfg.base_shots is not None and not fewshot:
            raise ConfigError(f"stream.base_shots={cfg.base_shots} needs stream.shots (the incremental sessions' K)")
        if fewshot:
            first_fewshot = 1 if split_sizes(cfg.split)[0] > 0 else 0
            raw_indices = sample_shots(train_labels, sessions, cfg.shots, cfg.seed, first_fewshot, cfg.base_shots)
    return make_benchmark(name, train_set, test_set, sessions, class_names, transforms, raw_indices, fewshot)


def make_benchmark(
    name: str,
    train_set: Any,
    test_set: Any,
    sessions: list[list[Any]],
    class_names: dict[Any, str],
    transforms: Transforms,
    raw_train_indices: list[list[int]] | None = None,
    cumulative_test: bool = False,
    untested: str = "refuse",
) -> Stream:
    """Remap labels to appearance order and build the Avalanche benchmark (see module docstring).

    ``untested``: what a class without test images gets; ``refuse`` (a ConfigError naming the classes: its accuracy
    would be left out of every average without a word), or ``note`` (a benchmark whose official split does not
    promise every class a test image, MTIL's random 80/20 splits: the run goes on and says how many)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from avalanche.benchmarks import benchmark_from_datasets, with_classes_timeline
        from avalanche.benchmarks.utils import as_classification_dataset
        from avalanche.benchmarks.utils.transform_groups import TransformGroups

    order = [c for s in sessions for c in s]
    remap = {c: i for i, c in enumerate(order)}
    groups = TransformGroups({"train": transforms.train, "eval": transforms.eval})
    train_rel, test_rel = Relabeled(train_set, remap), Relabeled(test_set, remap)
    train_all = as_classification_dataset(train_rel, transform_groups=groups)
    test_all = as_classification_dataset(test_rel, transform_groups=groups)

    new_ids = [[remap[c] for c in s] for s in sessions]
    test_by_class = indices_by_class(test_rel.targets)
    missing = [c for c in order if not test_by_class.get(remap[c])]
    if missing and untested == "refuse":  # its accuracy would silently be left out of every session's average
        shown = ", ".join(f"{c} ({class_names.get(c, c)})" for c in missing[:10])
        shown += " ..." if len(missing) > 10 else ""
        raise ConfigError(
            f"stream {name}: {len(missing)} of {len(order)} classes have no test images: {shown}; every class "
            "needs test data (check the test split under stream.data_root, or stream.test_per_class)"
        )
    if missing:
        from cil.progress import note

        note(f"stream {name}: {len(missing)} of {len(order)} classes have no test image in its official split")
    train_by_class = indices_by_class(train_rel.targets)
    train_data, stats_data, eval_data, test_stream = [], [], [], []
    for s, ids in enumerate(new_ids):
        if raw_train_indices is not None:
            idx = [train_rel.position[i] for i in raw_train_indices[s]]
        else:
            idx = [i for c in ids for i in train_by_class.get(c, [])]
        if not idx:
            raise ConfigError(f"session {s} of {name} has no training samples (classes {sessions[s]})")
        subset = train_all.subset(idx)
        train_data.append(subset.train())
        stats_data.append(subset.eval())
        new_test = [i for c in ids for i in test_by_class.get(c, [])]
        eval_data.append(test_all.subset(new_test).eval())
        seen = [c for prev in new_ids[: s + 1] for c in prev]
        cumulative = [i for c in seen for i in test_by_class.get(c, [])]
        test_stream.append(test_all.subset(cumulative).eval() if cumulative_test else eval_data[-1])
    benchmark = with_classes_timeline(benchmark_from_datasets(train=train_data, test=test_stream))
    return Stream(
        name=name,
        benchmark=benchmark,
        classes_per_session=new_ids,
        class_names=[str(class_names.get(c, c)) for c in order],
        original_class_ids=order,
        train_data=train_data,
        eval_data=eval_data,
        stats_data=stats_data,
    )


def indices_by_class(targets: Sequence[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        out.setdefault(t, []).append(i)
    return out
