"""Mamba-FSCIL's classifier and losses (methods/mamba_fscil.md §4: 3, 4, 5, 6) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from cil.backbones import create_backbone
from cil.heads import EtfClassifier, dot_regression_loss
from strategies.mamba_fscil import class_sensitive_losses, separation_loss, suppression_loss


def test_3_etf_geometry_is_fixed_and_untrainable():
    etf = EtfClassifier(32, 10, seed=0)
    w = etf.etf
    gram = w.T @ w
    torch.testing.assert_close(gram.diagonal(), torch.ones(10), rtol=0, atol=1e-6)
    off = gram[~torch.eye(10, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -1 / 9), rtol=0, atol=1e-6)
    assert torch.linalg.matrix_rank(w) == 9 and list(etf.parameters()) == [] and "etf" in etf.state_dict()
    x = torch.randn(5, 32, requires_grad=True)
    etf.grow(4)
    logits = etf(x)
    assert logits.shape == (5, 4)
    torch.testing.assert_close(logits, torch.nn.functional.normalize(x, dim=1) @ w[:, :4])
    assert torch.equal(EtfClassifier(32, 10, seed=0).etf, w)  # the seed fixes it (numpy generator, as the code)
    with pytest.raises(ValueError, match="num_features >= 9"):
        EtfClassifier(4, 10)


def test_4_dot_regression_loss_by_hand():
    etf = EtfClassifier(16, 6, seed=1)
    features = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 5])
    x = features / features.norm(dim=1, keepdim=True)
    plain = sum((float(x[i] @ etf.etf[:, y]) - 1.0) ** 2 for i, y in enumerate(labels.tolist())) / 7
    assert dot_regression_loss(features, labels, etf).item() == pytest.approx(10 * 0.5 * plain, rel=1e-5)
    gamma, counts = 7 / 4, {0: 3, 1: 2, 2: 1, 5: 1}  # batch / distinct classes; class counts
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        r = math.sqrt(gamma / counts[y])
        total += (r * float(x[i] @ etf.etf[:, y]) - r) ** 2
    assert dot_regression_loss(features, labels, etf, with_length=True).item() == pytest.approx(
        10 * 0.5 * total / 7, rel=1e-5
    )
    # counts from the gathered batch of every process (here: a second process that saw three more 0s)
    gathered = torch.cat([labels, torch.tensor([0, 0, 0])])
    other = dot_regression_loss(features, labels, etf, with_length=True, all_labels=gathered)
    assert other.item() != pytest.approx(dot_regression_loss(features, labels, etf, with_length=True).item())


def test_5_suppression_is_a_plain_norm_over_the_element_count_and_novel_is_negative():
    gate = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4) - 5
    labels = torch.tensor([0, 7])  # one base (< 5), one novel
    rows = labels < 5
    expected = math.sqrt(sum(v * v for v in gate[0].flatten().tolist())) / 12
    assert suppression_loss(gate, rows).item() == pytest.approx(expected)
    losses = class_sensitive_losses(gate, {}, labels, 5, w_supp=100, w_novel=0.5, w_sep_new=0)
    assert losses["supp_base"].item() == pytest.approx(100 * expected)
    novel = math.sqrt(sum(v * v for v in gate[1].flatten().tolist())) / 12
    assert losses["supp_novel"].item() == pytest.approx(-0.5 * novel)
    only_base = class_sensitive_losses(gate, {}, torch.tensor([0, 1]), 5, w_supp=100, w_novel=0.5, w_sep_new=0)
    assert set(only_base) == {"supp_base"}


def test_6_separation_is_half_the_absolute_cosine_of_base_and_novel_means():
    angle = 2.0  # cos = -0.416
    pb, pn = torch.tensor([1.0, 0.0]), torch.tensor([math.cos(angle), math.sin(angle)])
    # (B, R, L) with R = 2 features, L = 3 tokens; base rows average to pb, novel rows to pn
    param = torch.stack([pb * 0.5, pb * 1.5, pn, pn]).unsqueeze(-1).repeat(1, 1, 3)
    labels = torch.tensor([0, 1, 8, 9])
    base, novel = labels < 5, labels >= 5
    assert separation_loss(param.unsqueeze(1), base, novel).item() == pytest.approx(abs(math.cos(angle)) / 2, rel=1e-5)
    losses = class_sensitive_losses(torch.zeros(4, 2, 3), {"dt": param}, labels, 5, 0, 0, w_sep_new=1e-3)
    assert losses["sep_new_dt"].item() == pytest.approx(1e-3 * abs(math.cos(angle)) / 2, rel=1e-5)
    assert class_sensitive_losses(torch.zeros(2, 2, 3), {"dt": param[:2]}, labels[:2], 5, 0, 0, 1e-3) == {}


def test_resnet12_is_a_timm_model_returning_the_last_feature_map():
    model = create_backbone("resnet12")
    x = torch.randn(2, 3, 32, 32)
    assert model.forward_features(x).shape == (2, 640, 2, 2)
    assert model.forward_features(torch.randn(1, 3, 84, 84)).shape == (1, 640, 5, 5)
    assert model(x).shape == (2, 640) and model.num_features == 640
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert widths == [64, 160, 320, 640]  # the shortcuts of the four stages
    acts = [m for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert acts and all(a.negative_slope == 0.1 for a in acts)
    assert create_backbone("resnet18").forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 512, 2, 2)
