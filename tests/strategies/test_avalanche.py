"""Avalanche's own strategies as cil runs (``cil.strategies.avalanche``): the same matrix as Avalanche's own loop,
an exact resume with a replay buffer, the configs, and bad input refused before any data loads."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from cil.config import ConfigError, load_config
from cil.runs import load_run
from cil.session import run_experiment
from tests.helpers import CONFIGS, TINY, needs_debian, needs_lite0

FAST = ["strategy.epochs=1", "stream.batch_size=64"]


def avalanche_config(name: str, out, *extra: str):
    return load_config(CONFIGS / "avalanche" / f"{name}_digits.yaml", [f"run.output_dir={out}", *TINY, *FAST, *extra])


def avalanche_own_loop(cfg) -> np.ndarray:
    """Avalanche's own ``train``/``eval`` loop over the same stream, backbone, head and optimiser, R[i, j] from
    Avalanche's accuracy metric. Seeded as cil seeds a run: the run seed before the backbone and the stream are
    built, session k's derived seed before its training, the strategy built on a fork of session 1's generator."""
    import pytorch_lightning as pl
    from avalanche.benchmarks import benchmark_from_datasets, with_classes_timeline, with_task_labels
    from avalanche.benchmarks.utils.classification_dataset import TaskAwareClassificationDataset
    from avalanche.benchmarks.utils.data_attribute import TaskLabels
    from avalanche.benchmarks.utils.flat_data import ConstantSequence
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.models import IncrementalClassifier
    from avalanche.training import GDumb, LwF, Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin

    from cil.backbones import backbone_from_config
    from cil.loaders import derived_seed, seed_all, stream_transforms
    from cil.streams import create_stream

    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    backbone = backbone_from_config(cfg.backbone)
    stream = create_stream(cfg.stream, partial(stream_transforms, backbone, cfg))

    def labelled(data):
        return TaskAwareClassificationDataset([data], data_attributes=[TaskLabels(ConstantSequence(0, len(data)))])

    bench = with_task_labels(
        with_classes_timeline(
            benchmark_from_datasets(
                train=[labelled(d) for d in stream.train_data], test=[labelled(d) for d in stream.eval_data]
            )
        )
    )
    hp = cfg.strategy
    T = stream.n_sessions
    R = np.full((T, T), np.nan)
    for k, experience in enumerate(bench.train_stream):
        seed_all(derived_seed(cfg.run.seed, k))
        if k == 0:
            with torch.random.fork_rng(devices=[]):
                model = torch.nn.Sequential(backbone, IncrementalClassifier(backbone.num_features, 2))
                optimizer = torch.optim.SGD(model.parameters(), lr=hp.lr, momentum=hp.momentum)
                cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hp.epochs)
                evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
                cls = {"Naive": Naive, "Replay": Replay, "LwF": LwF, "GDumb": GDumb}[hp.avalanche]
                strategy = cls(
                    model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(),
                    train_mb_size=cfg.stream.batch_size, train_epochs=hp.epochs, eval_mb_size=cfg.stream.batch_size,
                    plugins=[LRSchedulerPlugin(cosine)], evaluator=evaluator, eval_every=-1, **hp.kwargs,
                )  # fmt: skip
        strategy.train(experience, num_workers=0)
        results = strategy.eval(bench.test_stream[: k + 1], num_workers=0)
        for j in range(k + 1):
            R[k, j] = results[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"]
    return R


@pytest.mark.parametrize(
    "name",
    ["naive", *(pytest.param(n, marks=pytest.mark.slow) for n in ("replay", "lwf", "gdumb"))],
)
def test_the_matrix_through_cil_is_the_one_avalanches_own_loop_gives(tmp_path, name):
    """Faithful by construction: Avalanche's training code, cil's evaluation, the same numbers to the last bit.
    GDumb replaces the strategy's model at every experience: cil must evaluate the model Avalanche trained."""
    cfg = avalanche_config(name, tmp_path)
    ours = load_run(run_experiment(cfg)).accuracy_matrix.to_numpy(dtype=float)
    theirs = avalanche_own_loop(cfg)
    seen = np.tril(np.ones_like(theirs, dtype=bool))
    assert np.array_equal(ours[seen], theirs[seen]), (ours, theirs)
    assert ours[seen].max() >= 0.5 and ours[seen].min() < 0.5  # it learned and forgot: a test that could fail


