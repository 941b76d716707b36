"""Real data sets through their real loaders, on tiny files written in each real on-disk format."""

from __future__ import annotations

import pytest

from cil.config import ConfigError
from tests.helpers import stream_of
from tests.writers import (
    write_aircraft,
    write_cars,
    write_cifar10,
    write_cifar100,
    write_image_folders,
    write_miniimagenet,
    write_svhn,
    write_tinyimagenet,
)


def test_cifar100_real_format(tmp_path):
    write_cifar100(tmp_path)
    stream = stream_of("cifar100", tmp_path, "stream.split=B50-Inc10", "stream.verify_checksums=false")
    assert [len(c) for c in stream.classes_per_session] == [50, 10, 10, 10, 10, 10]
    assert len(stream.train_data[0]) == 100 and len(stream.eval_data[1]) == 10
    assert stream.class_names[0] == f"class{stream.original_class_ids[0]:02d}"
    x, y = stream.train_data[0][0][:2]
    assert tuple(x.shape) == (3, 16, 16)


def test_cifar100_checksums_are_verified_by_default(tmp_path):
    write_cifar100(tmp_path)
    with pytest.raises(ConfigError, match="verify_checksums=false"):
        stream_of("cifar100", tmp_path, "stream.split=B50-Inc10")


def test_cifar100_missing_files_show_layout(tmp_path):
    (tmp_path / "cifar-100-python").mkdir()
    with pytest.raises(ConfigError, match=r"lacks \['meta', 'train', 'test'\].*cifar-100-python/\{meta,train,test\}"):
        stream_of("cifar100", tmp_path)


@pytest.mark.parametrize("name", ["cifar100", "cifar10"])
def test_the_safe_cifar_reader_reads_what_torchvision_reads(tmp_path, monkeypatch, name):
    """Same images, targets and class names as torchvision's own reader (its md5 check off: the files are ours)."""
    import pickle

    import numpy as np
    from torchvision.datasets import CIFAR10, CIFAR100

    from cil.streams.vision import SafeCIFAR10, SafeCIFAR100

    (write_cifar100 if name == "cifar100" else write_cifar10)(tmp_path)
    # the real files are Python 2 pickles of str keys: write one batch that way too (latin1-decoded on reading)
    tv, safe = (CIFAR100, SafeCIFAR100) if name == "cifar100" else (CIFAR10, SafeCIFAR10)
    batch = tmp_path / tv.base_folder / tv.test_list[0][0]
    batch.write_bytes(pickle.dumps(pickle.loads(batch.read_bytes()), protocol=2))
    import torchvision.datasets.cifar

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    unchecked = tv
    for train in (True, False):
        ours, theirs = safe(str(tmp_path), train, verify_checksums=False), unchecked(str(tmp_path), train=train)
        np.testing.assert_array_equal(ours.data, theirs.data)
        assert ours.targets == theirs.targets and ours.classes == theirs.classes and len(ours) == len(theirs)
        assert ours.class_to_idx == theirs.class_to_idx
        x, y = ours[3]
        assert list(x.getdata()) == list(theirs[3][0].getdata()) and y == theirs[3][1]


@pytest.mark.parametrize("name, file", [("cifar100", "train"), ("cifar100", "meta"), ("cifar10", "data_batch_3")])
def test_a_tampered_cifar_pickle_is_refused_before_it_runs(tmp_path, name, file):
    """Without checksums, a batch carrying a pickled payload is refused with one line naming the file; the payload
    never runs."""
    import pickle

    from tests.helpers import Payload

    (write_cifar100 if name == "cifar100" else write_cifar10)(tmp_path)
    folder = tmp_path / ("cifar-100-python" if name == "cifar100" else "cifar-10-batches-py")
    entry = pickle.loads((folder / file).read_bytes())
    entry["extra"] = Payload(tmp_path / "ran")
    (folder / file).write_bytes(pickle.dumps(entry))
    with pytest.raises(ConfigError) as caught:
        stream_of(name, tmp_path, "stream.verify_checksums=false")
    message = str(caught.value)
    assert message == (
        f"{folder / file} is refused: it names posix.system, which a data file has no reason to hold (CIFAR's "
        "batches hold only dicts, lists, strings and arrays)"
    )
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("name", ["imagenet_r", "cub200", "imagenet_a", "objectnet", "omnibenchmark", "vtab"])
def test_image_folder_layout(tmp_path, name):
    classes = ["001.albatross", "002.auklet", "003.blackbird", "004.bunting"]
    write_image_folders(tmp_path, classes)
    stream = stream_of(name, tmp_path, "stream.split=B0-Inc2", "stream.shuffle_classes=false")
    assert stream.class_names == classes
    assert [len(d) for d in stream.train_data] == [6, 6] and stream.eval_counts() == [4, 4]
    assert tuple(stream.eval_data[1][0][0].shape) == (3, 16, 16)


def test_image_folder_malformed_root_shows_layout(tmp_path):
    write_image_folders(tmp_path, ["a", "b"])
    import shutil

    shutil.rmtree(tmp_path / "test")
    with pytest.raises(ConfigError, match=r"no class folders in test/.*<root>/train/<class>/<image>"):
        stream_of("imagenet_r", tmp_path, "stream.split=B0-Inc1")


