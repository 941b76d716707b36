"""StreamingLDA against scikit-learn's LDA, the official FSA head and Deep SLDA's formula."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.datasets import load_digits, make_classification
from sklearn.decomposition import PCA
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

import cil.layers.lda
from cil.layers.lda import StreamingLDA
from tests.helpers import free_port, official_fsa_head


def blobs(n_per_class, d, seed=0, offset=0.0):
    """Gaussian classes with distinct means and a shared random correlation."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    xs = [rng.normal(size=(n, d)) @ mix + 2 * rng.normal(size=d) + offset for n in n_per_class]
    return np.concatenate(xs), np.repeat(np.arange(len(n_per_class)), n_per_class)


def digits_features():
    x, y = load_digits(return_X_y=True)
    return PCA(20, random_state=0).fit_transform(x), y


DATASETS = {
    "blobs-d8-k3": lambda: blobs([5, 9, 14], 8),
    "blobs-d32-k5": lambda: blobs([20, 7, 12, 30, 9], 32, seed=1),
    "classification-d16-k4": lambda: make_classification(
        300, 16, n_informative=8, n_classes=4, n_clusters_per_class=1, random_state=0
    ),
    "digits-pca20": digits_features,
}


def sklearn_scores(x, y, shrinkage, priors="frequency"):
    k = len(np.unique(y))
    lda = LinearDiscriminantAnalysis(
        solver="lsqr",
        shrinkage=shrinkage if shrinkage else None,
        priors=None if priors == "frequency" else np.full(k, 1.0 / k),
    )
    return lda.fit(x, y).decision_function(x)


def feed(head, x, y, order, chunk):
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        head.update(torch.from_numpy(x[part]), torch.from_numpy(y[part]))
    return head


