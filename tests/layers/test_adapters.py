"""Parallel adapters on timm ViTs: exact identity at init, the MOS placement, the bank's snapshots, sums, merge."""

from __future__ import annotations

import copy

import pytest
import torch

from cil.backbones import create_backbone
from cil.layers.adapters import Adapter, AdapterBank


def vit():
    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", img_size=32).eval()


def randomise(adapters):
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(0, 0.2)


def test_adapter_shape_and_init():
    adapter = Adapter(768)
    assert sum(p.numel() for p in adapter.parameters()) == 25_360  # 768*16 + 16 + 16*768 + 768, as in MOS
    assert torch.equal(adapter(torch.randn(3, 768)), torch.zeros(3, 768))  # zero up-projection: adds nothing


def test_fresh_bank_leaves_the_vit_output_bit_identical():
    model, x = vit(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        bank = AdapterBank(model)
        assert len(bank.current) == 12
        assert torch.equal(model(x), before)


def test_adapter_reads_the_post_attention_residual_parallel_to_the_mlp():
    model = vit()
    bank = AdapterBank(model).eval()
    randomise(bank.current)
    block, adapter = model.blocks[3], bank.current[3]
    x = torch.randn(2, 5, model.embed_dim)
    with torch.no_grad():
        h = x + block.attn(block.norm1(x))  # timm's block with identity layer-scale and drop-path
        expected = h + block.mlp(block.norm2(h)) + 0.1 * adapter.up(torch.relu(adapter.down(h)))
        torch.testing.assert_close(block(x), expected, rtol=1e-6, atol=1e-6)
        bank.active = None  # the plain pre-trained block
        torch.testing.assert_close(block(x), h + block.mlp(block.norm2(h)), rtol=1e-6, atol=1e-6)


def test_snapshots_are_frozen_copies_and_the_sum_tracks_them():
    bank = AdapterBank(vit())
    randomise(bank.current)
    bank.snapshot()
    first = [p.clone() for p in bank.snapshots[0].parameters()]
    randomise(bank.current)  # training the next session must not touch the snapshot
    bank.snapshot()
    assert all(not p.requires_grad for p in bank.snapshots.parameters())
    assert all(torch.equal(a, b) for a, b in zip(bank.snapshots[0].parameters(), first))
    for total, a, b in zip(bank.total.parameters(), bank.snapshots[0].parameters(), bank.snapshots[1].parameters()):
        torch.testing.assert_close(total, a + b)


def test_merge_pulls_current_toward_the_mean_of_snapshots():
    bank = AdapterBank(vit())
    for _ in range(3):
        randomise(bank.current)
        bank.snapshot()
    randomise(bank.current)
    before = [p.clone() for p in bank.current.parameters()]
    bank.merge_toward_mean(0.1)
    for p, old, *snaps in zip(bank.current.parameters(), before, *(s.parameters() for s in bank.snapshots)):
        torch.testing.assert_close(p, 0.9 * old + 0.1 * sum(snaps) / 3)
    before = [p.clone() for p in bank.current.parameters()]
    bank.merge_toward_mean(0.1, snapshots=2)  # toward the mean of the first two only
    for p, old, s0, s1 in zip(
        bank.current.parameters(), before, bank.snapshots[0].parameters(), bank.snapshots[1].parameters()
    ):
        torch.testing.assert_close(p, 0.9 * old + 0.1 * (s0 + s1) / 2)


def test_checkpoint_restores_every_snapshot_into_a_fresh_bank():
    model, x = vit(), torch.randn(2, 3, 32, 32)
    bank = AdapterBank(model).eval()
    for _ in range(2):
        randomise(bank.current)
        bank.snapshot()
    outputs = {}
    with torch.no_grad():
        for active in ("current", 0, 1):
            bank.active = active
            outputs[active] = model(x)
    state = bank.state_dict()
    fresh_model = vit()
    fresh = AdapterBank(fresh_model).eval()
    fresh.load_state_dict(state)
    assert len(fresh) == 2
    with torch.no_grad():
        for active, expected in outputs.items():
            fresh.active = active
            assert torch.equal(fresh_model(x), expected)
    fresh.active = 5
    with pytest.raises(IndexError, match="snapshot 5 does not exist"):
        fresh_model(x)


def test_a_deep_copy_hooks_its_own_bank():
    model = vit().eval()
    bank = AdapterBank(model).eval()
    randomise(bank.current)
    twin_model, twin_bank = copy.deepcopy((model, bank))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted = model(x)
        with twin_bank.use(None):  # switches the copy's adapters off, not the original's
            assert torch.equal(model(x), adapted) and not torch.allclose(twin_model(x), adapted)
        assert torch.equal(twin_model(x), adapted)


def test_non_vit_backbones_are_refused():
    with pytest.raises(ValueError, match="timm VisionTransformer"):
        AdapterBank(create_backbone("resnet10t"))
