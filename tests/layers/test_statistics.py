"""Per-class Gaussians for classifier alignment: the three MOS storages against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from cil.layers.statistics import ClassGaussians


def features(seed=0, classes=3, per_class=40, d=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(per_class, d, generator=g) * (c + 1) + 3 * c for c in range(classes)])
    return x.double(), torch.arange(classes).repeat_interleave(per_class)


def feed(stats, x, y, chunk=7, seed=0, shuffle=True):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(y))
    for i in range(0, len(y), chunk):
        part = order[i : i + chunk]
        stats.update(x[part], y[part])
    return stats.finalize()


def test_covariance_storage_equals_torch_cov_plus_ridge():
    x, y = features()
    stats = ClassGaussians(6, "covariance")
    assert feed(stats, x, y) == [0, 1, 2]
    for c in range(3):
        torch.testing.assert_close(stats.means[c, 0], x[y == c].mean(0))
        assert stats.spread.dtype == torch.float32  # computed in float64, stored in float32
        expected = torch.cov(x[y == c].T) + 1e-4 * torch.eye(6, dtype=torch.float64)
        torch.testing.assert_close(stats.spread[c].double(), expected, rtol=1e-6, atol=1e-6)


def test_pending_sums_cover_only_the_classes_being_added():
    """Classes 198 and 199 after 198 others: two rows of pending sums, not 200 (at d = 768 the outer-product
    sums are 4.7 MB per class), and statistics equal torch.cov."""
    x, y = features(classes=2, d=6)
    stats = ClassGaussians(6)
    stats.grow(198)
    stats.update(x, y + 198)
    assert stats._pending["outer"].shape == (2, 6, 6) and stats.num_classes == 200
    assert stats.finalize() == [198, 199]
    for c in (0, 1):
        expected = torch.cov(x[y == c].T) + 1e-4 * torch.eye(6, dtype=torch.float64)
        torch.testing.assert_close(stats.spread[198 + c].double(), expected, rtol=1e-6, atol=1e-6)
    assert not stats._pending and stats.counts[:198].sum() == 0


def test_covariance_at_mos_scale_is_float32_and_matches_torch_cov():
    """d = 768, features of a ViT's scale (mean far from zero): sums in float64 keep the covariance exact."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300, 768, generator=g) * 0.5 + 4.0).double()
    stats = ClassGaussians(768)
    for i in range(0, 300, 48):
        stats.update(x[i : i + 48], torch.zeros(len(x[i : i + 48]), dtype=torch.long))
    stats.finalize()
    expected = torch.cov(x.T) + 1e-4 * torch.eye(768, dtype=torch.float64)
    torch.testing.assert_close(stats.spread[0].double(), expected, rtol=1e-5, atol=1e-6)
    stats.sample(2, torch.Generator().manual_seed(0))
    assert stats._factors[0][0][1].dtype == torch.float32


def test_variance_storage_is_the_diagonal():
    x, y = features()
    stats = ClassGaussians(6, "variance")
    feed(stats, x, y)
    for c in range(3):
        torch.testing.assert_close(stats.spread[c, 0], torch.diag(torch.cov(x[y == c].T) + 1e-4 * torch.eye(6)))


def test_multi_centroid_storage_follows_kmeans():
    x, y = features(per_class=60)
    stats = ClassGaussians(6, "multi-centroid", n_centroids=4, seed=3)
    feed(stats, x, y, shuffle=False)  # k-means sees each class's rows in data order, as in the MOS code
    for c in range(3):
        data = x[y == c].numpy()
        labels = KMeans(n_clusters=4, n_init="auto", random_state=3).fit(data).labels_
        for i in range(4):
            np.testing.assert_allclose(stats.means[c, i].numpy(), data[labels == i].mean(0))
            np.testing.assert_allclose(stats.spread[c, i].numpy(), data[labels == i].var(0))


@pytest.mark.parametrize("storage", ["covariance", "variance", "multi-centroid"])
def test_samples_follow_the_stored_gaussians(storage):
    x, y = features(classes=2, per_class=200)
    stats = ClassGaussians(6, storage, n_centroids=2)
    feed(stats, x, y)
    samples, labels = stats.sample(20_000, torch.Generator().manual_seed(0))
    components = 2 if storage == "multi-centroid" else 1
    assert samples.dtype == torch.float32 and (labels == 1).sum() == 20_000 * components
    for c in range(2):
        drawn = samples[labels == c].double()
        # every centroid gets the same number of samples (as in MOS), so the mean is that of the centroids
        expected = stats.means[c].mean(0) if storage == "multi-centroid" else x[y == c].mean(0)
        torch.testing.assert_close(drawn.mean(0), expected, atol=0.08 * (c + 1), rtol=0)
        if storage == "covariance":
            torch.testing.assert_close(torch.cov(drawn.T), torch.cov(x[y == c].T), atol=0.1 * (c + 1) ** 2, rtol=0.05)


def test_later_sessions_add_classes_and_keep_earlier_ones():
    x, y = features(classes=4)
    stats = ClassGaussians(6)
    feed(stats, x[y < 2], y[y < 2])
    before = stats.spread[:2].clone()
    assert feed(stats, x[y >= 2], y[y >= 2]) == [2, 3]
    assert torch.equal(stats.spread[:2], before)
    with pytest.raises(ValueError, match=r"classes \[1\] already have statistics"):
        stats.update(x[y == 1], y[y == 1])


def test_checkpoint_roundtrip():
    x, y = features()
    stats = ClassGaussians(6)
    feed(stats, x, y)
    fresh = ClassGaussians(6)
    fresh.load_state_dict(stats.state_dict())
    a = stats.sample(5, torch.Generator().manual_seed(1))
    b = fresh.sample(5, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_storage():
    with pytest.raises(ValueError, match="storage='full' is not valid"):
        ClassGaussians(6, "full")


def _reduce_worker(rank, world, port, storage, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = features(per_class=60)
        half = slice(0, 90) if rank == 0 else slice(90, None)  # contiguous halves: data order kept across ranks
        stats = ClassGaussians(6, storage, n_centroids=3)
        stats.update(x[half], y[half])
        stats.all_reduce().finalize()
        torch.save(stats.state_dict(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("storage", ["covariance", "multi-centroid"])
def test_all_reduce_in_two_gloo_processes_equals_one_process(storage, tmp_path):
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    mp.spawn(_reduce_worker, args=(2, free_port(), storage, str(tmp_path)), nprocs=2)
    x, y = features(per_class=60)
    single = ClassGaussians(6, storage, n_centroids=3)
    single.update(x, y)
    single.finalize()
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        for key, value in single.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-9)
