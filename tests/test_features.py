"""Feature reuse for frozen bodies (cil/features.py): one body pass per test image per run, the same predictions,
logits bit for bit, on every strategy that opts in; resume, the disk store and the foreign-project helper."""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch

from cil.evaluation import stored_features
from cil.features import FeatureStore
from cil.loaders import stats_loader, stream_transforms
from cil.module import accuracy_row
from cil.runs import load_run
from cil.session import run_experiment
from tests.helpers import tiny_config


def capture_strategy(monkeypatch) -> list:
    """The strategy the next run builds (appended to the returned list)."""
    import cil.session as S

    built, create = [], S.create_strategy
    monkeypatch.setattr(S, "create_strategy", lambda cfg: built.append(create(cfg)) or built[-1])
    return built


def count_body_images(monkeypatch, cls) -> list[int]:
    """Patches ``cls.features`` to count the images it sees (every body pass: statistics, evaluation, reuse)."""
    seen = [0]
    original = cls.features

    def counting(self, x):
        seen[0] += len(x)
        return original(self, x)

    monkeypatch.setattr(cls, "features", counting)
    return seen


def test_simplecil_reuses_test_features_with_the_same_results(tmp_path, monkeypatch):
    """Cached and uncached runs write the same metrics; with reuse the body sees each test image once per run
    (5 evaluations of every test set without it), plus each training image once (its prototype pass)."""
    from cil.strategies.simplecil import SimpleCIL

    seen = count_body_images(monkeypatch, SimpleCIL)
    runs = {}
    for reuse in (True, False):
        before = seen[0]
        runs[reuse] = load_run(
            run_experiment(tiny_config("simplecil", tmp_path / str(reuse), f"run.reuse_features={reuse}"))
        )
        runs[reuse].passes = seen[0] - before
    n_test = sum(runs[True].summary["test_samples_per_session"])
    n_train = runs[True].passes - n_test
    assert runs[False].passes == n_train + runs[True].summary["n_sessions"] * n_test
    pd.testing.assert_frame_equal(runs[True].metrics, runs[False].metrics)
    np.testing.assert_array_equal(runs[True].accuracy_matrix.to_numpy(), runs[False].accuracy_matrix.to_numpy())
    assert not (runs[True].path / "features").exists()  # nothing left behind by a completed run


def stored_and_direct_logits(strategy, cfg):
    """Logits of every test set: ``classify`` on stored features vs ``forward`` on the images, same batches; and
    the labels of those batches."""
    from cil.streams import create_stream

    stream = create_stream(cfg.stream, partial(stream_transforms, strategy.backbone, cfg))
    strategy.eval()
    store = FeatureStore(None)
    stored = stored_features(strategy, list(stream.eval_data), cfg, store)
    again = stored_features(strategy, list(stream.eval_data), cfg, store)  # all from the store now
    assert store.misses == len(stream.eval_data) and store.hits == len(stream.eval_data)
    with torch.no_grad():
        batches = [list(stats_loader(d, cfg)) for d in stream.eval_data]
        direct = [torch.cat([strategy(b[0]) for b in bs]) for bs in batches]
        cached = [torch.cat([strategy.classify(b[0]) for b in loader]) for loader in stored]
        cached_again = [torch.cat([strategy.classify(b[0]) for b in loader]) for loader in again]
    labels = [torch.cat([b[1] for b in bs]) for bs in batches]
    return direct, cached, cached_again, labels


FROZEN = {  # strategy: overrides that keep its run short (two sessions at least)
    "fsa": ["strategy.adaptation=none", "stream.split=B4-Inc3"],
    "fsa-adapted": ["strategy.epochs=1", "strategy.milestones=[1]", "stream.split=B4-Inc3"],
    "dkvb": ["strategy.epochs=1", "strategy.init_epochs=1", "stream.split=B4-Inc3"],
    "mamba_fscil": ["backbone.image_size=32", "strategy.base_epochs=1", "strategy.inc_steps=[2]",
                    "stream.split=B4-Inc3"],
}  # fmt: skip


