"""The training loader keeps every sample, as the official codes' ``DataLoader(drop_last=False)`` do."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from cil.loaders import EveryItemBatchSampler, train_loader
from tests.helpers import tiny_config


def indices(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n))


def batches(loader) -> list[list[int]]:
    return [batch[0].tolist() for batch in loader]


def test_dkvb_cifar100_task_is_four_steps_over_every_sample(tmp_path):
    """A CIFAR-100 DKVB task: 1,000 samples at batch 256 is 4 steps per epoch, the last of 232 (not 3 steps that
    skip 232 samples each epoch)."""
    cfg = tiny_config("dkvb", tmp_path, "stream.batch_size=256")
    loader = train_loader(indices(1000), cfg, session=0)
    got = batches(loader)
    assert [len(b) for b in got] == [256, 256, 256, 232] and len(loader) == 4
    assert sorted(sum(got, [])) == list(range(1000))


def test_a_last_batch_of_one_joins_the_batch_before(tmp_path):
    cfg = tiny_config("finetune", tmp_path, "stream.batch_size=4")
    got = batches(train_loader(indices(9), cfg, session=0))
    assert [len(b) for b in got] == [4, 5] and sorted(sum(got, [])) == list(range(9))
    got = batches(train_loader(indices(10), cfg, session=0))  # a last batch of two stays as it is
    assert [len(b) for b in got] == [4, 4, 2]


def test_drop_last_option_drops_the_ragged_batch(tmp_path):
    cfg = tiny_config("finetune", tmp_path, "stream.batch_size=256", "stream.drop_last=true")
    assert [len(b) for b in batches(train_loader(indices(1000), cfg, session=0))] == [256, 256, 256]


@pytest.mark.parametrize("n", range(0, 14))
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_batch_sampler_length_and_coverage(n, size):
    for drop_last in (False, True):
        sampler = EveryItemBatchSampler(range(n), size, drop_last)
        got = list(sampler)
        assert len(got) == len(sampler)
        if not drop_last:
            assert sum(got, []) == list(range(n))
            assert size == 1 or n == 1 or min(map(len, got), default=2) >= 2


class BatchNormModel(pl.LightningModule):
    """A BatchNorm1d on features: the layer that raises on a batch of one in training mode."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        self.seen = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen += len(y)
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trains_batchnorm_on_every_sample(tmp_path):
    data = TensorDataset(torch.randn(9, 3), torch.randint(0, 2, (9,)))
    trainer_kwargs = dict(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # what a plain loader would do
        pl.Trainer(**trainer_kwargs).fit(BatchNormModel(), DataLoader(data, batch_size=4))
    model = BatchNormModel()
    cfg = tiny_config("finetune", tmp_path, "stream.batch_size=4")
    pl.Trainer(**trainer_kwargs).fit(model, train_loader(data, cfg, session=0))
    assert model.seen == 9


def test_ddp_shares_are_disjoint_padded_and_keep_the_folding(tmp_path, monkeypatch):
    """Under DDP the sampler shards itself (the session loop turns Lightning's replacement off): each rank takes
    every world-th index of the same epoch permutation, padded to equal shares as DistributedSampler does, and
    the batch sampler still folds a last batch of one."""
    import cil.distributed as distributed

    cfg = tiny_config("finetune", tmp_path, "stream.batch_size=4")
    shares = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for rank in range(2):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        got = batches(train_loader(indices(18), cfg, session=0))
        assert [len(b) for b in got] == [4, 5]  # 9 per rank: the ninth joins the second batch
        shares.append(sum(got, []))
    assert set(shares[0]).isdisjoint(shares[1]) and set(shares[0]) | set(shares[1]) == set(range(18))
    padded = [batches(train_loader(indices(7), cfg, session=0))]
    assert sum(len(b) for b in padded[0]) == 4  # ceil(7 / 2): the shorter share is padded


def test_per_item_seeding_draws_what_seeding_everything_drew(tmp_path):
    """``SeededItems`` seeds only the CPU generators an augmentation reads (not every device's, which costs 10x):
    the augmented items are the very tensors that a full ``seed_all`` per item gave, so runs and resumes written
    before the change replay exactly."""
    import random

    import numpy as np
    import torchvision.transforms as T

    from cil.loaders import SeededItems, derived_seed, seed_all

    class Augmented(torch.utils.data.Dataset):  # torch's generator (crops, flips), Python's and NumPy's
        crop = T.Compose([T.RandomResizedCrop(8), T.RandomHorizontalFlip()])

        def __len__(self):
            return 6

        def __getitem__(self, i):
            x = self.crop(torch.arange(3 * 16 * 16, dtype=torch.float32).reshape(3, 16, 16) + i)
            return x + random.random() + float(np.random.rand()), i

    data = Augmented()
    items = SeededItems(data, seed=3, session=1)
    for epoch in (0, 2):
        for i in range(len(data)):
            seed_all(derived_seed(3, 1, epoch, i))
            expected = data[i][0]
            torch.manual_seed(99), random.seed(99), np.random.seed(99)  # whatever came before does not matter
            assert torch.equal(items[(epoch, i)][0], expected)
    assert not torch.equal(items[(0, 1)][0], items[(2, 1)][0])  # other epochs draw other augmentations
