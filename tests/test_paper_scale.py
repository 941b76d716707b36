"""Cheap rehearsals of the paper-scale costs (``benchmarks/paper_scale.py`` measures the real configs): a blow-up in
checkpoint writes or bookkeeping fails here."""

from __future__ import annotations

import importlib.util

import pytest

from cil.runs import RunFolder
from cil.session import run_experiment
from cil.trainers import AtomicCheckpointIO
from tests.helpers import CONFIGS, ROOT, tiny_config


def paper_scale():
    spec = importlib.util.spec_from_file_location("paper_scale", ROOT / "benchmarks" / "paper_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EPOCHS = {
    "fsa": ["strategy.epochs=3", "strategy.milestones=[2]"],
    "mamba_fscil": [
        "backbone.image_size=32",
        "strategy.base_epochs=3",
        "strategy.inc_steps=[3]",
        "strategy.base_warmup=0",
        "stream.train_per_class=20",  # resnet12 on every digit of 6 classes for 3 epochs took 80 s of the suite
    ],
    "mos": ["backbone.image_size=32", "strategy.epochs=3", "strategy.ca_epochs=1"],
    "zscl": ["backbone.image_size=32", "strategy.epochs=3", "strategy.iterations=null"],
    "dkvb": ["strategy.epochs=20", "strategy.init_epochs=1"],
}


@pytest.mark.slow  # over 20 s on 2 cores: the default suite stays under 10 minutes
@pytest.mark.parametrize("name", sorted(EPOCHS))
def test_writes_per_session_do_not_grow_with_epochs(name, tmp_path, monkeypatch):
    """Each strategy's digits config over 2 sessions with many epochs and the default 30-minute resume interval:
    one checkpoint per session, none in between, and the process writes (checkpoints, logs, tables, plots) at most
    a few times its session checkpoints; frozen tensors the config rebuilds are not in them."""
    resume_points: list[str] = []
    save = AtomicCheckpointIO.save_checkpoint
    record = lambda *a, **k: resume_points.append(str(a[2])) or save(*a, **k)  # noqa: E731  (self, ckpt, path)
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", record)
    overrides = ["stream.split=B6-Inc4", "run.checkpoint_every=30", "run.keep_session_checkpoints=true", *EPOCHS[name]]
    cfg = tiny_config(name, tmp_path, *overrides)
    wchar = paper_scale().wchar
    before = wchar()
    run = run_experiment(cfg)
    written = wchar() - before
    assert resume_points == []  # no resume point: the epochs were far quicker than the interval
    checkpoints = sorted((run / "checkpoints").glob("session_*.ckpt"))
    assert [p.name for p in checkpoints] == ["session_0.ckpt", "session_1.ckpt"]
    total = sum(p.stat().st_size for p in checkpoints)
    assert written < 2 * total + 8 * 2**20, (written, total)
    state = RunFolder(run).load_session(1).state_dict
    from cil.module import create_strategy

    prefixes = create_strategy(cfg).rebuildable_prefixes()
    assert not prefixes or not any(k.startswith(prefixes) for k in state)


@pytest.mark.parametrize(
    "config, frozen",
    [
        ("fsa/cub200_fscil", True),  # FiLM: the pre-trained body is left out
        ("mamba_fscil/cub200_fscil", False),
        pytest.param("mos/omnibenchmark_b0inc20_in21k", True, marks=pytest.mark.slow),  # 300 classes' statistics
        pytest.param("dkvb/cifar100_clip_vitb32", True, marks=pytest.mark.slow),  # saves ~1.6 GB
    ],
)
def test_paper_configs_checkpoints_and_bookkeeping_stay_bounded(config, frozen, tmp_path):
    """The paper configs at their protocols' class counts: checkpoints without the frozen weights, and the
    strategies' own buffers (class statistics, values, prototypes) far from a 24 GiB machine's memory."""
    strategy, name = config.split("/")
    row = paper_scale().footprint(strategy, name, tmp_path)
    if frozen:
        assert row["session_ckpt_mb"] < 0.8 * row["session_ckpt_before_mb"]
    assert row["bookkeeping_mb"] < 1024 and row["resume_mb"] < 1024


