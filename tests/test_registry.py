"""The registry: one list of built-in strategies, resolved lazily; user strategies registered at run time."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from cil import registry
from cil.config import ConfigError, StrategyConfig, TrainingConfig, load_config
from tests.helpers import CONFIGS


def test_every_builtin_name_resolves_to_a_strategy_and_its_config_without_a_second_list():
    import cil.strategies
    from cil import demo
    from cil.module import CILModule

    for name in registry.BUILTIN_STRATEGIES:
        cls, config = registry.strategy_class(name), registry.strategy_config(name)
        assert issubclass(cls, CILModule) and issubclass(config, StrategyConfig), name
        assert config().name == name  # the dataclass's own default name is the registry's
        assert getattr(cil.strategies, cls.__name__) is cls  # `from cil.strategies import FSA`
        assert (CONFIGS / name / "digits.yaml").exists()  # the demo runs every built-in on digits
    assert demo.STRATEGIES == list(registry.BUILTIN_STRATEGIES)


def test_checking_a_config_imports_neither_torch_nor_timm():
    code = (
        "import sys; from cil.config import load_config; load_config('fsa/digits'); "
        "print(sorted(m for m in ('torch', 'timm', 'pytorch_lightning') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_user_strategy_registers_and_a_bad_config_class_is_refused(tmp_path):
    from cil.strategies.finetune import Finetune

    @dataclasses.dataclass
    class Mine(TrainingConfig):
        name: str = "mine_for_test"

    @dataclasses.dataclass
    class NotAStrategyConfig:
        name: str = "stray_for_test"

    with pytest.raises(TypeError, match="must be a dataclass"):
        registry.register_strategy("stray_for_test", Finetune, dict)
    registry.register_strategy("mine_for_test", Finetune, Mine)
    registry.register_strategy("stray_for_test", Finetune, NotAStrategyConfig)
    try:
        assert "mine_for_test" in registry.strategy_names()
        cfg = load_config("finetune/digits", ["strategy.name=mine_for_test", "strategy.epochs=3"])
        assert cfg.strategy.epochs == 3 and registry.strategy_class("mine_for_test") is Finetune
        with pytest.raises(ConfigError, match="strategy 'stray_for_test' must subclass cil.config.StrategyConfig"):
            load_config("finetune/digits", ["strategy.name=stray_for_test"])
    finally:
        registry._STRATEGIES.pop("mine_for_test", None)
        registry._STRATEGIES.pop("stray_for_test", None)