def test_cub_index_lists_by_file_name(tmp_path):
    classes = ["001.albatross", "002.auklet", "003.blackbird", "004.bunting"]
    write_image_folders(tmp_path / "data", classes)
    lists = tmp_path / "index_list"
    lists.mkdir()
    base = [f"CUB_200_2011/images/{c}/{c}_{i}.jpg" for c in classes[:2] for i in range(3)]
    (lists / "session_1.txt").write_text("\n".join(base))
    (lists / "session_2.txt").write_text("\n".join(f"CUB_200_2011/images/{c}/{c}_0.jpg" for c in classes[2:]))
    stream = stream_of("cub200", tmp_path / "data", f"stream.index_dir={lists}")
    assert stream.class_names == classes
    assert [len(d) for d in stream.train_data] == [6, 2]
    assert set(stream.benchmark.test_stream[1].dataset.targets) == {0, 1, 2, 3}


def test_miniimagenet_fscil_layout_with_index_lists(tmp_path):
    wnids = ["n01532829", "n01558993", "n01704323", "n01749939", "n01770081", "n01843383"]
    write_miniimagenet(tmp_path / "miniimagenet", wnids)
    lists = tmp_path / "lists"
    lists.mkdir()
    base = [f"MINI-ImageNet/train/{w}/{w}train{i:08d}.jpg" for w in wnids[:4] for i in range(3)]
    (lists / "session_1.txt").write_text("\n".join(base))
    (lists / "session_2.txt").write_text("\n".join(f"MINI-ImageNet/train/{w}/{w}train00000001.jpg" for w in wnids[4:]))
    stream = stream_of("miniimagenet", tmp_path, f"stream.index_dir={lists}")  # <root>/miniimagenet/ accepted
    assert stream.class_names == wnids
    assert [len(c) for c in stream.classes_per_session] == [4, 2]
    assert [len(d) for d in stream.train_data] == [12, 2] and stream.eval_counts() == [8, 4]


def test_miniimagenet_missing_split_shows_layout(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ConfigError, match=r"split/train.csv.*filename,label"):
        stream_of("miniimagenet", tmp_path)


def test_svhn_real_format(tmp_path):
    write_svhn(tmp_path)
    stream = stream_of("svhn", tmp_path, "stream.split=B2-Inc2", "stream.verify_checksums=false")
    assert [len(c) for c in stream.classes_per_session] == [2, 2, 2, 2, 2]
    assert sorted(stream.original_class_ids) == list(range(10))  # label 10 became digit 0
    assert len(stream.train_data[0]) == 6
    with pytest.raises(ConfigError, match="could not read stream.data_root.*train_32x32.mat"):
        stream_of("svhn", tmp_path)  # the md5 of these tiny files is not the real one


def test_fgvc_aircraft_real_format(tmp_path):
    variants = ["707-320", "727-200", "A300B4", "Cessna 172"]  # names may contain spaces
    write_aircraft(tmp_path, variants)
    stream = stream_of("fgvc_aircraft", tmp_path, "stream.split=B2-Inc1", "stream.shuffle_classes=false")
    assert stream.class_names == variants
    assert [len(d) for d in stream.train_data] == [6, 3, 3]
    assert tuple(stream.train_data[0][0][0].shape) == (3, 16, 16)


def test_stanford_cars_real_format(tmp_path):
    classes = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
    write_cars(tmp_path, classes)
    stream = stream_of("stanford_cars", tmp_path, "stream.split=B1-Inc1", "stream.shuffle_classes=false")
    assert stream.class_names == classes
    assert [len(d) for d in stream.train_data] == [3, 3, 3]
    assert len(stream.eval_data[2]) == 2


@pytest.mark.parametrize("name", ["svhn", "fgvc_aircraft", "stanford_cars"])
def test_torchvision_streams_show_the_layout_when_files_are_missing(tmp_path, name):
    with pytest.raises(ConfigError, match="expected layout"):
        stream_of(name, tmp_path)


def test_tinyimagenet_real_layout_with_wnids_order_and_names(tmp_path):
    write_tinyimagenet(tmp_path, ["n02124075", "n04067472", "n09999999"])  # the last has no name in the table
    stream = stream_of("tinyimagenet", tmp_path, "stream.split=B1-Inc1", "stream.shuffle_classes=false")
    assert stream.class_names == ["Egyptian Mau", "fishing casting reel", "n09999999"]
    assert [len(d) for d in stream.train_data] == [3, 3, 3] and [len(d) for d in stream.eval_data] == [2, 2, 2]
    assert tuple(stream.train_data[0][0][0].shape) == (3, 16, 16)


def test_cifar10_real_format(tmp_path):
    write_cifar10(tmp_path)
    stream = stream_of("cifar10", tmp_path, "stream.verify_checksums=false", "stream.shuffle_classes=false")
    assert stream.class_names[:3] == ["airplane", "automobile", "bird"]
    assert [len(d) for d in stream.train_data] == [6] * 5 and [len(d) for d in stream.eval_data] == [4] * 5
    with pytest.raises(ConfigError, match="could not read|verify_checksums"):
        stream_of("cifar10", tmp_path)  # the md5 of these tiny files is not the real one


@pytest.mark.parametrize("where", ["data root", "class folder"])
def test_a_folder_this_user_may_not_read_is_one_line_saying_so(tmp_path, monkeypatch, where):
    """Permission denied, as the OS reports it for a folder of another user (simulated: the tests run as root, whom
    no permission stops), is named as such, not as an empty class ("no valid file") or a traceback."""
    import os

    write_image_folders(tmp_path, ["a", "b"], train=2, test=1)
    denied = tmp_path if where == "data root" else tmp_path / "train" / "b"
    scandir = os.scandir

    def guarded(path="."):
        if os.fspath(path) == str(denied):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", guarded)
    with pytest.raises(ConfigError, match=rf"permission denied: '{denied}' cannot be read"):
        stream_of("imagenet_r", tmp_path, "stream.split=B0-Inc2")
