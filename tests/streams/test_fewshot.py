"""Few-shot streams: seeded K-shot sampling, FSCIL index lists, cumulative test sets."""

from __future__ import annotations

from collections import Counter

import pytest

from cil.config import ConfigError
from tests.helpers import digits_stream as stream_of


def test_k_shot_sessions_after_a_full_base_session():
    stream = stream_of("stream.split=B4-Inc2", "stream.shots=3")
    assert [len(c) for c in stream.classes_per_session] == [4, 2, 2, 2]
    base = Counter(stream.train_data[0].targets)
    assert all(n > 100 for n in base.values())  # the base session keeps every sample
    for k in range(1, 4):
        assert Counter(stream.train_data[k].targets) == {c: 3 for c in stream.classes_per_session[k]}


def test_k_shot_sampling_is_seeded():
    import torch

    def shots(seed):
        stream = stream_of(
            "stream.split=B4-Inc2", "stream.shots=2", f"stream.seed={seed}", "stream.shuffle_classes=false"
        )
        data = stream.train_data[1]
        return torch.stack([data[i][0] for i in range(len(data))]), list(data.targets)

    (a, ya), (b, yb), (c, yc) = shots(5), shots(5), shots(6)
    assert ya == yb == yc == [4, 4, 5, 5]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_fewshot_test_stream_covers_every_class_seen_so_far():
    stream = stream_of("stream.split=B4-Inc2", "stream.shots=3")
    for k, exp in enumerate(stream.benchmark.test_stream):
        assert set(exp.dataset.targets) == set(stream.seen_classes(k))
        assert len(exp.dataset) == sum(stream.eval_counts()[: k + 1])


def test_too_many_shots():
    with pytest.raises(ConfigError, match="stream.shots=500"):
        stream_of("stream.split=B4-Inc2", "stream.shots=500")


def _raw_train():
    from cil.streams.digits import digits_sets

    return digits_sets(0.2, 0)[0]


def test_index_lists_define_sessions_and_shots(tmp_path):
    train = _raw_train()
    by_class = {c: [i for i, t in enumerate(train.targets) if t == c] for c in range(10)}
    base = [i for c in (0, 1, 2, 3, 4, 5) for i in by_class[c]]
    (tmp_path / "session_1.txt").write_text("\n".join(map(str, base)) + "\n")
    (tmp_path / "session_2.txt").write_text("\n".join(str(i) for c in (6, 7) for i in by_class[c][:5]))
    (tmp_path / "session_3.txt").write_text("\n".join(str(i) for c in (8, 9) for i in by_class[c][:5]))
    stream = stream_of(f"stream.index_dir={tmp_path}")
    assert stream.original_class_ids == list(range(10))  # order of appearance in the lists
    assert [len(c) for c in stream.classes_per_session] == [6, 2, 2]
    assert len(stream.train_data[0]) == len(base)
    assert Counter(stream.train_data[1].targets) == {6: 5, 7: 5}
    assert set(stream.benchmark.test_stream[2].dataset.targets) == set(range(10))


def test_index_list_errors(tmp_path):
    with pytest.raises(ConfigError, match="session_1.txt"):
        stream_of(f"stream.index_dir={tmp_path}")
    (tmp_path / "session_1.txt").write_text("0\n99999\n")
    with pytest.raises(ConfigError, match="99999"):
        stream_of(f"stream.index_dir={tmp_path}")
    (tmp_path / "session_1.txt").write_text("a/b/c.jpg\n")
    with pytest.raises(ConfigError, match="indexed by integers"):
        stream_of(f"stream.index_dir={tmp_path}")


def test_few_shot_plus_samples_the_base_session_too():
    """FSA's few-shot+: K shots per class in every session, the base one included."""
    stream = stream_of("stream.split=B4-Inc2", "stream.shots=3", "stream.base_shots=5")
    assert Counter(stream.train_data[0].targets) == {c: 5 for c in stream.classes_per_session[0]}
    assert Counter(stream.train_data[2].targets) == {c: 3 for c in stream.classes_per_session[2]}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stream.base_shots=5"], "stream.base_shots=5 needs stream.shots"),
        (["stream.shots=3", "stream.base_shots=500"], "stream.base_shots=500 but class"),
    ],
)
def test_bad_base_shots(overrides, message):
    with pytest.raises(ConfigError, match=message):
        stream_of("stream.split=B4-Inc2", *overrides)
