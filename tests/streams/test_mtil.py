"""The MTIL stream: every data set through torchvision's reader, on tiny files written in each real layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import random_split

from cil.config import ConfigError
from cil.streams.mtil import ORDER_I, ORDER_II, PROMPTS, read_dataset
from tests.helpers import stream_of
from tests.writers import write_all


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
