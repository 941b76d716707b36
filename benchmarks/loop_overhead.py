"""What Lightning's training loop costs per step over a bare PyTorch loop, and what per-step logging adds.

The same module, data loader, optimiser and steps, four ways, interleaved and repeated:

- **bare**: ``for x, y in loader: loss.backward(); opt.step(); opt.zero_grad()``;
- **Lightning, no logging**: ``Trainer.fit`` as the session loop builds it (``cil.trainers.make_trainer``, the
  session's callbacks, a CSV logger, ``log_every_n_steps=5``, no progress bar), ``training_step`` logging nothing;
- **Lightning, logging every step**: ``self.log`` of the loss and the batch accuracy on every step (what every
  strategy did before ``CILModule.logs_this_step``);
- **Lightning, as cil logs**: the same two values, only on the steps the loggers write.

Two heads on cached features, where a step is cheap and the loop's share is largest: a linear head on 1,280
features (Lite0's width), and DKVB's key-value bottleneck at the digits config's size (64 codebooks x 256 keys of
dim 8 on 512 features). Whole-body steps take hundreds of ms (``train_step.py``), against which the overhead is
under 1%.

    python benchmarks/loop_overhead.py [--repeats 7] [--epochs 30] [--readme]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import machine
from _readme import write_block
from _timing import median_range, timed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SAMPLES, BATCH, CLASSES = 4096, 256, 10


def heads() -> dict:
    from cil.strategies.dkvb import KeyValueBottleneck

    torch.manual_seed(0)
    dkvb = KeyValueBottleneck(512, num_codebooks=64, keys_per_codebook=256, key_dim=8, num_classes=CLASSES)
    return {
        "linear head, 1280 features": (torch.nn.Linear(1280, CLASSES), 1280, lambda head: [head.weight, head.bias]),
        "DKVB bottleneck, 64 x 256 x 8": (dkvb, 512, lambda head: [head.values]),
    }


def module_class():
    import pytorch_lightning as pl

    from cil.module import CILModule

    class Module(pl.LightningModule):
        """A head trained on features; ``logging``: 'none', 'every' step, or 'cil' (``CILModule.logs_this_step``)."""

        logs_this_step = CILModule.logs_this_step

        def __init__(self, head, params, logging: str):
            super().__init__()
            self.head, self.params, self.logging = head, params, logging

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.head(x)
            loss = F.cross_entropy(logits, y)
            if self.logging == "every" or (self.logging == "cil" and self.logs_this_step()):
                self.log("train/loss", loss, prog_bar=True)
                self.log("train/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.params(self.head), lr=0.1, momentum=0.9)

    return Module


class Batches:
    """The batches, made once, iterated as a DataLoader would be (Lightning takes a list for several loaders): both
    loops then time the step and the loop around it, not the collation of items."""

    def __init__(self, width: int):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(SAMPLES, width, generator=g), torch.randint(0, CLASSES, (SAMPLES,), generator=g)
        self.batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, SAMPLES, BATCH)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def bare(head, batches, params, epochs) -> None:
    opt = torch.optim.SGD(params(head), lr=0.1, momentum=0.9)
    for _ in range(epochs):
        for x, y in batches:
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()


def lightning(head, batches, params, epochs, logging_mode, cfg) -> None:
    from pytorch_lightning.loggers import CSVLogger

    from cil.loaders import EpochSeed
    from cil.trainers import IntervalCheckpoint, SessionTag, make_trainer

    with tempfile.TemporaryDirectory() as root:
        trainer = make_trainer(
            cfg,
            Path(root),
            max_epochs=epochs,
            logger=CSVLogger(root, name="csv", version="session_0"),
            callbacks=[
                IntervalCheckpoint(Path(root) / "last.ckpt", cfg.run.checkpoint_every),
                SessionTag(0),
                EpochSeed(0, 0),
            ],
            enable_checkpointing=False,
            log_every_n_steps=cfg.trainer.log_every_n_steps,
            num_sanity_val_steps=0,
        )
        trainer.fit(module_class()(head, params, logging_mode), train_dataloaders=batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the steering noise of a shared VM)")
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("CIL_QUIET", "1")
    from cil.cli import quiet_lightning
    from cil.config import load_config

    quiet_lightning()

    cfg = load_config(ROOT / "configs" / "finetune" / "digits.yaml", ["trainer.enable_progress_bar=false"])
    steps = args.epochs * (SAMPLES // BATCH)
    ways = {
        "bare loop": lambda h, w, p: bare(h, w, p, args.epochs),
        "Lightning, no logging": lambda h, w, p: lightning(h, w, p, args.epochs, "none", cfg),
        "Lightning, self.log every step": lambda h, w, p: lightning(h, w, p, args.epochs, "every", cfg),
        "Lightning, as cil logs": lambda h, w, p: lightning(h, w, p, args.epochs, "cil", cfg),
    }
    rows, gains = [], []
    for head_name, (head, width, params) in heads().items():
        times = {way: [] for way in ways}
        batches = Batches(width)  # made once, outside the timing
        for r in range(args.repeats):
            order = list(ways) if r % 2 == 0 else list(reversed(ways))  # interleaved, the order swapped each repeat
            for way in order:
                times[way].append(timed(ways[way], head, batches, params)[1:])
        every, cil = times["Lightning, self.log every step"], times["Lightning, as cil logs"]
        ratios = [e / c for (e, _), (c, _) in zip(every, cil)]  # per repeat: the two ran side by side
        gains.append(f"{head_name}: {median_range(ratios, unit='x')}")
        base = [w for w, _ in times["bare loop"]]
        for way, runs in times.items():
            walls = [1e3 * w / steps for w, _ in runs]
            cpus = [1e3 * c / steps for _, c in runs]
            extra = [1e3 * (w - b) / steps for (w, _), b in zip(runs, base)]  # per repeat: against its own bare run
            rows.append(
                f"| {head_name} | {way} | {median_range(walls, '.3f')} "
                f"| {statistics.median(cpus):.3f} | "
                + ("" if way == "bare loop" else median_range(extra, "+.3f", sep=" to "))
                + " |"
            )
    text = (
        "| head | loop | ms / step, wall (median, range) | CPU ms / step | over the bare loop, ms / step |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"Logging every step over logging as cil does, wall time per repeat: {'; '.join(gains)}. "
        f"{steps} steps of batch {BATCH} per run ({args.epochs} epochs of {SAMPLES} cached feature vectors), "
        f"{args.repeats} interleaved repeats; each run's difference is taken against the bare run of its own repeat; "
        f"the Lightning runs include the Trainer's set-up and tear-down (once per fit, i.e. per session). {machine()}."
    )
    print(text)
    if args.readme:
        write_block("loop-overhead", text)


if __name__ == "__main__":
    main()
