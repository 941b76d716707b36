"""What running an Avalanche strategy as a cil run costs over Avalanche alone.

One process, the same Fashion-MNIST stream and ImageNet EfficientNet-Lite0 (built by cil, so the same datasets,
images and transforms), the same Avalanche strategy, optimiser, schedule, epochs and batch size:

- **cil**: ``cil run avalanche/<strategy>_fashion_mnist`` (``run_experiment``): Avalanche's ``train`` per session,
  then cil's evaluation on every session's test set, the run folder (config, checkpoint with the strategy's state,
  accuracy matrix, metrics, plots);
- **Avalanche alone**: Avalanche's ``train`` per experience and its own ``eval`` on the whole test stream after each
  one (``benchmarks/peers.py``), nothing written.

Both sides evaluate every test set after every session, so the extra work of the cil side is its run folder and the
checkpoint; the evaluation itself is cil's against Avalanche's. The two sides alternate (ABAB..., the first side
swapped at every repeat) and each pair gives a ratio; the median and the range over repeats are printed, with
process CPU time beside wall time (single timings on a shared 2-core machine vary up to 3x).

    python benchmarks/avalanche_overhead.py [--strategy Replay] [--repeats 3] [--train-per-class 300] [--readme]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from _machine import machine
from _readme import write_block
from _timing import median_range, timed
from peers import build_stream, theirs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="Replay", choices=["Naive", "Replay", "LwF", "EWC"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--memory", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readme", action="store_true", help="rewrite the avalanche-overhead block of README.md")
    args = parser.parse_args()
    os.environ.setdefault("CIL_QUIET", "1")
    from cil.cli import quiet_lightning
    from cil.config import load_config
    from cil.metrics import average_incremental_accuracy, last_accuracy
    from cil.runs import load_run
    from cil.session import run_experiment

    quiet_lightning()
    shared = [
        f"run.seed={args.seed}", f"stream.train_per_class={args.train_per_class}",
        f"stream.test_per_class={args.test_per_class}", "stream.batch_size=64", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    kwargs = {"Naive": [], "Replay": [f"strategy.kwargs.mem_size={args.memory}"], "LwF": [], "EWC": []}
    config = ROOT / "configs" / "avalanche" / f"{args.strategy.lower()}_fashion_mnist.yaml"
    peer = SimpleNamespace(
        seed=args.seed, batch_size=64, epochs=args.epochs, lr=0.01, memory=args.memory, ewc_lambda=100.0
    )

    def cil_side(out: str) -> np.ndarray:
        overrides = [*shared, f"run.output_dir={out}", f"strategy.epochs={args.epochs}", *kwargs[args.strategy]]
        run = load_run(run_experiment(load_config(config, overrides)))
        return run.accuracy_matrix.to_numpy(dtype=float)

    def avalanche_side() -> np.ndarray:
        stream, cfg = build_stream(shared)
        return theirs(args.strategy, stream, cfg, peer)

    stream, _ = build_stream(shared)
    counts = stream.eval_counts()
    times = {"cil": [], "avalanche": []}
    accuracy = {}
    with tempfile.TemporaryDirectory() as out:
        for r in range(args.repeats):
            order = ["cil", "avalanche"] if r % 2 == 0 else ["avalanche", "cil"]
            for side in order:
                R, wall, cpu = timed(partial(cil_side, out) if side == "cil" else avalanche_side)
                times[side].append((wall, cpu))
                accuracy[side] = (average_incremental_accuracy(R, counts), last_accuracy(R, counts))
                print(f"repeat {r + 1} {side}: wall {wall:.1f} s, CPU {cpu:.1f} s", flush=True)

    def ratios(i: int) -> list[float]:
        return [c[i] / a[i] for c, a in zip(times["cil"], times["avalanche"])]

    wall_c, wall_a = (statistics.median(t[0] for t in times[s]) for s in ("cil", "avalanche"))
    text = (
        f"| Avalanche `{args.strategy}` on Fashion-MNIST | cil run | Avalanche alone |\n|---|---|---|\n"
        f"| median wall s | {wall_c:.1f} | {wall_a:.1f} |\n"
        f"| avg / last accuracy (%) | {100 * accuracy['cil'][0]:.2f} / {100 * accuracy['cil'][1]:.2f} "
        f"| {100 * accuracy['avalanche'][0]:.2f} / {100 * accuracy['avalanche'][1]:.2f} |\n\n"
        f"Time ratio cil / Avalanche alone, median (range) over {args.repeats} interleaved pairs: wall "
        f"{median_range(ratios(0))}, process CPU {median_range(ratios(1))}. 5 sessions x 2 classes, "
        f"{args.train_per_class} train / {args.test_per_class} test images per class, tf_efficientnet_lite0 "
        f"ImageNet weights at 64 px, {args.epochs} epochs, SGD lr 0.01 momentum 0.9, cosine per session, batch 64, "
        f"memory {args.memory}; both sides make the same passes through the body (Avalanche's training, then "
        f"every session's test set after every session), so the floor of the ratio is 1.0 and what is above it is "
        f"cil's run folder and evaluation set-up; accuracies differ only by the order of random draws (cil seeds "
        f"each session). {machine()}."
    )
    print(text)
    if args.readme:
        write_block("avalanche-overhead", text)


if __name__ == "__main__":
    main()
