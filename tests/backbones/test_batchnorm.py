"""``backbone.bn_group_size``: BatchNorm per group of samples, checked against an explicit loop of plain BatchNorm
layers, one per group, as the GPUs of a data-parallel run without synchronised BatchNorm hold them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cil.backbones.batchnorm import GroupedBatchNorm, group_batch_norm
from cil.config import load_config
from cil.errors import ConfigError
from tests.helpers import CONFIGS


def replicas_reference(bn: nn.Module, x: torch.Tensor, groups: int, weights: torch.Tensor):
    """One plain BatchNorm per group (a GPU each, ``broadcast_buffers=False``); the gradient of the global loss is
    the sum over replicas (DDP averages per-replica means: the mean over all samples). Returns the output, the
    gradients of input, weight and bias, and replica 0's running statistics (what rank 0 saves)."""
    x = x.detach().requires_grad_(True)
    replicas = [copy.deepcopy(bn) for _ in range(groups)]
    out = torch.cat([r(chunk) for r, chunk in zip(replicas, torch.tensor_split(x, groups))])
    (out * weights).sum().backward()
    weight_grad = sum(r.weight.grad for r in replicas)
    bias_grad = sum(r.bias.grad for r in replicas)
    return out.detach(), x.grad, weight_grad, bias_grad, replicas[0]


def grouped_run(bn: nn.Module, x: torch.Tensor, group_size: int, weights: torch.Tensor):
    model = group_batch_norm(nn.Sequential(copy.deepcopy(bn)), group_size)
    layer = model[0]
    assert isinstance(layer, GroupedBatchNorm)
    x = x.detach().requires_grad_(True)
    out = model(x)
    (out * weights).sum().backward()
    return out.detach(), x.grad, layer.weight.grad, layer.bias.grad, layer


def make_bn(cls, channels, momentum=0.1):
    torch.manual_seed(1)
    bn = cls(channels, momentum=momentum)
    with torch.no_grad():  # not the identity: a wrong scale or shift would not hide
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


@pytest.mark.parametrize(
    "cls, shape, group_size, groups, momentum",
    [
        (nn.BatchNorm2d, (32, 3, 5, 5), 8, 4, 0.1),  # full batches: 4 GPUs x 8
        (nn.BatchNorm2d, (20, 3, 4, 4), 8, 3, 0.1),  # a ragged last batch: 7 + 7 + 6
        (nn.BatchNorm2d, (24, 4, 3, 3), 8, 3, None),  # cumulative averages (momentum None)
        (nn.BatchNorm1d, (24, 6), 6, 4, 0.1),  # (N, C) features
        (nn.BatchNorm1d, (12, 5, 7), 4, 3, 0.3),  # (N, C, L)
    ],
)
def test_grouped_equals_one_batchnorm_per_group(cls, shape, group_size, groups, momentum):
    bn = make_bn(cls, shape[1], momentum)
    torch.manual_seed(2)
    x = torch.randn(shape) * 3 + 1
    weights = torch.randn(shape)
    ref_out, ref_dx, ref_dw, ref_db, ref_layer = replicas_reference(bn, x, groups, weights)
    out, dx, dw, db, layer = grouped_run(bn, x, group_size, weights)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(db, ref_db, rtol=1e-4, atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(layer, name), getattr(ref_layer, name), rtol=1e-5, atol=1e-6)
    # the grouping matters: one BatchNorm over the whole batch gives other outputs
    assert not torch.allclose(copy.deepcopy(bn)(x), out, atol=1e-3)


def test_a_second_step_and_evaluation_follow_the_first_replica():
    bn = make_bn(nn.BatchNorm2d, 3)
    replicas = [copy.deepcopy(bn) for _ in range(2)]
    layer = group_batch_norm(nn.Sequential(copy.deepcopy(bn)), 4)[0]
    torch.manual_seed(3)
    for _ in range(2):
        x = torch.randn(8, 3, 2, 2)
        torch.testing.assert_close(layer(x), torch.cat([r(c) for r, c in zip(replicas, x.chunk(2))]))
    layer.eval(), replicas[0].eval()
    x = torch.randn(5, 3, 2, 2)
    torch.testing.assert_close(layer(x), replicas[0](x))


def test_batches_no_larger_than_a_group_are_plain_batchnorm():
    bn = make_bn(nn.BatchNorm2d, 3)
    layer = group_batch_norm(nn.Sequential(copy.deepcopy(bn)), 8)[0]
    x = torch.randn(8, 3, 2, 2)
    torch.testing.assert_close(layer(x), bn(x))
    torch.testing.assert_close(layer.running_var, bn.running_var)


def test_state_dict_is_batchnorms_and_frozen_parameters_stay_frozen():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), make_bn(nn.BatchNorm2d, 4), nn.ReLU(), nn.BatchNorm2d(4))
    model[1].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    group_batch_norm(model, 4)
    assert [type(m).__name__ for m in model] == ["Conv2d", "GroupedBatchNorm", "ReLU", "GroupedBatchNorm"]
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert not model[1].weight.requires_grad and model[1].bias.requires_grad
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    plain.load_state_dict(model.state_dict())  # checkpoints load either way


def test_bad_settings_are_one_clear_error():
    with pytest.raises(ConfigError, match="no BatchNorm layer"):
        group_batch_norm(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), 8)
    with pytest.raises(ConfigError, match="at least 2"):
        group_batch_norm(nn.Sequential(nn.BatchNorm2d(2)), 1)
    from timm.layers import BatchNormAct2d

    with pytest.raises(ConfigError, match="BatchNormAct2d"):
        group_batch_norm(nn.Sequential(BatchNormAct2d(4)), 8)


@pytest.mark.parametrize(
    "config, grouped", [("cifar100_fscil", 64), ("miniimagenet_fscil", 64), ("cub200_fscil", None)]
)
def test_mamba_fscil_paper_backbones_group_as_the_official_gpus(config, grouped):
    """CIFAR-100 and miniImageNet: ResNet-12 with plain BatchNorm on 8 GPUs x 64 (groups of 64); CUB: SyncBN over
    the whole batch (no grouping)."""
    from cil.module import create_strategy

    cfg = load_config(CONFIGS / "mamba_fscil" / f"{config}.yaml", ["backbone.pretrained=false"])
    strategy = create_strategy(cfg)
    norms = [m for m in strategy.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms
    if grouped is None:
        assert not any(isinstance(m, GroupedBatchNorm) for m in norms)
    else:
        assert all(isinstance(m, GroupedBatchNorm) and m.group_size == grouped for m in norms)
    assert int(cfg.stream.batch_size) == 512