SLOW = {"fsa-adapted", "mamba_fscil"}  # a minute or more each on 2 CPU cores: make test-slow


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in FROZEN])
def test_stored_features_give_bit_identical_logits(name, tmp_path, monkeypatch):
    """After a run, the trained strategy's logits on every test set are bit for bit the same from stored features as
    from the images, and the run's own (cached) matrix is the one the images give."""
    cfg = tiny_config(name.split("-")[0], tmp_path, *FROZEN[name])
    built = capture_strategy(monkeypatch)
    run = load_run(run_experiment(cfg))
    strategy = built[-1]
    assert strategy.features_frozen
    direct, cached, cached_again, labels = stored_and_direct_logits(strategy, cfg)
    for d, c, a in zip(direct, cached, cached_again):
        assert torch.equal(d, c) and torch.equal(d, a)
    counts = run.summary["test_samples_per_session"]
    last = run.accuracy_matrix.to_numpy()[-1]
    from_images = [int((logits.argmax(1) == y).sum()) / len(y) for logits, y in zip(direct, labels)]
    np.testing.assert_allclose(last[: len(counts)], from_images, rtol=0, atol=1e-12)


def test_fsa_body_is_not_reused_before_it_is_frozen(tmp_path):
    """FSA adapts its body in session 1: nothing is cached before ``freeze_body``, everything after."""
    from cil.module import create_strategy
    from cil.strategies.fsa import FSA

    cfg = tiny_config("fsa", tmp_path, *FROZEN["fsa"])

    strategy = create_strategy(cfg)
    assert not strategy.features_frozen
    strategy.freeze_body()
    assert strategy.features_frozen and isinstance(strategy, FSA)
    digest = strategy.features_digest()
    first = next(p for n, p in strategy.named_parameters() if n.startswith("backbone."))
    first.data.add_(1.0)
    assert strategy.features_digest() != digest  # a changed body never meets its old features


def test_disk_store_and_resume_give_the_same_run(tmp_path):
    """``run.feature_memory_mb=0`` keeps features on disk under the run folder; a run interrupted after session 2
    and resumed (features re-read from disk) writes the matrix of an uninterrupted, uncached run."""

    full = load_run(run_experiment(tiny_config("simplecil", tmp_path / "a", "run.reuse_features=false")))
    cfg = tiny_config("simplecil", tmp_path / "b", "run.feature_memory_mb=0")

    import cil.session as S

    original = S.evaluate

    def failing(strategy, stream, k, cfg_, store=None, **kwargs):
        if k == 2:
            assert store is not None and list(store.folder.glob("*.pt"))  # the earlier evaluations' features
            raise RuntimeError("injected fault")
        return original(strategy, stream, k, cfg_, store, **kwargs)

    S.evaluate = failing
    try:
        with pytest.raises(RuntimeError, match="injected fault"):
            run_experiment(cfg)
    finally:
        S.evaluate = original
    broken = next((tmp_path / "b" / "simplecil-digits").iterdir())
    assert (broken / "features").is_dir()
    run_experiment(cfg, run_dir=broken)
    np.testing.assert_array_equal(load_run(broken).accuracy_matrix.to_numpy(), full.accuracy_matrix.to_numpy())
    assert not (broken / "features").exists()


def test_accuracy_row_reuses_features_in_a_foreign_loop(tmp_path, monkeypatch):
    """``accuracy_row(..., store=FeatureStore())``: the second call runs no body pass and gives the same row."""
    from cil.module import Session, create_strategy
    from cil.strategies.simplecil import SimpleCIL
    from cil.streams import create_stream

    cfg = tiny_config("simplecil", tmp_path)
    strategy = create_strategy(cfg)
    stream = create_stream(cfg.stream, partial(stream_transforms, strategy.backbone, cfg))
    session = Session(0, list(stream.classes_per_session[0]), stream.seen_classes(0), loader_fn=lambda: [])
    strategy.begin_session(session)
    strategy.class_means.sums.normal_()
    strategy.class_means.counts.fill_(1)
    seen = count_body_images(monkeypatch, SimpleCIL)
    store = FeatureStore()
    first = accuracy_row(strategy, stream.eval_data, batch_size=100, store=store)
    passes = seen[0]
    second = accuracy_row(strategy, stream.eval_data, batch_size=100, store=store)
    assert passes == sum(len(d) for d in stream.eval_data) and seen[0] == passes
    assert first == second == accuracy_row(strategy, stream.eval_data, batch_size=100)


def test_a_damaged_stored_feature_file_is_set_aside_and_computed_again(tmp_path, capsys):
    store = FeatureStore(tmp_path, memory_mb=0)
    store.put("k", torch.ones(3, 2), torch.arange(3))
    path = tmp_path / "k.pt"
    path.write_bytes(path.read_bytes()[:100])  # a crash or a full disk cut it short
    assert FeatureStore(tmp_path, memory_mb=0).get("k") is None  # missing: the caller computes it again
    assert "stored features" in capsys.readouterr().out and (tmp_path / "k.unreadable").is_file()
    assert not path.exists()
