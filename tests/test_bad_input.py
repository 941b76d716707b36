"""Bad input a new user hits: one line naming the key, file or value, exit status 2, nothing trained or written."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from cil.cli import main
from cil.io import atomic_write
from cil.runs import RunFolder, load_run
from tests.helpers import CONFIGS


def run_cli(args, capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "override, message",
    [
        ("strategy.lr=inf", "strategy.lr=inf is not a finite number"),
        ("strategy.lr=-inf", "strategy.lr=-inf is not a finite number"),
        ("strategy.lr=nan", "strategy.lr=nan"),
        ("stream.mean=[0.5,inf,0.5]", "is not a finite number"),
        ("run.name=/etc/evil", "run.name='/etc/evil' is not a plain name"),
        ("run.name=../outside", "is not a plain name"),
        ("run.name=a/b", "is not a plain name"),
        ("stream.name=cifar11", "unknown stream 'cifar11' (did you mean cifar10, cifar100?); registered streams:"),
        ("strategy.name=fsaa", "registered strategies: avalanche, dkvb"),
    ],
)
def test_bad_values_stop_before_anything_runs(override, message, tmp_path, capsys):
    code, err = run_cli(["run", str(CONFIGS / "fsa" / "digits.yaml"), f"run.output_dir={tmp_path}", override], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not any(tmp_path.iterdir())  # no run folder


def test_bad_files_get_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategy: {name: fsa}\nstream: 5\n")
    code, err = run_cli(["run", str(bad)], capsys)
    assert code == 2 and "config group 'stream' must be a mapping of keys" in err and "not 5" in err
    code, err = run_cli(["run", str(tmp_path)], capsys)
    assert code == 2 and "is a folder; give a YAML file" in err
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    args = [
        "run",
        str(CONFIGS / "simplecil" / "digits.yaml"),
        f"backbone.weights={noise}",
        f"run.output_dir={tmp_path}",
    ]
    code, err = run_cli(args, capsys)
    assert code == 2 and f"backbone.weights file '{noise}' is not a torch state dict" in err
    assert "weights_only" not in err and len(err.splitlines()) == 1  # never advise unpickling untrusted files


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "summary.json", "{}")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        assert stat.S_IMODE(atomic_write(tmp_path / "private.json", "{}").stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_run_folders_of_the_same_second_do_not_collide(tmp_path):
    from cil.config import load_config

    cfg = load_config(CONFIGS / "simplecil" / "digits.yaml", [f"run.output_dir={tmp_path}"])
    path = RunFolder.new_path(cfg)
    first, second = RunFolder(path).create(cfg), RunFolder(path).create(cfg)  # both picked the same path
    assert first.path != second.path and first.path.is_dir() and second.path.is_dir()
    assert (second.path / "config.yaml").is_file() and second.checkpoints == second.path / "checkpoints"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--help"], None),
        (["list"], "strategies: avalanche, dkvb, finetune, fsa, joint, mamba_fscil, mos, simplecil, zscl"),
        (["run", str(CONFIGS / "simplecil" / "digits.yaml"), "strategy.lr=3"], "unknown key 'strategy.lr'"),
        (["run", str(CONFIGS / "fsa" / "digits.yaml"), "strategy.lr=-1"], "strategy.lr=-1"),
        (["run", str(CONFIGS / "fsa" / "digits.yaml"), "stream.name=cifar"], "unknown stream 'cifar'"),
        (["run", str(CONFIGS / "fsa" / "digits.yaml"), "strategy.name=fsaa"], "unknown strategy 'fsaa'"),
    ],
)
def test_help_list_and_config_errors_answer_without_loading_torch(argv, expected):
    """`cil --help`, `cil list` and one-line config errors import neither torch, Lightning nor timm (they used to
    take 7-11 s; now a fraction of a second)."""
    import subprocess
    import sys

    code = f"import sys\nfrom cil.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
    code += "print(sorted(m for m in ('torch', 'pytorch_lightning', 'timm', 'avalanche') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    if expected is not None:
        assert expected in out.stdout + out.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.strategy=ddp_bogus", "strategy=ddp_bogus, devices=1): You selected an invalid strategy name"),
        ("trainer.accelerator=gpu", "trainer (accelerator=gpu"),
        ("run.seed=4294967296", "run.seed=4294967296 is out of range; it must be <= 4294967295"),
    ],
)
def test_settings_for_other_libraries_are_checked_up_front(override, message, tmp_path, capsys):
    if "gpu" in override:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    code, err = run_cli(["run", str(CONFIGS / "fsa" / "digits.yaml"), f"run.output_dir={tmp_path}", override], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


def test_an_output_folder_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "runs"
    target.write_text("not a folder")
    code, err = run_cli(["run", str(CONFIGS / "fsa" / "digits.yaml"), f"run.output_dir={target}"], capsys)
    assert code == 2 and f"run.output_dir='{target}' is a file, not a folder" in err


@pytest.mark.slow
def test_seeds_run_one_after_another_and_report_groups_them(tmp_path, capsys):
    args = ["run", str(CONFIGS / "simplecil" / "digits.yaml"), f"run.output_dir={tmp_path}", "backbone.image_size=16"]
    assert main([*args, "stream.split=B6-Inc4", "--seeds", "0", "1"]) == 0
    folders = sorted((tmp_path / "simplecil-digits").iterdir())
    assert len(folders) == 2
    assert main(["report", *map(str, folders)]) == 0
    out = capsys.readouterr().out
    assert "mean ± std over seeds" in out and "[0, 1]" in out


@pytest.mark.parametrize(
    "loggers, message",
    [
        (
            "[csv,bogus]",
            "trainer.loggers: unknown logger 'bogus'; choose from ['csv', 'mlflow', 'tensorboard', 'wandb']",
        ),
        ("[mlflow]", "trainer.loggers: mlflow needs the mlflow package (pip install mlflow)"),
    ],
)
def test_loggers_are_checked_before_running(loggers, message, tmp_path, capsys):
    import importlib.util

    if "mlflow" in loggers and importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    args = ["run", str(CONFIGS / "fsa" / "digits.yaml"), f"run.output_dir={tmp_path}", f"trainer.loggers={loggers}"]
    code, err = run_cli(args, capsys)
    assert code == 2 and message in err and not any(tmp_path.iterdir())


def test_the_configured_loggers_are_the_ones_that_write(tmp_path):
    from cil.session import run_experiment
    from tests.helpers import tiny_config

    cfg = tiny_config("finetune", tmp_path, "trainer.loggers=[csv]", "strategy.epochs=1", "stream.split=B8-Inc2")
    run = run_experiment(cfg)
    assert (run / "logs" / "csv").is_dir() and not (run / "logs" / "tb").exists()


def test_a_truncated_cifar_pickle_is_one_line_before_training(tmp_path, capsys):
    from tests.writers import write_cifar100

    write_cifar100(tmp_path / "data", per_class_train=2, per_class_test=1)
    train = tmp_path / "data" / "cifar-100-python" / "train"
    train.write_bytes(train.read_bytes()[:2000])
    args = [
        "run",
        str(CONFIGS / "simplecil" / "digits.yaml"),
        "stream.name=cifar100",
        f"stream.data_root={tmp_path / 'data'}",
    ]
    args += ["stream.verify_checksums=false", f"run.output_dir={tmp_path / 'runs'}"]
    code, err = run_cli(args, capsys)
    assert code == 2 and "is not a readable CIFAR pickle (UnpicklingError" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_a_cifar_pickle_with_a_payload_is_one_line_and_never_runs(tmp_path, capsys):
    """``cil run`` on a CIFAR copy whose batch was crafted to run code (checksums off): exit 2, one line naming
    the file, nothing run, no run folder."""
    import pickle

    from tests.helpers import Payload
    from tests.writers import write_cifar100

    write_cifar100(tmp_path / "data", per_class_train=2, per_class_test=1)
    test = tmp_path / "data" / "cifar-100-python" / "test"
    test.write_bytes(pickle.dumps({**pickle.loads(test.read_bytes()), "x": Payload(tmp_path / "ran")}))
    args = ["run", str(CONFIGS / "simplecil" / "digits.yaml"), "stream.name=cifar100"]
    args += [f"stream.data_root={tmp_path / 'data'}", "stream.verify_checksums=false"]
    code, err = run_cli([*args, f"run.output_dir={tmp_path / 'runs'}"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and f"{test} is refused: it names posix.system" in err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "runs").exists()


def _folder_stream_with_bad_files(root, kind: str, monkeypatch=None):
    """Two bad files among good ones: a JPEG cut short, a web page saved under an image name, or a decompression
    bomb (here: over PIL's pixel limit, lowered for the test); the training one's name holds a newline."""
    from PIL import Image

    from tests.writers import write_image_folders

    write_image_folders(root, ["a", "b", "c", "d"], train=3, test=2)  # 20x20 images
    (root / "train" / "b" / "b_1.jpg").rename(root / "train" / "b" / "b_1\nmore.jpg")  # a name with a newline
    bad = [root / "train" / "b" / "b_1\nmore.jpg", root / "test" / "c" / "c_t0.jpg"]
    for path in bad:
        if kind == "truncated":
            path.write_bytes(path.read_bytes()[:200])  # a JPEG cut short (a crawl interrupted mid-file)
        elif kind == "bomb":
            Image.new("RGB", (64, 64)).save(path, format="JPEG")  # 4096 pixels: over twice the limit set below
        else:
            path.write_text("<html>404 not found</html>")  # a web page saved under an image name
    if kind == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the good images (400 pixels) stay under it
    return bad


FOLDER_RUN = ["stream.name=imagenet_r", "stream.split=B0-Inc2", "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize("kind", ["truncated", "not-an-image", "bomb"])
@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_mid_run_stops_with_one_line_naming_it(tmp_path, capsys, monkeypatch, kind, workers):
    bad = _folder_stream_with_bad_files(tmp_path / "data", kind, monkeypatch)
    args = ["run", str(CONFIGS / "simplecil" / "digits.yaml"), f"stream.data_root={tmp_path / 'data'}", *FOLDER_RUN]
    args += [f"run.output_dir={tmp_path / 'runs'}", f"stream.num_workers={workers}", "backbone.image_size=16"]
    code, err = run_cli(args, capsys)
    assert code == 1 and len(err.splitlines()) == 1, err  # a DataError: bad data, not a bad config
    from cil.errors import printable

    assert any(f"cannot read {printable(path)} (" in err for path in bad) and "stream.skip_unreadable=true" in err
    # the half-made run folder is skipped by cil report, with a note, not an abort
    runs = list((tmp_path / "runs").glob("*/*"))
    assert len(runs) == 1
    code, err = run_cli(["report", str(runs[0]), str(runs[0])], capsys)
    assert code == 2 and "no run folder with results" in err


@pytest.mark.parametrize("kind", ["truncated", "bomb"])
def test_skip_unreadable_skips_and_counts_the_files(tmp_path, capsys, monkeypatch, kind):
    import json

    bad = _folder_stream_with_bad_files(tmp_path / "data", kind, monkeypatch)
    args = ["run", str(CONFIGS / "simplecil" / "digits.yaml"), f"stream.data_root={tmp_path / 'data'}", *FOLDER_RUN]
    args += [f"run.output_dir={tmp_path / 'runs'}", "stream.skip_unreadable=true", "backbone.image_size=16"]
    assert main(args) == 0
    out = capsys.readouterr().out
    (run,) = list((tmp_path / "runs").glob("*/*"))
    listed = [json.loads(line)["path"] for line in (run / "skipped_files.jsonl").read_text().splitlines()]
    assert sorted(set(listed)) == sorted(map(str, bad))  # the name with a newline too, whole
    assert "session 2: 2 unreadable file(s) skipped so far" in out
    result = load_run(run)
    assert result.summary["complete"] and np.isfinite(result.accuracy_matrix.to_numpy()).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ("{drop_rate: 2.0}", "dropout probability has to be between 0 and 1, but got 2.0"),  # ValueError
        ("{in_chans: -3}", "negative dimension -3"),  # RuntimeError
        ("{depth: abc}", "unsupported operand"),  # TypeError
    ],
)
def test_backbone_kwargs_a_layer_refuses_are_one_line(tmp_path, capsys, kwargs, message):
    args = ["run", str(CONFIGS / "simplecil" / "digits.yaml"), "backbone.name=vit_tiny_patch16_224"]
    args += [f"backbone.kwargs={kwargs}", "backbone.image_size=16", f"run.output_dir={tmp_path}"]
    code, err = run_cli(args, capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "backbone.kwargs" in err and "vit_tiny_patch16_224" in err and message in err


@pytest.mark.parametrize("empty", [[7], list(range(90, 100))], ids=["a class", "ten classes"])
def test_classes_without_test_images_are_refused_before_training(tmp_path, capsys, empty):
    """A class (or many) with training images but no test images would be left out of every accuracy without a
    word: refused before training, one line naming the classes."""
    import pickle

    from tests.writers import write_cifar100

    write_cifar100(tmp_path / "data", per_class_train=2, per_class_test=1)
    test = tmp_path / "data" / "cifar-100-python" / "test"
    batch = pickle.loads(test.read_bytes())
    keep = [i for i, y in enumerate(batch["fine_labels"]) if y not in empty]
    batch = {"data": batch["data"][keep], "fine_labels": [batch["fine_labels"][i] for i in keep]}
    test.write_bytes(pickle.dumps(batch))
    args = ["run", str(CONFIGS / "simplecil" / "digits.yaml"), "stream.name=cifar100", "stream.split=B50-Inc10"]
    args += [f"stream.data_root={tmp_path / 'data'}", "stream.verify_checksums=false", "backbone.image_size=16"]
    code, err = run_cli([*args, f"run.output_dir={tmp_path / 'runs'}"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"stream cifar100: {len(empty)} of 100 classes have no test images: " in err
    assert all(f"{c} (class{c:02d})" in err for c in empty[:9]) and "(class06)" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "text, where",
    [
        ("run:\n  seed: 1\n  seed: 2\n", "line 4, column 3: found duplicate key seed"),
        ("run:\n\tseed: 1\n", "line 3, column 1: found character that cannot start any token"),
    ],
    ids=["duplicate key", "tab"],
)
def test_a_yaml_mistake_names_its_line_and_column(tmp_path, capsys, text, where):
    (tmp_path / "my.yaml").write_text("extends: simplecil/digits\n" + text)
    code, err = run_cli(["run", str(tmp_path / "my.yaml")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and f"is not valid YAML: {where}" in err, err


def test_a_malformed_list_override_is_one_line_naming_it(capsys):
    code, err = run_cli(["run", "simplecil/digits", "run.seed=1", "stream.class_order=[1,2"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("cil: error: override 'stream.class_order=[1,2' cannot be parsed: line 2, column 1")


def test_a_huge_value_is_not_echoed_whole(capsys):
    code, err = run_cli(["run", "simplecil/digits", "strategy.metric=" + "x" * 100_000], capsys)
    assert code == 2 and len(err) < 300 and "strategy.metric='xxxxxxxx" in err and "(100002 characters)" in err


def test_a_run_name_longer_than_a_folder_name_may_be_is_refused_up_front(tmp_path, capsys):
    code, err = run_cli(["run", "simplecil/digits", "run.name=" + "n" * 300, f"run.output_dir={tmp_path}"], capsys)
    assert code == 2 and "run.name is 300 bytes long; a folder name may have at most 255" in err
    assert len(err) < 300 and not any(tmp_path.iterdir())


def test_a_config_read_through_a_pipe_loads_as_the_file_does(tmp_path):
    """``cil run <(sed ... my.yaml)``: the shell passes /dev/fd/N, a pipe, not a regular file."""
    import threading

    from cil.config import load_config

    text = "extends: simplecil/digits\nrun:\n  seed: 3\n"
    (tmp_path / "my.yaml").write_text(text)
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_text, args=(text,))
    writer.start()
    piped = load_config(fifo)
    writer.join()
    assert piped == load_config(tmp_path / "my.yaml") and piped.run.seed == 3


@pytest.mark.parametrize("test_size", ["0.999", "0.001"])
def test_a_test_size_that_leaves_a_side_without_every_class_is_refused_up_front(tmp_path, capsys, test_size):
    code, err = run_cli(
        ["run", "simplecil/digits", f"stream.test_size={test_size}", f"run.output_dir={tmp_path}"], capsys
    )
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"stream.test_size={test_size} leaves " in err and "at least one per class (10)" in err
    assert not any(tmp_path.iterdir())


def test_a_cache_folder_that_cannot_be_created_is_one_line_before_any_work(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")  # a file where the cache's parent folder should be: no user can mkdir it
    args = ["run", "dkvb/digits", f"strategy.feature_cache={tmp_path / 'a-file' / 'cache'}"]
    code, err = run_cli([*args, f"run.output_dir={tmp_path / 'runs'}"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert (
        f"strategy.feature_cache='{tmp_path / 'a-file' / 'cache'}' cannot be created or written (Not a directory)"
        in err
    )
    assert not (tmp_path / "runs").exists()


def test_an_input_size_whose_first_batch_cannot_fit_is_one_line_before_the_model_is_built(tmp_path, capsys):
    code, err = run_cli(["run", "simplecil/digits", "backbone.image_size=100000", f"run.output_dir={tmp_path}"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "backbone.image_size=100000: one batch of 256 inputs alone takes" in err and "GiB of memory available" in err


def test_a_missing_data_root_is_said_before_weights_are_downloaded(tmp_path, capsys, monkeypatch):
    import timm

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("the model was built first"))
    args = ["run", "simplecil/digits", "stream.name=cifar100", f"stream.data_root={tmp_path / 'nowhere'}"]
    code, err = run_cli([*args, "backbone.pretrained=true", f"run.output_dir={tmp_path}"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"cil: error: stream.data_root='{tmp_path / 'nowhere'}'") and "cifar-100-python" in err


def test_a_failed_weights_download_is_one_line_saying_how_to_give_them_locally(monkeypatch):
    import timm
    from huggingface_hub.errors import LocalEntryNotFoundError

    from cil.backbones import create_backbone
    from cil.config import ConfigError

    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise LocalEntryNotFoundError(
                "Cannot find the requested files in the disk cache and outgoing traffic has been disabled."
            )
        raise AssertionError("not reached")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ConfigError) as caught:
        create_backbone("resnet10t", pretrained=True)
    message = str(caught.value)
    assert message.startswith("backbone.pretrained=true: timm's weights of 'resnet10t' could not be downloaded")
    assert "backbone.weights=FILE" in message and "HF_HOME" in message and len(message.splitlines()) == 1


def test_without_network_a_weights_download_fails_at_once_instead_of_retrying_for_45_seconds(monkeypatch):
    """huggingface_hub retries each file five times with back-off; one refused connection is enough to know."""
    import socket
    import time

    import timm

    from cil.backbones import create_backbone
    from cil.config import ConfigError

    def refused(*args, **kwargs):
        raise OSError("[Errno 101] Network is unreachable")

    def no_download(*args, pretrained=False, **kwargs):
        raise AssertionError("timm was asked to download") if pretrained else None

    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setattr(timm, "create_model", no_download)
    start = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        create_backbone("resnet10t", pretrained=True)
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert "huggingface.co unreachable: [Errno 101] Network is unreachable" in message, message
    assert "not in the Hugging Face cache" in message and "backbone.weights=FILE" in message
    assert len(message.splitlines()) == 1


def test_without_network_weights_in_the_hugging_face_cache_are_loaded_from_it(tmp_path):
    """The offline fallback: the cached file is loaded (its values, not timm's initialisation), with no retries."""
    import subprocess
    import sys

    script = f"""
import socket, time, timm, torch
from safetensors.torch import save_file
snapshot = {str(tmp_path)!r} + "/models--timm--resnet10t.c3_in1k/snapshots/0123"
import os; os.makedirs(snapshot); os.makedirs({str(tmp_path)!r} + "/models--timm--resnet10t.c3_in1k/refs")
open({str(tmp_path)!r} + "/models--timm--resnet10t.c3_in1k/refs/main", "w").write("0123")
torch.manual_seed(5)
state = {{k: v.contiguous() for k, v in timm.create_model("resnet10t").state_dict().items()}}
save_file(state, snapshot + "/model.safetensors")
def refused(*a, **k): raise OSError("unreachable")
socket.create_connection = refused
from cil.backbones import create_backbone
start = time.monotonic()
model = create_backbone("resnet10t", pretrained=True)
assert time.monotonic() - start < 10
assert torch.equal(model.conv1[0].weight, state["conv1.0.weight"])
from huggingface_hub import constants; assert not constants.HF_HUB_OFFLINE  # restored
print("ok")
"""
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