def test_replay_resumes_after_an_interruption_with_its_buffer_to_the_uninterrupted_matrix(tmp_path, monkeypatch):
    """Killed in the middle of session 3's training: the resumed run starts at session 3 from session 2's checkpoint
    (model, optimiser, scheduler, Avalanche's clock and the replay buffer, rebuilt without unpickling) and ends with
    the uninterrupted run's matrix. Without the buffer, session 3 would train on its own data only."""
    from avalanche.core import SupervisedPlugin

    from cil.strategies.avalanche import AvalancheStrategy

    full = load_run(run_experiment(avalanche_config("replay", tmp_path / "full")))

    class Fault(SupervisedPlugin):
        def after_training_iteration(self, strategy, **kwargs):
            if strategy.clock.train_exp_counter == 2 and strategy.clock.train_exp_iterations == 3:
                raise RuntimeError("injected fault")

    begin = AvalancheStrategy.begin_session

    def faulty(self, session):
        if session.index == 2:  # added after session 2's checkpoint: the checkpoints hold Avalanche's plugins only
            self.trainer_.plugins.append(Fault())
        begin(self, session)

    monkeypatch.setattr(AvalancheStrategy, "begin_session", faulty)
    cfg = avalanche_config("replay", tmp_path / "cut")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_experiment(cfg)
    monkeypatch.setattr(AvalancheStrategy, "begin_session", begin)
    (folder,) = (tmp_path / "cut").glob("*/*")
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["session_1.ckpt"]
    state = torch.load(folder / "checkpoints" / "session_1.ckpt", weights_only=True)  # the safe loader reads it
    assert "ReplayPlugin" in str(state)
    bodies = []

    def checked(self, session):  # the restored model's body is the module's backbone: no second copy kept alive
        begin(self, session)
        bodies.append(self.backbone is self.model[0] and self.model is self.trainer_.model)

    monkeypatch.setattr(AvalancheStrategy, "begin_session", checked)
    resumed = load_run(run_experiment(cfg, run_dir=folder))
    assert bodies == [True, True, True]
    assert resumed.summary["complete"]
    np.testing.assert_array_equal(resumed.accuracy_matrix.to_numpy(), full.accuracy_matrix.to_numpy())


@pytest.mark.slow
def test_a_resume_without_the_buffer_would_differ(tmp_path, monkeypatch):
    """The resume test above can fail: a checkpoint restored without the replay buffer changes the matrix."""
    from cil.strategies import avalanche as module

    cfg = avalanche_config("replay", tmp_path, "run.keep_session_checkpoints=true")
    full = load_run(run_experiment(cfg))
    for k in (2, 3, 4):
        (full.path / "checkpoints" / f"session_{k}.ckpt").unlink()
    kept, restore = module._kept_plugins, module._restore

    def without_buffer(strategy, state, sessions):
        monkeypatch.setattr(
            module, "_kept_plugins", lambda s: [p for p in kept(s) if type(p).__name__ != "ReplayPlugin"]
        )
        restore(strategy, {**state, "plugins": [p for p in state["plugins"] if p["class"] != "ReplayPlugin"]}, sessions)
        monkeypatch.setattr(module, "_kept_plugins", kept)

    monkeypatch.setattr(module, "_restore", without_buffer)
    resumed = load_run(run_experiment(cfg, run_dir=full.path))
    assert not np.array_equal(resumed.accuracy_matrix.to_numpy(), full.accuracy_matrix.to_numpy())