def _one_config_per_data_set() -> list[str]:
    """A paper config of every data set the paper configs read (both MTIL orders: they start differently)."""
    from cil.config import load_config

    seen, out = set(), []
    for strategy, configs in paper_scale().PAPER.items():
        for config in configs:
            extra = ZSCL_REFERENCE if strategy == "zscl" else []
            stream = load_config(CONFIGS / strategy / f"{config}.yaml", extra).stream
            key = (stream.name, tuple(stream.datasets or ()))
            if key not in seen:
                seen.add(key)
                out.append(f"{strategy}/{config}")
    return out


ZSCL_REFERENCE = ["strategy.reference_images=/nonexistent", "strategy.reference_captions=/nonexistent"]


def test_the_rehearsals_cover_every_data_set_of_the_paper_configs():
    streams = {c: c.split("/")[1] for c in _one_config_per_data_set()}
    assert len(streams) == 15, streams  # 12 single data sets, CIFAR-10 (DKVB), MTIL in both orders


@pytest.mark.parametrize("config", _one_config_per_data_set())
def test_rehearsal_data_is_read_by_the_real_loader_at_the_paper_class_count(config, tmp_path):
    """``paper_scale.py --rehearse`` writes each data set in its real on-disk format at the paper's number of
    classes; the real loader reads it with the config's own split, and the cut stream trains one full batch per
    epoch in each rehearsed session that trains."""
    from cil.backbones import create_backbone, data_transforms
    from cil.config import load_config
    from cil.streams import create_stream

    ps = paper_scale()
    strategy, name = config.split("/")
    path = CONFIGS / strategy / f"{name}.yaml"
    extra = ZSCL_REFERENCE if strategy == "zscl" else []
    cfg = load_config(path, extra)
    batch, per_class = ps.rehearsal_sizes(strategy, name, cfg)
    ps.write_data(cfg, tmp_path, per_class)
    cfg = load_config(path, [f"stream.data_root={tmp_path}", "stream.verify_checksums=false", *extra])
    backbone = create_backbone("resnet18")
    stream = create_stream(cfg.stream, lambda **kw: data_transforms(backbone, 16, False, **kw))
    if cfg.stream.name == "mtil":
        first_two = {"aircraft": 100, "caltech101": 101, "stanford_cars": 196, "food": 101}
        assert [len(c) for c in stream.classes_per_session[:2]] == [first_two[d] for d in cfg.stream.datasets[:2]]
    else:
        assert stream.n_classes == ps.CLASSES[cfg.stream.name]
    cut = ps.cut_stream(stream, batch)
    assert cut.n_sessions == 2 and cut.classes_per_session == stream.classes_per_session[:2]
    trains = [0] if strategy in ("fsa", "mamba_fscil") else [0, 1]  # FSA adapts, Mamba-FSCIL trains its body once
    for k in trains:
        assert len(cut.train_data[k]) == batch, (k, len(stream.train_data[k]), batch)
        assert len(set(cut.train_data[k].targets)) > 1  # a sample of the session, not one class


@pytest.mark.slow
def test_a_paper_config_rehearses_end_to_end(tmp_path):
    """``paper_scale.rehearse`` drives the session loop with its checkpoint writers wrapped to count them: a change
    of their signatures breaks it here rather than an hour into ``--rehearse`` (it once did). DKVB on CIFAR-10 with
    the real ResNet-50: 2 steps in session 1, 1 in session 2, one resume point between session 1's two epochs, and
    session checkpoints of the footprint's size."""
    ps = paper_scale()
    row = ps.rehearse("dkvb/cifar10_resnet50", tmp_path / "rehearsal")
    footprint = ps.footprint("dkvb", "cifar10_resnet50", tmp_path)
    assert row["steps"] == 3 and row["step_batch"] == row["paper_batch"] == 256
    assert row["resume_points"] == 1
    assert row["session_ckpt_mb"] == pytest.approx(footprint["session_ckpt_mb"], rel=0.01)
    assert row["s_per_step"] > 0 and row["written_mb"] >= 2 * row["session_ckpt_mb"] + row["resume_mb"]
