"""Every bad input gets one clear line on stderr and exit code 2, before any data is loaded."""

from __future__ import annotations

import subprocess

import pytest
import torch
from omegaconf import OmegaConf

from cil.cli import main
from cil.config import ConfigError, load_config
from tests.helpers import CONFIGS, ROOT, cil_command

SIMPLECIL = str(CONFIGS / "simplecil" / "digits.yaml")


def fails(capsys, *argv: str) -> str:
    """Run the CLI, expect exit code 2 and exactly one line on stderr; return it."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("cil: error: ")
    return err[0]


def test_unknown_key_names_it_and_the_closest(capsys):
    msg = fails(capsys, "run", SIMPLECIL, "stream.nme=x")
    assert "unknown key 'stream.nme'" in msg and "stream.name" in msg


def test_unknown_group(capsys):
    msg = fails(capsys, "run", SIMPLECIL, "trainr.devices=1")
    assert "'trainr'" in msg and "trainer" in msg


def test_unknown_strategy_key(capsys):
    msg = fails(capsys, "run", SIMPLECIL, "strategy.metrc=cosine")
    assert "strategy.metrc" in msg and "strategy.metric" in msg


def test_wrong_type(capsys):
    msg = fails(capsys, "run", SIMPLECIL, "run.seed=abc")
    assert "run.seed" in msg and "abc" in msg and "Integer" in msg


def test_out_of_range(capsys):
    msg = fails(capsys, "run", SIMPLECIL, "stream.batch_size=0")
    assert "stream.batch_size=0" in msg and ">= 1" in msg


def test_open_interval(capsys):
    msg = fails(capsys, "run", SIMPLECIL, "stream.test_size=1.0")
    assert "stream.test_size=1.0" in msg and "< 1.0" in msg


def test_bad_choice(capsys):
    msg = fails(capsys, "run", SIMPLECIL, "strategy.metric=manhattan")
    assert "strategy.metric='manhattan'" in msg and "cosine" in msg and "euclidean" in msg


def test_bad_split_form(capsys):
    msg = fails(capsys, "run", SIMPLECIL, "stream.split=10x2")
    assert "stream.split='10x2'" in msg and "B0-Inc10" in msg


def test_split_that_does_not_divide(capsys):
    msg = fails(capsys, "run", SIMPLECIL, "stream.split=B0-Inc3")
    assert "stream.split='B0-Inc3'" in msg and "10 classes" in msg


def test_bad_devices(capsys):
    msg = fails(capsys, "run", SIMPLECIL, "trainer.devices=0")
    assert "trainer.devices=0" in msg and "auto" in msg


def test_unknown_strategy_lists_registered(capsys):
    msg = fails(capsys, "run", SIMPLECIL, "strategy.name=simplcil")
    assert "unknown strategy 'simplcil'" in msg
    assert all(name in msg for name in ("finetune", "joint", "simplecil"))


def test_unknown_stream_lists_registered(capsys):
    msg = fails(capsys, "run", SIMPLECIL, "stream.name=cifar1000")
    assert "unknown stream 'cifar1000'" in msg and "cifar100" in msg and "digits" in msg


def test_unknown_backbone_lists_close_timm_names(capsys):
    msg = fails(capsys, "run", SIMPLECIL, "backbone.name=resnet10")
    assert "unknown backbone 'resnet10'" in msg and "resnet10t" in msg


def test_missing_config_file(capsys, tmp_path):
    msg = fails(capsys, "run", str(tmp_path / "nope.yaml"))
    assert "nope.yaml" in msg and "not found" in msg


def test_missing_weights_file(capsys, tmp_path):
    msg = fails(capsys, "run", SIMPLECIL, f"backbone.weights={tmp_path}/w.pth", f"run.output_dir={tmp_path}")
    assert "w.pth" in msg and "not found" in msg
    assert not (tmp_path / "simplecil-digits").exists()  # nothing started


def test_mismatched_weights_file_names_missing_keys(capsys, tmp_path):
    import timm

    state = timm.create_model("resnet10t", num_classes=0).state_dict()
    state.pop("layer4.0.conv1.weight")
    torch.save(state, tmp_path / "w.pth")
    msg = fails(capsys, "run", SIMPLECIL, f"backbone.weights={tmp_path}/w.pth", f"run.output_dir={tmp_path}")
    assert "w.pth" in msg and "missing keys" in msg and "layer4.0.conv1.weight" in msg


def test_missing_data_root_shows_layout(capsys, tmp_path):
    msg = fails(capsys, "run", SIMPLECIL, "stream.name=cifar100", f"stream.data_root={tmp_path}/none")
    assert "stream.data_root" in msg and "cifar-100-python" in msg


def test_class_order_must_be_a_permutation(capsys):
    msg = fails(capsys, "run", SIMPLECIL, "stream.class_order=[0,1,2]")
    assert "stream.class_order" in msg and "permutation" in msg


def test_override_without_equals(capsys):
    msg = fails(capsys, "run", SIMPLECIL, "run.seed")
    assert "run.seed" in msg and "key=value" in msg


def test_resume_of_a_non_run_folder(capsys, tmp_path):
    msg = fails(capsys, "run", "--resume", str(tmp_path))
    assert str(tmp_path) in msg and "config.yaml" in msg


def test_console_script_prints_no_traceback():
    """The real entry point: one line, exit code 2, no traceback."""
    cmd = cil_command()
    out = subprocess.run([*cmd, "run", SIMPLECIL, "run.sed=1"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "run.seed" in out.stderr


def test_extends_merges_parent_then_child(tmp_path):
    (tmp_path / "base.yaml").write_text("stream: {batch_size: 7, split: B0-Inc5}\nstrategy: {name: finetune}\n")
    (tmp_path / "paper.yaml").write_text("extends: base.yaml\nstream: {batch_size: 9}\nstrategy: {lr: 0.5}\n")
    cfg = load_config(tmp_path / "paper.yaml", ["strategy.epochs=3"])
    assert cfg.stream.batch_size == 9 and cfg.stream.split == "B0-Inc5"
    assert cfg.strategy.lr == 0.5 and cfg.strategy.epochs == 3 and cfg.strategy.name == "finetune"


def test_extends_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")


def test_resolved_config_round_trips(tmp_path):
    from cil.config import to_yaml

    cfg = load_config(SIMPLECIL, ["run.seed=3"])
    assert cfg.run.name == "simplecil-digits" and cfg.stream.seed == 3  # interpolations resolved
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    again = load_config(tmp_path / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


def test_every_shipped_config_validates():
    paths = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "base")  # base files set no strategy
    assert paths
    for path in paths:
        assert load_config(path).strategy.name == path.parent.name


def test_packaged_config_by_name_from_any_folder(tmp_path, monkeypatch):
    """``simplecil/digits`` is the packaged configs/simplecil/digits.yaml, whatever the working folder; a user's
    own file extends a packaged base by name; cil list names the packaged configs."""
    monkeypatch.chdir(tmp_path)
    by_name = load_config("simplecil/digits")
    by_path = load_config(CONFIGS / "simplecil" / "digits.yaml")
    assert OmegaConf.to_container(by_name) == OmegaConf.to_container(by_path)
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: fsa/digits.yaml\nstrategy:\n  epochs: 3\n")
    cfg = load_config(mine)
    assert cfg.strategy.name == "fsa" and cfg.strategy.epochs == 3
    assert cfg.stream.name == load_config("fsa/digits").stream.name == "digits"


def test_unknown_packaged_config_names_the_closest(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = fails(capsys, "run", "simplecil/digit")
    assert "no packaged config is named 'simplecil/digit'" in msg and "simplecil/digits" in msg


def test_cil_list_names_every_packaged_config(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    listed = {line.strip() for line in out if line.startswith("  ")}
    on_disk = {f"{p.parent.name}/{p.stem}" for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "base"}
    assert listed == on_disk and "fsa/digits" in listed
