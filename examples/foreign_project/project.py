"""A small Lightning project of its own that uses cil's strategies session by session.

It knows nothing of cil's configs, streams or Avalanche: its own ``LightningDataModule`` over plain tensors
(scikit-learn's digits, preprocessed once with timm's transform for the backbone), its own ``Trainer`` and
callback, its own evaluation. From cil it imports only the strategies and the two reproducibility helpers that
make its numbers bit-identical to ``cil run`` (``EpochSeededSampler``, ``EpochSeed``; without them it would train
just as well, with other random draws) and the two helpers that keep the loop short (``run_session``, the three
lines below for a Trainer factory, and ``accuracy_row``). Each session is the three lines of the strategy contract::

    strategy.begin_session(session)
    trainer.fit(strategy, datamodule=...)      # skipped when strategy.epochs_for(session) == 0
    strategy.end_session(session)

    python examples/foreign_project/project.py [fsa|simplecil|mos] [--seed 0]
"""

from __future__ import annotations

import argparse

import numpy as np
import pytorch_lightning as pl
import timm
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data import create_transform, resolve_data_config
from torch.utils.data import DataLoader, Subset, TensorDataset

from cil.loaders import EpochSeed, EpochSeededSampler, derived_seed, seed_all
from cil.module import Session, accuracy_row, run_session
from cil.strategies.fsa import FSA
from cil.strategies.mos import MOS
from cil.strategies.simplecil import SimpleCIL

SESSIONS = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]  # digit classes per session, in order


def backbone_for(name: str) -> torch.nn.Module:
    if name == "mos":  # a small ViT: MOS puts its adapters into ViT blocks
        return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, depth=4)
    return timm.create_model("resnet10t", num_classes=0)


STRATEGIES = {  # the project's own choice of settings
    "simplecil": lambda backbone: SimpleCIL(backbone, metric="cosine"),
    "fsa": lambda backbone: FSA(backbone, adaptation="full", epochs=5, milestones=[3], lr=0.005),
    "mos": lambda backbone: MOS(
        backbone, epochs=5, lr=0.5, weight_decay=0.0005, ca_epochs=10, ca_samples_per_class=160
    ),
}


class DigitsDataModule(pl.LightningDataModule):
    """Digits as tensors: a stratified 80/20 split, 8x8 images scaled up to the backbone's 32x32 input."""

    def __init__(self, backbone: torch.nn.Module, seed: int, batch_size: int = 32):
        super().__init__()
        digits = load_digits()
        x_train, x_test, y_train, y_test = train_test_split(
            digits.images, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
        )
        config = resolve_data_config({"input_size": (3, 32, 32), "crop_pct": 1.0}, model=backbone)
        transform = create_transform(**config, is_training=False)

        def tensors(images: np.ndarray) -> torch.Tensor:
            pixels = (images * (255.0 / 16.0)).round().astype(np.uint8)
            return torch.stack([transform(Image.fromarray(p, mode="L").convert("RGB")) for p in pixels])

        self.train_set = TensorDataset(tensors(x_train), torch.as_tensor(y_train))
        self.test_set = TensorDataset(tensors(x_test), torch.as_tensor(y_test))
        self.seed, self.batch_size, self.session = seed, batch_size, 0

    def session_data(self, k: int, test: bool = False) -> Subset:
        data = self.test_set if test else self.train_set
        labels = data.tensors[1].numpy()
        return Subset(data, np.concatenate([np.flatnonzero(labels == c) for c in SESSIONS[k]]).tolist())

    def train_dataloader(self) -> DataLoader:
        data = self.session_data(self.session)
        sampler = EpochSeededSampler(data, seed=derived_seed(self.seed, self.session))
        generator = torch.Generator().manual_seed(derived_seed(self.seed, self.session))
        return DataLoader(data, self.batch_size, sampler=sampler, generator=generator)


class LogSession(pl.Callback):
    """The project's own callback: one line per finished fit."""

    def on_train_end(self, trainer, pl_module) -> None:
        print(f"  session {pl_module.session_index + 1}: fit done after {trainer.global_step} steps")


def run(name: str, seed: int = 0) -> np.ndarray:
    import logging

    for logger in ("pytorch_lightning", "lightning_fabric"):  # the project's own choice: no device/tip chatter
        logging.getLogger(logger).setLevel(logging.WARNING)
    pl.seed_everything(seed, verbose=False)
    backbone = backbone_for(name)
    strategy = STRATEGIES[name](backbone)
    data = DigitsDataModule(backbone, seed)
    rows = []
    for k in range(len(SESSIONS)):
        seed_all(derived_seed(seed, k))
        data.session = k
        session = Session(
            index=k,
            new_classes=SESSIONS[k],
            seen_classes=[c for s in SESSIONS[: k + 1] for c in s],
            train_data=data.session_data(k),
            loader_fn=lambda k=k: DataLoader(data.session_data(k), batch_size=256),
        )
        make_trainer = lambda epochs, k=k: pl.Trainer(  # noqa: E731
            max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[LogSession(), EpochSeed(seed, k)],
        )  # fmt: skip
        run_session(strategy, session, make_trainer, datamodule=data)  # the contract's three lines
        rows.append(accuracy_row(strategy, [data.session_data(j, test=True) for j in range(len(SESSIONS))]))
    return np.array(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="cil strategies in a foreign Lightning project")
    parser.add_argument("strategy", choices=sorted(STRATEGIES), nargs="?", default="fsa")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    R = run(args.strategy, args.seed)
    print(f"{args.strategy}: accuracy matrix (%), row i after session i, column j on session j's classes")
    print(np.round(100 * R, 2))
