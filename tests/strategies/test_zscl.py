"""ZSCL's building blocks (methods/zscl.md §5) against hand computations and the official stored result matrix."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cil import metrics as M
from strategies.zscl import (
    WeightEnsemble,
    distillation_loss,
    read_captions,
    text_classifier,
    warmup_cosine,
    weight_constraint,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "zscl"


def test_kd_function_by_hand_and_its_fixed_point():
    t = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    z = torch.tensor([[0.0, 1.0, 0.0], [2.0, -1.0, 0.0]])
    T = 2.0
    expected = 0.0
    for i in range(2):
        p = [math.exp(v / T) for v in t[i].tolist()]
        p = [v / sum(p) for v in p]
        q = [math.exp(v / T) for v in z[i].tolist()]
        logq = [math.log(v / sum(q)) for v in q]
        expected += -sum(a * b for a, b in zip(p, logq))
    assert distillation_loss(t, z, T).item() == pytest.approx(T**2 * expected / 2, rel=1e-6)
    # at the fixed point (student = teacher) the gradient vanishes: the loss is the teacher's entropy, a minimum
    s = t.clone().requires_grad_()
    distillation_loss(t, s, T).backward()
    assert s.grad.abs().max() < 1e-7
    # the text side is the same function on the transposed logits: one distribution per caption over the images
    images, captions = torch.randn(4, 6), torch.randn(4, 6)
    assert distillation_loss(images.T, captions.T).shape == ()


def test_weight_constraint_value_and_gradient():
    model = nn.Linear(3, 2)
    anchors = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.weight.add_(0.5)
    loss = weight_constraint(model.parameters(), anchors)
    assert loss.item() == pytest.approx(6 * 0.25)  # a sum over all 6 weights, not a mean
    loss.backward()
    torch.testing.assert_close(model.weight.grad, torch.full((2, 3), 1.0))  # 2 (θ - θ_start)
    torch.testing.assert_close(model.bias.grad, torch.zeros(2))


def test_weight_ensemble_is_the_uniform_mean_with_the_task_start():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ensemble = WeightEnsemble()
    ensemble.start(model)
    seen = [1.0]
    for k in range(0, 1001):  # the code's loop: k = 0 .. 1000, folding in at k % 100 == 0
        with torch.no_grad():
            model.weight.fill_(float(k + 2))  # "the weights after the step at iteration k"
        if k % 100 == 0:
            ensemble.update(model)
            seen.append(float(k + 2))
    assert ensemble.count == 11 and len(seen) == 12
    torch.testing.assert_close(ensemble.mean[0], torch.full((1, 2), sum(seen) / 12))  # (θ_start + Σ θ^(100j)) / 12
    ensemble.copy_to(model)
    torch.testing.assert_close(model.weight, torch.full((1, 2), sum(seen) / 12))


def test_lr_schedule_values():
    W, K = 100, 1001
    assert warmup_cosine(0, W, K) == pytest.approx(1 / W)
    assert warmup_cosine(W - 1, W, K) == pytest.approx(1.0)
    assert warmup_cosine(W, W, K) == pytest.approx(1.0)
    assert warmup_cosine((W + K) // 2, W, K) == pytest.approx(0.5 * (1 + math.cos(math.pi * 450 / 901)))
    assert warmup_cosine(K, W, K) == pytest.approx(0.0, abs=1e-12)


def test_mtil_metrics_on_a_hand_matrix_and_the_official_result_matrix():
    R = np.array([[0.5, 0.3, 0.1], [0.4, 0.8, 0.2], [0.3, 0.7, 0.9]])
    assert M.mtil_transfer(R) == pytest.approx((0.3 + (0.1 + 0.2) / 2) / 2)
    assert M.mtil_avg(R) == pytest.approx(R.mean()) and M.mtil_last(R) == pytest.approx(np.mean([0.3, 0.7, 0.9]))
    stored = np.load(DATA / "t3_7.npy").reshape(11, 12)
    order_one = np.delete(stored, 2, axis=1)  # results.ipynb drops the CIFAR10 column
    figures = (M.mtil_transfer(order_one), M.mtil_avg(order_one), M.mtil_last(order_one))
    assert [round(v, 2) for v in figures] == [68.14, 75.39, 83.62]  # the paper's ZSCL row, MTIL order I


def test_text_classifier_averages_normalised_template_embeddings():
    vocabulary = {}

    def tokenize(texts):
        return torch.tensor([vocabulary.setdefault(t, len(vocabulary)) for t in texts])

    table = torch.randn(20, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)

    def encode_text(tokens):
        return table[tokens] * 3.0  # not unit length: the classifier normalises

    names, templates = ["cat", "dog"], ["a photo of a {}.", "a drawing of a {}."]
    W = text_classifier(encode_text, tokenize, names, templates)
    assert W.shape == (2, 8)
    torch.testing.assert_close(W.norm(dim=1), torch.ones(2))
    expected = torch.nn.functional.normalize(
        torch.nn.functional.normalize(
            table[[vocabulary["a photo of a cat."], vocabulary["a drawing of a cat."]]], dim=1
        ).mean(0),
        dim=0,
    )
    torch.testing.assert_close(W[0], expected)
    W.sum().backward()
    assert table.grad.abs().sum() > 0  # the text tower trains through the classifier
    one = text_classifier(encode_text, tokenize, names, templates[:1])  # training: template 0 only
    torch.testing.assert_close(one[1], torch.nn.functional.normalize(table[vocabulary["a photo of a dog."]], dim=0))


def test_reference_captions_from_a_text_file_or_the_cc_tsv(tmp_path):
    from cil.config import ConfigError

    plain = tmp_path / "captions.txt"
    plain.write_text("a dog on a beach\n\n  a red car  \n")
    assert read_captions(plain) == ["a dog on a beach", "a red car"]
    tsv = tmp_path / "Validation_GCC-1.1.0-Validation.tsv"
    tsv.write_text("a man riding a horse\thttp://x/1.jpg\nsunset over the sea\thttp://x/2.jpg\n")
    assert read_captions(tsv) == ["a man riding a horse", "sunset over the sea"]
    with pytest.raises(ConfigError, match="not found"):
        read_captions(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no caption"):
        read_captions(empty)
