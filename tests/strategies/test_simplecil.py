"""SimpleCIL: prototypes are class means of frozen features; cosine / NCM classification against references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestCentroid
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cil.module import Session
from cil.strategies.simplecil import SimpleCIL


class Features(nn.Module):
    """A fixed random projection standing in for a frozen backbone."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)

    def forward(self, x):
        return self.proj(x)


def data(seed: int, classes: list[int], per_class: int = 15):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat_interleave(per_class)
    x = torch.randn(len(y), 4, generator=g) + 2.0 * torch.nn.functional.one_hot(y % 4, 4).float()
    return x, y


def session(index, new, seen, x, y):
    return Session(index, new, seen, loader_fn=lambda: DataLoader(TensorDataset(x, y), batch_size=7))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_prototypes_and_predictions_match_references(metric):
    torch.manual_seed(0)
    model = SimpleCIL(Features(), metric=metric)
    assert model.epochs_for(session(0, [0, 1], [0, 1], *data(0, [0, 1]))) == 0
    xs, ys = [], []
    for k, classes in enumerate([[0, 1], [2, 3]]):
        x, y = data(k, classes)
        s = session(k, classes, list(range(2 * k + 2)), x, y)
        model.begin_session(s)
        model.end_session(s)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    with torch.no_grad():
        feats = model.backbone(x).double().numpy()
    means = np.stack([feats[y.numpy() == c].mean(0) for c in range(4)])
    np.testing.assert_allclose(model.class_means.means().numpy(), means, rtol=1e-10)

    test_x, _ = data(9, [0, 1, 2, 3])
    with torch.no_grad():
        pred = model(test_x).argmax(1).numpy()
        f = model.backbone(test_x).double().numpy()
    if metric == "euclidean":  # NCM: scikit-learn's nearest centroid on the same features
        reference = NearestCentroid().fit(feats, y.numpy()).predict(f)
    else:
        cos = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
        reference = cos.argmax(1)
    np.testing.assert_array_equal(pred, reference)


def test_backbone_is_frozen_and_old_prototypes_do_not_move():
    model = SimpleCIL(Features())
    assert model.num_trainable_parameters() == 0
    x, y = data(0, [0, 1])
    s0 = session(0, [0, 1], [0, 1], x, y)
    model.begin_session(s0)
    model.end_session(s0)
    before = model.class_means.means().clone()
    x1, y1 = data(1, [2, 3])
    s1 = session(1, [2, 3], [0, 1, 2, 3], x1, y1)
    model.begin_session(s1)
    model.end_session(s1)
    torch.testing.assert_close(model.class_means.means()[:2], before)
    assert model(x).shape == (len(x), 4)


def test_state_dict_of_a_later_session_loads_into_a_fresh_model():
    model = SimpleCIL(Features())
    x, y = data(0, [0, 1, 2])
    s = session(0, [0, 1, 2], [0, 1, 2], x, y)
    model.begin_session(s)
    model.end_session(s)
    fresh = SimpleCIL(Features())
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x))