def scores(head, x):
    return head.logits(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("dataset", sorted(DATASETS))
@pytest.mark.parametrize("shrinkage", [0.0, 0.1, 0.5, 0.9])
def test_equals_sklearn_in_any_order_and_chunking(dataset, shrinkage):
    x, y = DATASETS[dataset]()
    expected = sklearn_scores(x, y, shrinkage)
    rng = np.random.default_rng(0)
    orders = {
        "shuffled, random chunks": (rng.permutation(len(y)), int(rng.integers(2, 40))),
        "classes one by one": (np.argsort(y, kind="stable"), 7),
        "batch size 1": (rng.permutation(len(y)), 1),
        "one batch": (np.arange(len(y)), len(y)),
    }
    for name, (order, chunk) in orders.items():
        head = feed(StreamingLDA(x.shape[1], mode="sklearn", shrinkage=shrinkage), x, y, order, chunk)
        np.testing.assert_allclose(scores(head, x), expected, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("shrinkage", [0.0, 0.3, 0.8])
def test_uniform_priors_equal_sklearn_with_uniform_priors(shrinkage):
    x, y = blobs([4, 25, 11, 40], 12, seed=3)  # unbalanced: uniform and frequency priors differ
    head = feed(StreamingLDA(12, mode="sklearn", shrinkage=shrinkage, priors="uniform"), x, y, np.arange(len(y)), 9)
    np.testing.assert_allclose(scores(head, x), sklearn_scores(x, y, shrinkage, "uniform"), atol=1e-5, rtol=0)
    frequency = StreamingLDA(12, mode="sklearn", shrinkage=shrinkage).update(torch.from_numpy(x), torch.from_numpy(y))
    assert np.abs(scores(frequency, x) - scores(head, x)).max() > 1e-2  # the option changes the answer


def test_more_features_than_samples_is_finite_and_still_exact():
    x, y = blobs([2, 2, 2, 2], 64, seed=4)  # d=64 > N=8
    head = StreamingLDA(64, mode="sklearn", shrinkage=0.5).update(torch.from_numpy(x), torch.from_numpy(y))
    assert np.isfinite(scores(head, x)).all()
    np.testing.assert_allclose(scores(head, x), sklearn_scores(x, y, 0.5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["sklearn", "fsa", "slda"])
def test_one_sample_per_class_never_gives_nan(mode):
    """W = 0: scikit-learn's minimum-norm answer is coef = 0 (sklearn itself refuses n_samples == n_classes)."""
    x, y = blobs([1, 1, 1, 1], 64, seed=5)
    head = StreamingLDA(64, mode=mode).update(torch.from_numpy(x), torch.from_numpy(y))
    logits = scores(head, x)
    assert np.isfinite(logits).all()
    if mode == "sklearn":
        np.testing.assert_array_equal(head.coef_.numpy(), 0.0)
        np.testing.assert_allclose(logits, np.log(0.25))


@pytest.mark.parametrize("sizes", [[5, 9, 14], [3, 3, 3, 3, 3], [1]])
def test_fsa_mode_equals_the_official_head(sizes):
    x, y = blobs(sizes, 10, seed=6)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    head = feed(StreamingLDA(10, mode="fsa"), x, y, np.random.default_rng(0).permutation(len(y)), 4)
    expected = official_fsa_head(xt, yt, len(sizes))(xt)
    torch.testing.assert_close(head.logits(xt), expected, atol=1e-6, rtol=0)


def test_slda_mode_equals_deep_slda_formula():
    """Hayes & Kanan: Lambda = pinv((1 - eps) Sigma_w + eps I), scores = x Lambda mu - 1/2 diag(mu^T Lambda mu)."""
    x, y = blobs([6, 10, 8], 12, seed=7)
    head = feed(StreamingLDA(12, mode="slda"), x, y, np.arange(len(y))[::-1].copy(), 5)
    means = np.stack([x[y == k].mean(0) for k in range(3)])
    centred = x - means[y]
    sigma_w = centred.T @ centred / len(y)
    precision = np.linalg.pinv((1 - 1e-4) * sigma_w + 1e-4 * np.eye(12))
    expected = x @ precision @ means.T - 0.5 * np.einsum("kd,de,ke->k", means, precision, means)
    np.testing.assert_allclose(scores(head, x), expected, atol=1e-6, rtol=1e-9)


def state(head):
    return {k: v.clone() for k, v in head.state_dict().items()}


def assert_same_state(a, b, tol=1e-10):
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=tol, rtol=tol, msg=key)


@pytest.mark.parametrize("priors", ["frequency", "uniform"])
def test_merge_of_parts_equals_one_head_in_any_fold_order(priors):
    x, y = blobs([12, 7, 20, 9], 16, seed=8)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    whole = StreamingLDA(16, priors=priors).update(xt, yt)
    parts = np.array_split(np.random.default_rng(1).permutation(len(y)), 3)

    def make(i):
        return StreamingLDA(16, priors=priors).update(xt[parts[i]], yt[parts[i]])

    assert_same_state(make(0).merge(make(1)), make(1).merge(make(0)))  # commutative
    for fold in itertools.permutations(range(3)):
        merged = make(fold[0])
        for i in fold[1:]:
            merged.merge(make(i))
        assert_same_state(merged, whole)
    np.testing.assert_allclose(scores(merged, x), scores(whole, x), atol=1e-8)


def test_class_incremental_sessions_equal_joint_fit_and_keep_earlier_rows():
    x, y = blobs([10, 10, 10, 10, 10], 8, seed=9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    first, second = y < 3, y >= 3
    head = StreamingLDA(8).update(xt[first], yt[first])
    rows_before = head.means.clone()
    assert head.num_classes == 3
    head.update(xt[second], yt[second])
    assert head.num_classes == 5
    torch.testing.assert_close(head.means[:3], rows_before, atol=0, rtol=0)
    assert_same_state(head, StreamingLDA(8).update(xt, yt))


def test_large_offsets_do_not_cancel():
    """Features far from the origin (offset 1e6): the Chan update keeps the scatter exact, raw moments would not."""
    x, y = blobs([50, 60, 70], 6, seed=10, offset=1e6)
    head = feed(StreamingLDA(6), x, y, np.random.default_rng(0).permutation(len(y)), 16)
    means = np.stack([x[y == k].mean(0) for k in range(3)])
    expected = (x - means[y]).T @ (x - means[y])  # two-pass, centred: the accurate value
    np.testing.assert_allclose(head.scatter.numpy(), expected, rtol=1e-7, atol=1e-7 * np.abs(expected).max())
    raw = x.T @ x - sum(np.outer(x[y == k].sum(0), x[y == k].sum(0)) / (y == k).sum() for k in range(3))
    assert np.abs(raw - expected).max() > 100 * np.abs(head.scatter.numpy() - expected).max()


def test_unseen_class_ids_score_minus_infinity():
    x, y = blobs([5, 5], 4, seed=11)
    head = StreamingLDA(4).update(torch.from_numpy(x), torch.from_numpy(y * 2))  # ids 0 and 2
    logits = scores(head, x)
    assert head.num_classes == 3 and head.classes.tolist() == [0, 2]
    assert np.isneginf(logits[:, 1]).all() and np.isfinite(logits[:, [0, 2]]).all()


def test_solve_is_cached_until_the_statistics_change(monkeypatch):
    calls = []
    real = cil.layers.lda._solve_symmetric
    monkeypatch.setattr(cil.layers.lda, "_solve_symmetric", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = blobs([5, 5, 5], 6, seed=12)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    head = StreamingLDA(6, shrinkage=0.1)
    for chunk in range(3):
        head.update(xt[chunk::3], yt[chunk::3])
    for _ in range(5):
        head.logits(xt)
    assert len(calls) == 1
    head.update(xt[:2], yt[:2])
    head.logits(xt)
    assert len(calls) == 2


def test_checkpoint_roundtrip_and_dtype(tmp_path):
    x, y = blobs([5, 8, 6], 6, seed=13)
    head = StreamingLDA(6, shrinkage=0.2).update(torch.from_numpy(x), torch.from_numpy(y))
    torch.save(head.state_dict(), tmp_path / "head.pt")
    fresh = StreamingLDA(6, shrinkage=0.2)  # no classes yet: loading adopts the saved sizes
    fresh.load_state_dict(torch.load(tmp_path / "head.pt"))
    np.testing.assert_array_equal(scores(fresh, x), scores(head, x))
    head.float()  # a model-wide cast must not downcast the statistics
    assert all(b.dtype == torch.float64 for b in head.buffers())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shrinkage": -0.1}, "shrinkage=-0.1 is out of range"),
        ({"shrinkage": 1.5}, "shrinkage=1.5 is out of range"),
        ({"mode": "qda"}, "mode='qda' is not valid"),
        ({"priors": "equal"}, "priors='equal' is not valid"),
        ({"mode": "sklearn", "priors": "none"}, "priors='none' is not valid with mode='sklearn'"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StreamingLDA(4, **kwargs)


def test_bad_batches_name_the_problem():
    head = StreamingLDA(4)
    with pytest.raises(ValueError, match=r"features must have shape \(batch, 4\)"):
        head.update(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        head.update(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class ids"):
        head.update(torch.zeros(3, 4), torch.zeros(3))
    with pytest.raises(RuntimeError, match="seen no data"):
        head.logits(torch.zeros(1, 4))


def _reduce_worker(rank, world, port, x, y, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = slice(rank, None, world)  # interleaved shards; rank 1 also sees a class rank 0 never does
        keep = (y[mine] != 3) if rank == 0 else torch.ones_like(y[mine], dtype=torch.bool)
        head = StreamingLDA(x.shape[1], priors="uniform").update(x[mine][keep], y[mine][keep])
        head.all_reduce()
        torch.save({k: v for k, v in head.state_dict().items()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_in_two_gloo_processes_equals_one_process(tmp_path):
    x, y = (torch.from_numpy(a) for a in blobs([9, 12, 7, 10], 8, seed=14))
    mp.spawn(_reduce_worker, args=(2, free_port(), x, y, str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    drop = torch.zeros_like(y, dtype=torch.bool)
    drop[0::2] = y[0::2] == 3
    single = StreamingLDA(8, priors="uniform").update(x[~drop], y[~drop])
    for key, value in single.state_dict().items():
        torch.testing.assert_close(rank0[key], rank1[key], atol=0, rtol=0)  # identical on every process
        torch.testing.assert_close(rank0[key], value, atol=1e-10, rtol=1e-10)
