"""Mamba-FSCIL's selective-SSM projector (docs/methods/mamba_fscil.md §4: 1, 2, 7, 8, 9) on tiny shapes."""

from __future__ import annotations

import pytest
import torch

from cil.layers.ssm import DualSelectiveProjector, FourDirectionSSM, SelectiveSSM

B, C_IN, C_OUT, N, R = 6, 16, 8, 4, 4


def projector(size=(2, 2), **kwargs) -> DualSelectiveProjector:
    torch.manual_seed(0)
    return DualSelectiveProjector(C_IN, C_OUT, size, d_state=N, dt_rank=R, residual_proj=True, **kwargs)


def feature_map(size=(2, 2)) -> torch.Tensor:
    return torch.randn(B, C_IN, *size, generator=torch.Generator().manual_seed(1))


def test_1_a_fresh_new_branch_adds_exactly_nothing():
    model = projector()
    x = feature_map()
    base_only = model(x).features
    model.add_new_branch()
    out = model(x)
    assert torch.equal(out.features, base_only)  # bitwise: the new branch's gate z is 0, SiLU(0) = 0
    assert torch.equal(model.new(x).y, torch.zeros(B, C_OUT))
    assert out.gate.abs().sum() == 0 and model.new.ssm.block.in_proj.weight[:C_OUT].abs().sum() > 0


def test_2_incremental_steps_leave_the_base_branch_and_the_backbone_features_alone():
    model = projector(new_branch=True)
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    residual_before = model.residual.weight.clone()
    base_params = [*model.base.parameters(), *model.residual.parameters()]
    optimizer = torch.optim.SGD(
        [{"params": base_params, "lr": 0.0}, {"params": model.new.parameters(), "lr": 0.1}],
        momentum=0.9,
        weight_decay=5e-4,
    )
    x = feature_map().requires_grad_(True)
    reference = model.base(x.detach()).y
    for _ in range(3):
        optimizer.zero_grad()
        out = model(x)
        (out.features.pow(2).sum() + out.gate.pow(2).mean()).backward()
        optimizer.step()
    assert all(torch.equal(v, model.base.state_dict()[k]) for k, v in base_before.items())
    assert torch.equal(model.residual.weight, residual_before)
    assert x.grad is None or torch.equal(x.grad, torch.zeros_like(x))  # detached: nothing reaches the backbone
    assert torch.equal(model.base(x.detach()).y, reference)
    assert model.new.ssm.block.in_proj.weight[C_OUT:].abs().sum() > 0  # the new branch did train


def test_7_gate_quirk_flips_the_channel_axis_under_the_flag():
    torch.manual_seed(0)
    block = SelectiveSSM(C_OUT, N, R)
    tokens = torch.randn(B, 9, C_OUT)
    z = block(tokens).gate
    quirky = FourDirectionSSM(block, faithful_quirks=True)(tokens, 3, 3).gate
    torch.testing.assert_close(quirky, 2 * z + 2 * z.flip(1).flip(2))
    fixed = FourDirectionSSM(block, faithful_quirks=False)(tokens, 3, 3).gate
    torch.testing.assert_close(fixed, 4 * z)


@pytest.mark.parametrize("h, w", [(3, 3), (2, 3)])
def test_8_four_directions_equal_a_manual_loop(h, w):
    torch.manual_seed(0)
    block = SelectiveSSM(C_OUT, N, R)
    tokens = torch.randn(B, h * w, C_OUT)
    rows = [i * w + j for i in range(h) for j in range(w)]  # row-major positions
    cols = [i * w + j for j in range(w) for i in range(h)]  # column-major visiting order
    expected = torch.zeros(B, h * w, C_OUT)
    for order in (rows, rows[::-1], cols, cols[::-1]):
        y = block(tokens[:, order]).y
        expected[:, order] += y  # the output at step t belongs to token order[t]
    out = FourDirectionSSM(block, faithful_quirks=False)(tokens, h, w)
    torch.testing.assert_close(out.y, expected, rtol=1e-5, atol=1e-6)


def test_9_the_block_scan_equals_the_reference_forward_and_gradients():
    torch.manual_seed(0)
    fast = SelectiveSSM(C_OUT, N, R, d_conv=4)
    reference = SelectiveSSM(C_OUT, N, R, d_conv=4, scan_impl="reference")
    reference.load_state_dict(fast.state_dict())
    with torch.no_grad():
        fast.dt_proj.bias.fill_(25.0)  # softplus of values > 20 (its linear branch) inside the scan
        reference.dt_proj.bias.fill_(25.0)
        fast.dt_proj.bias[: C_OUT // 2] = -1.0
        reference.dt_proj.bias[: C_OUT // 2] = -1.0
    tokens = torch.randn(B, 13, C_OUT)  # L not a multiple of the chunk size
    a = fast(tokens, return_params=True)
    b = reference(tokens, return_params=True)
    torch.testing.assert_close(a.y, b.y, rtol=1e-5, atol=1e-5)
    a.y.square().sum().backward()
    b.y.square().sum().backward()
    for (name, p), q in zip(fast.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("h, w", [(3, 3), (2, 3)])
def test_ss2d_grouped_scan_equals_four_separate_directions(h, w):
    """One grouped scan call (4 groups, no z) equals a per-direction loop of reference scans, put back in row order."""
    import torch.nn.functional as F

    from cil.layers.ssm import SS2D
    from cil.ops.selective_scan import selective_scan

    torch.manual_seed(0)
    block = SS2D(C_OUT, N, R)
    tokens = torch.randn(B, h, w, C_OUT)
    out = block(tokens, return_params=True)
    d, length = block.d_inner, h * w
    with torch.no_grad():
        x, z = block.in_proj(tokens).chunk(2, dim=-1)
        x = F.silu(block.conv2d(x.permute(0, 3, 1, 2)))
        rows = [i * w + j for i in range(h) for j in range(w)]
        cols = [i * w + j for j in range(w) for i in range(h)]
        flat = x.flatten(2)
        expected = torch.zeros(B, d, length)
        for k, order in enumerate((rows, rows[::-1], cols, cols[::-1])):
            u = flat[:, :, order]
            dt_low, b, c = (block.x_proj_weight[k] @ u).split([R, N, N], dim=1)
            y = selective_scan(
                u,
                block.dt_projs_weight[k] @ dt_low,
                -torch.exp(block.A_logs[k * d : (k + 1) * d]),
                b,
                c,
                block.Ds[k * d : (k + 1) * d],
                delta_bias=block.dt_projs_bias[k],
                delta_softplus=True,
                impl="reference",
            )
            expected[:, :, order] += y
        expected = block.out_norm(expected.transpose(1, 2)) * F.silu(z.flatten(1, 2))
    torch.testing.assert_close(out.y, expected, rtol=1e-4, atol=1e-5)
    assert out.gate.shape == (B, h, w, d) and out.params["B"].shape == (B, 4, N, length)


def test_ss2d_projector_new_branch_starts_silent():
    model = projector(version="ss2d")
    x = feature_map()
    base_only = model(x).features
    model.add_new_branch()
    assert torch.equal(model(x).features, base_only)