CLASSIC = ["naive", "replay", "lwf", "ewc", "icarl", "gdumb", "der", "er_ace"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIC)
def test_every_shipped_strategy_runs_and_resumes_from_any_session_checkpoint_exactly(tmp_path, name):
    """Each shipped config runs on digits; its session-2 checkpoint (read by the safe loader) resumes to the same
    matrix, so every plugin's state (buffers, previous models, Fisher importances, exemplars, logits) survives."""
    cfg = avalanche_config(name, tmp_path, "run.keep_session_checkpoints=true")
    full = load_run(run_experiment(cfg))
    assert full.summary["complete"] and full.config.strategy.avalanche == cfg.strategy.avalanche
    assert [s["epochs"] for s in full.summary["sessions"]] == [1] * 5
    for k in (2, 3, 4):
        (full.path / "checkpoints" / f"session_{k}.ckpt").unlink()
    resumed = load_run(run_experiment(cfg, run_dir=full.path))
    np.testing.assert_array_equal(resumed.accuracy_matrix.to_numpy(), full.accuracy_matrix.to_numpy())


@pytest.mark.parametrize(
    "override, message",
    [
        ("strategy.avalanche=Replayy", "strategy.avalanche='Replayy' is not a strategy of avalanche.training (did you "
         "mean Replay,"),
        ("strategy.kwargs.memsize=10", "strategy.kwargs.memsize: not an argument of Replay (did you mean mem_size?); "
         "valid: mem_size,"),
        ("strategy.kwargs.train_mb_size=10", "strategy.kwargs.train_mb_size: set by cil for every Avalanche strategy"),
        ("strategy.avalanche=EWC", "strategy.kwargs: EWC needs ewc_lambda (no default in its signature)"),
        ("strategy.avalanche=PNNStrategy", "strategy.avalanche=PNNStrategy: needs task labels (one column per task); "
         "cil streams are class-incremental"),
        ("strategy.avalanche=JointTraining", "trains on the whole stream at once; cil's `joint` strategy"),
        ("trainer.devices=2", "strategy.name=avalanche trains in one process (Avalanche's loop, not Lightning's): "
         "trainer.devices=2 trainer.num_nodes=1 would train one copy per process; use one device"),
    ],
)  # fmt: skip
def test_bad_avalanche_settings_are_one_line_before_a_model_is_built_or_data_loads(
    tmp_path, capsys, monkeypatch, override, message
):
    import timm

    from cil.cli import main

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("the model was built first"))
    config = "replay" if "kwargs" in override or "Replayy" in override else "naive"  # naive: no kwargs of its own
    args = ["run", f"avalanche/{config}_digits", f"run.output_dir={tmp_path}", override]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("cil: error: ") and message in err, err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_the_strategy_class_built_from_python_checks_its_settings_too():
    from cil.backbones import create_backbone
    from cil.strategies.avalanche import AvalancheStrategy

    with pytest.raises(
        ConfigError, match=r"strategy.kwargs.mem: not an argument of GDumb \(did you mean mem_size\?\); valid: mem_size"
    ):
        AvalancheStrategy(create_backbone("resnet10t"), avalanche="GDumb", kwargs={"mem": 3})


