"""FiLM adapters: placement on timm EfficientNet-B0 as in the FSA code, identity at init, between BN and act."""

from __future__ import annotations

import pytest
import torch

from cil.backbones import create_backbone
from cil.layers.film import FiLMAdapters, film_sites

# EfficientNet-B0's FiLM channels in the official code: stem BN, the depthwise BN of its 16 MBConv blocks
# (expanded width), head BN
B0_CHANNELS = [32, 32, 96, 144, 144, 240, 240, 480, 480, 480, 672, 672, 672, 1152, 1152, 1152, 1152, 1280]


def test_efficientnet_b0_sites_match_the_official_placement():
    sites = film_sites(create_backbone("efficientnet_b0"))
    assert [s.channels for s in sites] == B0_CHANNELS
    assert sites[0].name == "bn1.act" and sites[-1].name == "bn2.act"  # stem and head: before their SiLU
    assert sites[1].name == "blocks.0.0.bn1.act" and sites[2].name == "blocks.1.0.bn2.act"  # after conv_dw's BN
    assert all(s.where == "input" for s in sites)


@pytest.mark.parametrize(
    "name, kwargs",
    [("efficientnet_b0", {}), ("resnet10t", {}), ("vit_tiny_patch16_224", {"img_size": 32})],
)
def test_film_at_init_leaves_the_backbone_output_unchanged(name, kwargs):
    torch.manual_seed(0)
    model = create_backbone(name, **kwargs).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        film = FiLMAdapters(model)
        after = model(x)
        assert len(film) > 0
        torch.testing.assert_close(after, before, atol=0, rtol=0)
        next(iter(film.layers.values())).gamma.mul_(0.5)  # the hooks are live: a changed gamma changes the output
        assert not torch.equal(model(x), before)


def test_film_sits_between_batchnorm_and_activation():
    """beta = -1000 on the head site: SiLU(-1000 + ...) is ~0; a FiLM after the SiLU would leave ~ -1000."""
    model = create_backbone("efficientnet_b0").eval()
    film = FiLMAdapters(model)
    with torch.no_grad():
        film.layers["bn2_act"].beta.fill_(-1000.0)
        features = model(torch.randn(2, 3, 32, 32))
    assert features.min() > -0.3 and features.abs().max() < 1e-3


def test_resnet_and_vit_sites():
    resnet = film_sites(create_backbone("resnet10t"))
    assert len(resnet) == 14 and all(s.where == "output" and s.channel_dim == 1 for s in resnet)
    vit = film_sites(create_backbone("vit_tiny_patch16_224", img_size=32))
    assert len(vit) == 25 and all(s.channel_dim == -1 and s.channels == 192 for s in vit)


def test_unsupported_backbone_is_refused_with_the_supported_families():
    with pytest.raises(ValueError, match="supports timm EfficientNet, ResNet and VisionTransformer.*not ConvNeXt"):
        film_sites(create_backbone("convnext_atto"))
