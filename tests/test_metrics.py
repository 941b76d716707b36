"""Metrics on a hand-computed matrix, and agreement with Avalanche's own metric classes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from cil import metrics as M

R = np.array([[0.9, 0.1, 0.0], [0.6, 0.8, 0.2], [0.5, 0.7, 0.9]])
N = [10, 20, 30]


def test_seen_accuracy_is_sample_weighted():
    # A_1 = (0.6*10 + 0.8*20) / 30, A_2 = (0.5*10 + 0.7*20 + 0.9*30) / 60
    assert M.seen_accuracy(R, N) == pytest.approx([0.9, 22 / 30, 46 / 60])


def test_average_incremental_and_last():
    assert M.average_incremental_accuracy(R, N) == pytest.approx((0.9 + 22 / 30 + 46 / 60) / 3)
    assert M.last_accuracy(R, N) == pytest.approx(46 / 60)


def test_forgetting_chaudhry():
    # f_0 = max(0.9, 0.6) - 0.5 = 0.4, f_1 = 0.8 - 0.7 = 0.1
    assert M.forgetting_per_session(R) == pytest.approx([0.4, 0.1])
    assert M.forgetting(R) == pytest.approx(0.25)
    # after session 1 only: f_0 = 0.9 - 0.6
    assert M.forgetting(R, after=1) == pytest.approx(0.3)
    assert np.isnan(M.forgetting_curve(R)[0]) and M.forgetting_curve(R)[1:] == pytest.approx([0.3, 0.25])


def test_forgetting_uses_the_maximum_not_the_first_value():
    rising = np.array([[0.5, 0, 0], [0.8, 0.7, 0], [0.6, 0.7, 0.9]])
    assert M.forgetting_per_session(rising) == pytest.approx([0.2, 0.0])
    assert M.forgetting_per_session(rising, reference="initial") == pytest.approx([-0.1, 0.0])


def test_backward_and_forward_transfer():
    assert M.backward_transfer(R) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert M.forward_transfer(R) == pytest.approx((0.1 + 0.2) / 2)
    assert M.forward_transfer(R, baseline=[0, 0.05, 0.1]) == pytest.approx((0.05 + 0.1) / 2)


def test_old_new_harmonic():
    old, new, h = M.old_new_accuracy(R, N)
    assert np.isnan(old[0]) and np.isnan(h[0])
    assert old[1:] == pytest.approx([0.6, 19 / 30])
    assert new == pytest.approx([0.9, 0.8, 0.9])
    assert h[1:] == pytest.approx([2 * 0.6 * 0.8 / 1.4, 2 * (19 / 30) * 0.9 / (19 / 30 + 0.9)])
    assert M.harmonic_mean(0.0, 0.0) == 0.0


def test_fscil_base_novel_and_performance_drop():
    base, novel = M.base_novel_accuracy(R, N)
    assert base == pytest.approx([0.9, 0.6, 0.5])
    assert np.isnan(novel[0]) and novel[1:] == pytest.approx([0.8, (0.7 * 20 + 0.9 * 30) / 50])
    assert M.performance_drop(R, N) == pytest.approx(0.9 - 46 / 60)
    summary = M.summarize(R, N)
    assert summary["last_base_acc"] == pytest.approx(0.5) and summary["performance_drop"] == pytest.approx(
        0.9 - 46 / 60
    )
    assert summary["last_novel_acc"] == pytest.approx(41 / 50)


def test_mtil_definitions_from_zscl():
    # [[a,b,c],[d,e,f],[g,h,i]]: Transfer = (b + (c+f)/2)/2, Avg = mean of all cells, Last = (g+h+i)/3
    assert M.mtil_transfer(R) == pytest.approx((0.1 + (0.0 + 0.2) / 2) / 2)
    assert M.mtil_avg(R) == pytest.approx(R.sum() / 9)
    assert M.mtil_last(R) == pytest.approx((0.5 + 0.7 + 0.9) / 3)


def test_accuracy_row_from_confusion():
    confusion = M.confusion_matrix(predictions=[0, 1, 1, 2, 3, 0], targets=[0, 0, 1, 2, 3, 3], n_classes=4)
    assert confusion.sum() == 6 and confusion[0, 1] == 1 and confusion[3, 0] == 1
    assert M.accuracy_row(confusion, [[0, 1], [2, 3]]) == pytest.approx([2 / 3, 2 / 3])


def test_summarize_has_a_definition_for_every_metric():
    summary = M.summarize(R, N)
    assert set(summary) == set(M.DEFINITIONS)
    assert summary["forgetting"] == pytest.approx(0.25) and summary["last_acc"] == pytest.approx(46 / 60)


def _predictions(T: int = 4, per_class: int = 25, seed: int = 0, decreasing: bool = False):
    """Random predictions for T sessions of 2 classes: preds[i][j] = (predicted, true) after session i."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(T):
        for j in range(T):
            true = torch.arange(2 * j, 2 * j + 2).repeat_interleave(per_class)
            keep = 0.95 - 0.2 * (i - j) if decreasing else torch.rand(1, generator=g).item()
            wrong = torch.rand(true.shape, generator=g) > keep
            pred = torch.where(wrong, torch.randint(0, 2 * T, true.shape, generator=g), true)
            out[i, j] = (pred, true)
    return out


def _avalanche():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from avalanche.evaluation.metrics import Accuracy
        from avalanche.evaluation.metrics.forgetting_bwt import Forgetting
    return Accuracy, Forgetting


@pytest.mark.parametrize("decreasing", [False, True])
def test_accuracy_and_forgetting_agree_with_avalanche(decreasing):
    Accuracy, Forgetting = _avalanche()
    T = 4
    preds = _predictions(T, decreasing=decreasing)
    ours = np.zeros((T, T))
    for (i, j), (p, t) in preds.items():
        row = M.accuracy_row(M.confusion_matrix(p, t, 2 * T), [[2 * s, 2 * s + 1] for s in range(T)])
        ours[i, j] = row[j]
        theirs = Accuracy()
        theirs.update(p, t)
        assert ours[i, j] == pytest.approx(theirs.result())
        assert M.accuracy(p, t) == pytest.approx(theirs.result())
    forgetting = Forgetting()
    for i in range(T):
        for j in range(i + 1):
            forgetting.update(j, ours[i, j], initial=(i == j))
    theirs = forgetting.result()
    # Avalanche measures from the accuracy just after learning: our reference="initial"
    initial = M.forgetting_per_session(ours, reference="initial")
    assert [theirs[j] for j in range(T - 1)] == pytest.approx(list(initial))
    if decreasing:  # accuracy only falls, so the maximum is the first value: Chaudhry's forgetting agrees too
        assert M.forgetting(ours) == pytest.approx(np.mean([theirs[j] for j in range(T - 1)]))
    from avalanche.evaluation.functional import forgetting as functional_forgetting

    assert functional_forgetting(ours)[-1, : T - 1] == pytest.approx(list(initial))