@pytest.mark.parametrize(
    "entry",
    [{"__callable__": "os:system", "id": 7},
     pytest.param({"__object__": "subprocess:Popen", "state": {}, "id": 7}, marks=pytest.mark.slow),
     pytest.param({"__dict__": [], "type": "os:environ", "factory": None, "id": 7}, marks=pytest.mark.slow)],
)  # fmt: skip
def test_a_checkpoint_naming_code_outside_the_trusted_packages_is_refused_in_one_line(tmp_path, capsys, entry):
    """A run folder is shared: a crafted session checkpoint that names os.system (as a callable, an object's class
    or a dict type) is refused before any session runs, and nothing it names is imported or called."""
    from cil.cli import main

    cfg = avalanche_config("naive", tmp_path, "run.keep_session_checkpoints=true")
    folder = run_experiment(cfg)
    ckpt = folder / "checkpoints" / "session_1.ckpt"
    for k in (2, 3, 4):
        (folder / "checkpoints" / f"session_{k}.ckpt").unlink()
    (folder / "summary.json").unlink()  # as if interrupted in session 3
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["avalanche"]["plugins"][0]["state"]["__dict__"].append(["crafted", entry])
    torch.save(state, ckpt)
    code = main(["run", "--resume", str(folder)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    name = entry.get("__callable__") or entry.get("__object__") or entry["type"]
    assert f"the Avalanche checkpoint names '{name}', which is not of a trusted package" in err


def test_seeds_report_and_labels_treat_avalanche_runs_as_any_other(tmp_path, capsys):
    """``cil run --seeds`` then ``cil report``: two seeds of Avalanche's LwF grouped as repeats (mean ± std), the
    row labelled by the Avalanche class."""
    from cil.cli import main

    args = ["run", "avalanche/lwf_digits", f"run.output_dir={tmp_path}", *TINY, *FAST, "--seeds", "0", "1"]
    assert main(args) == 0
    runs = sorted(tmp_path.glob("avalanche-LwF-digits/*"))
    assert len(runs) == 2 and {load_run(r).config.run.seed for r in runs} == {0, 1}
    assert load_run(runs[0]).strategy == "avalanche:LwF"
    capsys.readouterr()
    assert main(["report", *map(str, runs)]) == 0
    out = capsys.readouterr().out
    assert "avalanche:LwF" in out and "±" in out, out


@pytest.mark.slow
@needs_debian
@needs_lite0
@pytest.mark.parametrize("name", CLASSIC)
def test_every_fashion_mnist_config_runs_on_the_real_images_and_the_imagenet_lite0(tmp_path, name):
    """The shipped Fashion-MNIST configs as they are (Lite0's ImageNet weights, 64 px), on a few images per class:
    each is accepted by ``cil run``'s checks and trains two sessions to a complete run folder."""
    from cil.cli import check_before_running

    overrides = [f"run.output_dir={tmp_path}", "stream.split=B0-Inc5", "stream.train_per_class=6",
                 "stream.test_per_class=3", "trainer.enable_progress_bar=false", "strategy.epochs=1"]  # fmt: skip
    cfg = load_config(CONFIGS / "avalanche" / f"{name}_fashion_mnist.yaml", overrides)
    check_before_running(cfg)
    run = load_run(run_experiment(cfg))
    assert run.summary["complete"] and run.summary["n_sessions"] == 2
    assert cfg.backbone.name == "tf_efficientnet_lite0" and cfg.strategy.avalanche == run.strategy.split(":")[1]


def test_the_sessions_loggers_get_avalanches_training_loss_step_by_step(tmp_path):
    """``trainer.loggers`` as for a Lightning fit: logs/csv/session_<k>/metrics.csv, one train/loss row per step."""
    import pandas as pd

    cfg = avalanche_config("naive", tmp_path, "trainer.loggers=[csv]", "stream.split=B0-Inc5")
    from cil.backbones import backbone_from_config
    from cil.loaders import stream_transforms
    from cil.streams import create_stream

    folder = run_experiment(cfg)
    stream = create_stream(cfg.stream, partial(stream_transforms, backbone_from_config(cfg.backbone), cfg))
    for k in (0, 1):
        rows = pd.read_csv(folder / "logs" / "csv" / f"session_{k}" / "metrics.csv")
        steps = -(-len(stream.train_data[k]) // 64)  # one epoch in batches of 64, the ragged last one included
        assert list(rows["step"]) == list(range(steps))
        assert rows["train/loss"].notna().all() and (rows["train/loss"] > 0).all()
