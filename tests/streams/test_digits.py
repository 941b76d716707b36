"""The digits stream: class order, splits, remapping, transforms, and the Avalanche benchmark around it."""

from __future__ import annotations

from collections import Counter

import pytest

from cil.config import ConfigError
from tests.helpers import digits_stream


def test_default_is_five_sessions_of_two_classes_remapped_in_appearance_order():
    stream = digits_stream()
    assert stream.n_sessions == 5 and stream.n_classes == 10
    assert stream.classes_per_session == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert sorted(stream.original_class_ids) == list(range(10))
    for k, exp in enumerate(stream.benchmark.train_stream):
        assert sorted(exp.classes_in_this_experience) == stream.classes_per_session[k]
        labels = set(exp.dataset.targets)
        assert labels == set(stream.classes_per_session[k])
    # the class names follow the original ids through the remapping
    assert stream.class_names == [str(c) for c in stream.original_class_ids]


def test_class_order_is_seeded():
    a, b, c = digits_stream("run.seed=1"), digits_stream("run.seed=1"), digits_stream("run.seed=2")
    assert a.original_class_ids == b.original_class_ids
    assert a.original_class_ids != c.original_class_ids


def test_fixed_class_order_and_no_shuffle():
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert digits_stream(f"stream.class_order={order}").original_class_ids == order
    assert digits_stream("stream.shuffle_classes=false").original_class_ids == list(range(10))


def test_labels_are_remapped_consistently_in_train_and_test():
    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    stream = digits_stream(f"stream.class_order={order}")
    from cil.streams.digits import digits_sets

    train, _ = digits_sets(0.2, 0)
    raw = Counter(train.targets)
    remapped = Counter(t for d in stream.train_data for t in d.targets)
    assert all(remapped[new] == raw[old] for new, old in enumerate(order))


def test_base_split():
    stream = digits_stream("stream.split=B4-Inc2")
    assert [len(c) for c in stream.classes_per_session] == [4, 2, 2, 2]


def test_stratified_seeded_test_split():
    from cil.streams.digits import digits_sets

    train, test = digits_sets(0.2, 0)
    assert len(test) == pytest.approx(0.2 * 1797, abs=1)
    counts_train, counts_test = Counter(train.targets), Counter(test.targets)
    for c in range(10):
        share = counts_test[c] / (counts_train[c] + counts_test[c])
        assert share == pytest.approx(0.2, abs=0.01)
    assert digits_sets(0.2, 0)[1].images.tobytes() == test.images.tobytes()
    assert digits_sets(0.2, 1)[1].images.tobytes() != test.images.tobytes()


def test_images_are_resized_to_the_backbone_input_size():
    stream = digits_stream()
    x, y = stream.train_data[0][0][:2]
    assert tuple(x.shape) == (3, 16, 16) and y in stream.classes_per_session[0]
    x_eval = stream.eval_data[0][0][0]
    assert tuple(x_eval.shape) == (3, 16, 16)


def test_eval_data_are_disjoint_per_session_and_cover_the_test_set():
    stream = digits_stream()
    assert sum(stream.eval_counts()) == pytest.approx(0.2 * 1797, abs=1)
    for k, data in enumerate(stream.eval_data):
        assert set(data.targets) == set(stream.classes_per_session[k])


def test_split_must_fit_the_classes():
    with pytest.raises(ConfigError, match="B3-Inc2"):
        digits_stream("stream.split=B3-Inc2")
