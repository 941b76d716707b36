"""Run a cil strategy over an Avalanche benchmark a user already has, with one call::

    from avalanche.benchmarks.classic import SplitCIFAR100
    from cil.interop import run_benchmark

    folder = run_benchmark(SplitCIFAR100(n_experiences=10, seed=0), "configs/simplecil/digits.yaml",
                           ["backbone.image_size=32"])

The result is the run folder ``cil run`` writes (config, checkpoints, accuracy matrix, metrics, plots), so
``cil report``, :func:`cil.runs.load_run` and the notebook read it as any other. Any class-incremental benchmark
with ``train_stream``/``test_stream`` works (``nc_benchmark``, ``class_incremental_benchmark``,
``benchmark_from_datasets``, the classic ones): the classes of each training experience form a session (they must
not repeat across experiences), labels are renumbered in order of appearance as cil does everywhere, and the test
experiences are pooled and split by those sessions' classes (so a benchmark with one test experience works too).
The benchmark's own transforms are used: its datasets must yield what the backbone accepts (their ``train`` group
for training, ``eval`` for statistics passes and evaluation). Resume with ``run_benchmark(benchmark, config,
run_dir=folder)``: a folder made this way cannot rebuild the benchmark from its config.yaml alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from cil.config import ConfigError, load_config, validate

STREAM_NAME = "avalanche"


class _Renumbered(Dataset):
    """An Avalanche dataset's ``(x, y, ...)`` items as ``(x, remap[y])``."""

    def __init__(self, data: Any, remap: dict[int, int]):
        self.data, self.remap = data, remap
        self.targets = [remap[int(t)] for t in data.targets]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.data[i][0], self.targets[i]


def stream_from_benchmark(benchmark: Any, name: str = STREAM_NAME):
    """A cil :class:`cil.streams.common.Stream` over an Avalanche class-incremental benchmark."""
    from avalanche.benchmarks.utils import as_classification_dataset

    from cil.streams.common import Stream, indices_by_class

    if not hasattr(benchmark, "train_stream") or not hasattr(benchmark, "test_stream"):
        raise ConfigError(f"{type(benchmark).__name__} is not an Avalanche benchmark (no train_stream/test_stream)")
    train_experiences = list(benchmark.train_stream)
    sessions = [sorted(int(c) for c in exp.classes_in_this_experience) for exp in train_experiences]
    order = [c for s in sessions for c in s]
    if len(set(order)) != len(order):
        raise ConfigError("the benchmark's training experiences share classes: cil runs class-incremental streams")
    remap = {c: i for i, c in enumerate(order)}
    train_data = [as_classification_dataset(_Renumbered(e.dataset.train(), remap)) for e in train_experiences]
    stats_data = [as_classification_dataset(_Renumbered(e.dataset.eval(), remap)) for e in train_experiences]
    test_parts = [exp.dataset.eval() for exp in benchmark.test_stream]
    test = test_parts[0]
    for part in test_parts[1:]:
        test = test.concat(part)
    unknown = sorted({int(t) for t in test.targets} - set(order))
    if unknown:
        raise ConfigError(f"the benchmark's test stream has classes {unknown[:5]} that no training experience has")
    test_all = as_classification_dataset(_Renumbered(test, remap))
    by_class = indices_by_class(test_all.targets)
    new_ids = [[remap[c] for c in s] for s in sessions]
    eval_data = [test_all.subset([i for c in ids for i in by_class.get(c, [])]) for ids in new_ids]
    names = getattr(getattr(benchmark, "original_train_dataset", None), "classes", None)
    class_names = [str(names[c]) if names is not None and c < len(names) else str(c) for c in order]
    return Stream(
        name=name,
        benchmark=benchmark,
        classes_per_session=new_ids,
        class_names=class_names,
        original_class_ids=order,
        train_data=train_data,
        eval_data=eval_data,
        stats_data=stats_data,
    )


def run_benchmark(
    benchmark: Any,
    config: str | Path | DictConfig | dict,
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Run the config's strategy (and trainer, run settings) over ``benchmark``; returns the run folder. The
    config's ``stream`` group keeps only what is not the data (batch sizes, workers); ``stream.name`` is set to
    ``avalanche``."""
    from cil.session import run_experiment

    if isinstance(config, (str, Path)):
        cfg = load_config(config, [*overrides, f"stream.name={STREAM_NAME}"])
    else:
        user = OmegaConf.create(OmegaConf.to_container(OmegaConf.create(config), resolve=False))
        user = OmegaConf.merge(user, OmegaConf.from_dotlist([*overrides, f"stream.name={STREAM_NAME}"]))
        cfg = validate(user)
    return run_experiment(cfg, run_dir=run_dir, callbacks=callbacks, stream=stream_from_benchmark(benchmark))


def _refuse_from_config(cfg, make_transforms):
    raise ConfigError(
        "stream.name=avalanche is a benchmark given from Python: cil.interop.run_benchmark(benchmark, config) "
        "(and run_benchmark(benchmark, config, run_dir=FOLDER) to resume)"
    )


def _register() -> None:
    from cil.registry import register_stream

    register_stream(STREAM_NAME, _refuse_from_config)  # a benchmark object given from Python


_register()

__all__ = ["run_benchmark", "stream_from_benchmark"]
