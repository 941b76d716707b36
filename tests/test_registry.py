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


def test_every_strategy_takes_its_settings_from_its_dataclass_alone():
    """No strategy writes a default of its own: the constructor takes ``**settings`` and builds them from the config
    dataclass, so the hyper-parameters a strategy runs with are the dataclass's defaults plus what was given."""
    import inspect

    for name in registry.BUILTIN_STRATEGIES:
        cls = registry.strategy_class(name)
        parameters = list(inspect.signature(cls.__init__).parameters.values())
        assert [p.name for p in parameters] == ["self", "backbone", "num_features", "settings"], name
        assert parameters[-1].kind is inspect.Parameter.VAR_KEYWORD, name


def test_settings_get_the_dataclass_defaults_and_its_checks_outside_cil_run():
    """In a Lightning project of one's own (no config file): defaults from FSAConfig, every field in hparams, and an
    unknown name or a value outside the dataclass's choices or ranges refused with the message cil run gives."""
    from torch import nn

    from cil.strategies.configs import FSAConfig
    from cil.strategies.fsa import FSA

    made = FSA(nn.Identity(), num_features=4, lr=0.5)
    expected = {f.name: getattr(FSAConfig(lr=0.5), f.name) for f in dataclasses.fields(FSAConfig) if f.name != "name"}
    assert dict(made.hparams) == expected
    with pytest.raises(ConfigError, match="unknown setting 'lrr' of FSAConfig; did you mean lr"):
        FSA(nn.Identity(), num_features=4, lrr=0.5)
    with pytest.raises(ConfigError, match=r"strategy.adaptation='bogus' is not valid; choose one of \['full'"):
        FSA(nn.Identity(), num_features=4, adaptation="bogus")
    with pytest.raises(ConfigError, match="strategy.lr=-1.0 is out of range"):
        FSA(nn.Identity(), num_features=4, lr=-1.0)
