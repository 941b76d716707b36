"""The strategy contract: growing head, shape-adopting loads, joint's data, create_strategy."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from cil.layers.growing import GrowingClassifier
from cil.module import Session, create_strategy
from cil.strategies.finetune import Finetune
from cil.strategies.joint import Joint
from tests.helpers import tiny_config


def test_growing_classifier_keeps_trained_rows():
    torch.manual_seed(0)
    head = GrowingClassifier(5)
    head.grow(2)
    old_w, old_b = head.weight.detach().clone(), head.bias.detach().clone()
    head.grow(4)
    assert head.weight.shape == (4, 5) and head.num_classes == 4
    torch.testing.assert_close(head.weight[:2].detach(), old_w)
    torch.testing.assert_close(head.bias[:2].detach(), old_b)
    head.grow(3)  # never shrinks
    assert head.num_classes == 4


def test_finetune_begin_session_grows_to_seen_classes_and_loads_bigger_state():
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    model = Finetune(backbone, num_features=3)
    model.begin_session(Session(0, [0, 1], [0, 1]))
    assert model(torch.randn(2, 4)).shape == (2, 2)
    model.begin_session(Session(1, [2, 3, 4], [0, 1, 2, 3, 4]))
    assert model(torch.randn(2, 4)).shape == (2, 5)
    fresh = Finetune(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), num_features=3)
    fresh.load_state_dict(model.state_dict())  # the head adopts the saved size
    x = torch.randn(3, 4)
    torch.testing.assert_close(fresh(x), model(x))


def test_joint_trains_on_every_session_seen_so_far():
    sets = [TensorDataset(torch.randn(n, 4), torch.zeros(n, dtype=torch.long)) for n in (3, 5, 7)]
    model = Joint(nn.Linear(4, 2), num_features=2)
    data = model.train_data(Session(2, [2], [0, 1, 2], train_data=sets[2], seen_train_data=sets))
    assert len(data) == 15
    assert (
        Finetune(nn.Linear(4, 2), num_features=2).train_data(Session(2, [2], [0, 1, 2], train_data=sets[2])) is sets[2]
    )


def test_create_strategy_from_config(tmp_path):
    cfg = tiny_config("finetune", tmp_path, "strategy.lr=0.123", "strategy.optimizer=adamw")
    strategy = create_strategy(cfg)
    assert isinstance(strategy, Finetune)
    assert strategy.hparams.lr == 0.123 and strategy.num_features == strategy.backbone.num_features
    strategy.begin_session(Session(0, [0, 1], [0, 1]))
    assert strategy(torch.randn(2, 3, 16, 16)).shape == (2, 2)


def test_growing_classifier_trunc_normal_init_keeps_trained_rows():

    torch.manual_seed(0)
    head = GrowingClassifier(768, init="trunc_normal")
    head.grow(50)
    first = head.weight.detach().clone()
    head.grow(100)
    assert torch.equal(head.weight[:50], first) and torch.equal(head.bias, torch.zeros(100))
    assert head.weight.std().item() == pytest.approx(0.02, rel=0.05)  # PILOT's SimpleContinualLinear
    plain = GrowingClassifier(768)
    plain.grow(100)
    assert plain.bias.abs().max() > 0  # nn.Linear's init: uniform biases
    with pytest.raises(ValueError, match="init='xavier' is not valid"):
        GrowingClassifier(8, init="xavier")


def test_accuracy_row_predicts_with_forward_when_features_are_not_reused():
    """A strategy whose ``forward`` is not ``classify(features(x))`` (MOS's retrieval) is scored by its forward, as
    the session loop's evaluator scores it: accuracy_row once used features/classify and gave MOS other numbers."""
    from cil.module import CILModule, accuracy_row

    class Flipped(CILModule):
        def forward(self, x):
            return -super().forward(x)  # the opposite prediction of classify(features(x)) for two classes

    torch.manual_seed(0)
    strategy = Flipped(nn.Linear(4, 3), num_features=3)
    strategy.classifier.grow(2)
    x = torch.randn(64, 4)
    y = strategy(x).argmax(1)  # labels the forward gets right
    assert accuracy_row(strategy, [TensorDataset(x, y)], batch_size=16) == [1.0]


def test_a_training_step_logs_under_fabric_and_not_in_a_bare_loop(tmp_path, recwarn):
    """``logs_this_step`` outside a Trainer: under Lightning Fabric every step is logged (Fabric writes each call);
    in a bare loop nothing is (``self.log`` would only warn that no Trainer is attached)."""
    import pandas as pd
    from lightning_fabric import Fabric
    from lightning_fabric.loggers import CSVLogger

    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    model = Finetune(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), num_features=3)
    model.begin_session(Session(0, [0, 1], [0, 1]))
    assert not model.logs_this_step()
    model.training_step(batch, 0)
    assert not [w for w in recwarn if "self.log" in str(w.message)]

    fabric = Fabric(accelerator="cpu", devices=1, loggers=CSVLogger(tmp_path, name="fabric"))
    model = fabric.setup(model)
    assert model.logs_this_step()
    for step in range(3):
        model.training_step(batch, step)
    fabric.logger.finalize("success")
    logged = pd.read_csv(next(tmp_path.glob("fabric/*/metrics.csv")))
    # Fabric writes each self.log call as a row of its own: two values per step
    assert logged["train/loss"].notna().sum() == 3 and logged["train/acc"].notna().sum() == 3
