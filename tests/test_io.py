"""cil.io: atomic, synced writes and the restricted unpickler for data formats that are pickles."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from cil.io import UnsafePickle, atomic_write, safe_unpickle
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


def test_an_atomic_write_is_synced_file_then_folder(tmp_path, monkeypatch):
    """Databases' rule: the file's bytes reach the disk before its new name does, and the name (the folder's
    entry) before the write is called done; a crash then keeps the old file or the new one."""
    import os

    import cil.io

    synced = []
    real = os.fsync
    monkeypatch.setattr(cil.io.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    atomic_write(tmp_path / "a.json", "{}")
    assert len(synced) == 2 and synced[1] == str(tmp_path)  # the temporary file, then the folder
    assert os.path.dirname(synced[0]) == str(tmp_path) and (tmp_path / "a.json").read_text() == "{}"


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:664] file write failed"),
    ],
    ids=["OSError", "torch.save"],
)
def test_a_full_disk_is_one_line_and_the_previous_file_stays(tmp_path, failure):
    from cil.errors import DataError

    atomic_write(tmp_path / "session_0.ckpt", b"the previous checkpoint")

    def full(path):
        path.write_bytes(b"half")
        raise failure

    with pytest.raises(DataError) as caught:
        atomic_write(tmp_path / "session_0.ckpt", full)
    message = str(caught.value)
    assert message.startswith(f"cannot write {tmp_path / 'session_0.ckpt'}: no space left on the device of {tmp_path}")
    assert "free space there and resume" in message and len(message.splitlines()) == 1
    assert (tmp_path / "session_0.ckpt").read_bytes() == b"the previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["session_0.ckpt"]  # no temporary file left behind


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "a.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_text() == "new"


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.ckpt"
    atomic_write(path, "old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]
