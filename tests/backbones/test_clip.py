"""open_clip backbones as the configs build them: OpenAI's weights always get QuickGELU, the activation they were
trained with (open_clip's plain model names build GELU and only warn)."""

from __future__ import annotations

import pytest
from torch import nn

from cil.backbones import backbone_from_config
from cil.backbones.clip import create_clip
from cil.config import ConfigError, load_config
from tests.helpers import CONFIGS


def activations(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__name__ in ("GELU", "QuickGELU")}


OPENAI_CONFIGS = sorted(
    p for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "base" and ".openai" in load_config(p).backbone.name
)


def test_the_openai_clip_configs_exist():
    assert {p.parent.name for p in OPENAI_CONFIGS} == {"dkvb", "zscl"}


@pytest.mark.parametrize("name", sorted({load_config(p).backbone.name for p in OPENAI_CONFIGS}))
def test_every_openai_config_builds_quickgelu_in_both_towers(name):
    path = next(p for p in OPENAI_CONFIGS if load_config(p).backbone.name == name)
    cfg = load_config(path, ["backbone.pretrained=false"])  # the network as weights=FILE would fill it, offline
    clip = backbone_from_config(cfg.backbone).model
    assert activations(clip.visual) == {"QuickGELU"} and activations(clip.transformer) == {"QuickGELU"}


def test_other_tags_and_random_models_keep_gelu_and_quickgelu_cannot_be_switched_off():
    assert activations(create_clip("open_clip:cil-tiny-clip").model) == {"GELU"}
    with pytest.raises(ConfigError, match="force_quick_gelu=false with 'open_clip:ViT-B-32.openai'.*QuickGELU"):
        create_clip("open_clip:ViT-B-32.openai", force_quick_gelu=False)
