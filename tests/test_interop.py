"""A cil strategy over a benchmark built by Avalanche's own generators, with one call (cil.interop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from cil.cli import main
from cil.module import create_strategy
from cil.runs import load_run
from tests.helpers import CONFIGS, TINY


def digits_benchmark():
    """Digits as 3 x 16 x 16 tensors, nc_benchmark over a fixed class order (not 0..9) in 5 experiences."""
    from avalanche.benchmarks import nc_benchmark
    from avalanche.benchmarks.utils import as_classification_dataset
    from torch.utils.data import TensorDataset

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1)
    x = F.interpolate(x, size=16, mode="bilinear").repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:1400], perm[1400:]

    def dataset(idx):
        data = TensorDataset(x[idx], y[idx])
        data.targets = y[idx].tolist()
        return as_classification_dataset(data)

    order = [3, 1, 4, 0, 5, 9, 2, 6, 8, 7]
    bench = nc_benchmark(dataset(train), dataset(test), n_experiences=5, task_labels=False, fixed_class_order=order)
    return bench, (x, y, train, test, order)


def test_simplecil_over_an_avalanche_benchmark_matches_nearest_mean_by_hand(tmp_path, capsys):
    from cil.interop import run_benchmark

    bench, (x, y, train, test, order) = digits_benchmark()
    overrides = [*TINY, f"run.output_dir={tmp_path}", "trainer.accelerator=cpu"]
    folder = run_benchmark(bench, CONFIGS / "simplecil" / "digits.yaml", overrides)
    run = load_run(folder)
    assert run.summary["complete"] and (folder / "plots" / "accuracy_curve.png").is_file()
    R = run.accuracy_matrix.to_numpy()
    assert R.shape == (5, 5)
    # by hand: the same backbone (the run seeds it before building), cosine to each seen class's mean feature
    from cil.config import load_config

    cfg = load_config(CONFIGS / "simplecil" / "digits.yaml", [*overrides, "stream.name=avalanche"])
    torch.manual_seed(cfg.run.seed)
    import pytorch_lightning as pl

    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    backbone = create_strategy(cfg).backbone.eval()
    with torch.no_grad():
        feats = torch.cat([backbone(x[i : i + 256]) for i in range(0, len(x), 256)])
    means = torch.stack([feats[train][y[train] == c].mean(0) for c in order])
    for k in range(5):
        seen = 2 * (k + 1)
        scores = F.normalize(feats[test], dim=1) @ F.normalize(means[:seen], dim=1).T
        predicted = torch.tensor(order)[scores.argmax(1)]
        for j in range(k + 1):
            rows = torch.isin(y[test], torch.tensor(order[2 * j : 2 * j + 2]))
            expected = (predicted[rows] == y[test][rows]).sum().item() / rows.sum().item()
            assert R[k, j] == pytest.approx(expected, abs=1e-9), (k, j)
    assert main(["report", str(folder)]) == 0 and "simplecil" in capsys.readouterr().out


@pytest.mark.slow
def test_an_avalanche_run_folder_cannot_be_resumed_from_its_config_alone(tmp_path, capsys):
    from cil.interop import run_benchmark

    bench, _ = digits_benchmark()
    folder = run_benchmark(bench, CONFIGS / "simplecil" / "digits.yaml", [*TINY, f"run.output_dir={tmp_path}"])
    (folder / "summary.json").unlink()  # as if stopped before its first results
    for checkpoint in (folder / "checkpoints").glob("session_*.ckpt"):
        checkpoint.unlink()
    assert main(["run", "--resume", str(folder)]) == 2
    assert "cil.interop.run_benchmark(benchmark, config)" in capsys.readouterr().err
    assert run_benchmark(bench, CONFIGS / "simplecil" / "digits.yaml", list(TINY), run_dir=folder) == folder
    assert load_run(folder).summary["complete"]
    np.testing.assert_array_equal(load_run(folder).accuracy_matrix.shape, (5, 5))
