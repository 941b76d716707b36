"""cil.io: the restricted unpickler for data formats that are pickles (atomic writes are tested with the runs)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from cil.io import UnsafePickle, safe_unpickle
from tests.helpers import Payload


def test_plain_containers_and_numpy_arrays_load_as_pickle_loads_them(tmp_path):
    batch = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), b"labels": [1, 2, 3], "names": ("a", b"b", 1.5)}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"batch{protocol}"
        path.write_bytes(pickle.dumps(batch, protocol=protocol))
        got, want = safe_unpickle(path), pickle.loads(path.read_bytes())
        assert got.keys() == want.keys() and got[b"labels"] == [1, 2, 3] and got["names"] == ("a", b"b", 1.5)
        np.testing.assert_array_equal(got[b"data"], want[b"data"])


@pytest.mark.parametrize("where", ["top", "inside a dict", "inside an object array"])
def test_a_payload_is_refused_before_it_runs(tmp_path, where):
    marker = tmp_path / "ran"
    payload = Payload(marker)
    obj = {
        "top": payload,
        "inside a dict": {"data": np.zeros(3), "labels": [payload]},
        "inside an object array": {"data": np.array([payload, 1], dtype=object)},
    }[where]
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(UnsafePickle, match=r"posix\.system|os\.system"):
        safe_unpickle(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the file really is an attack: an unrestricted load runs it
    assert marker.exists()
