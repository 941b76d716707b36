"""Frozen-body strategies against Avalanche 0.6 under the standard protocol: evaluation on all test data after every
session, end to end from images, one process, the same stream and the same ImageNet EfficientNet-Lite0.

Pairs that compute the same prediction rule on the same frozen features:

- ``simplecil`` with ``strategy.metric=euclidean`` (nearest class mean) vs Avalanche's
  ``NCMClassifier(normalize=False)`` filled by its ``CurrentDataNCMUpdate`` plugin (a ``Naive`` strategy with 0
  training epochs);
- ``fsa`` with ``adaptation=none`` and ``lda_mode=slda`` (Deep SLDA, shrinkage 1e-4) vs Avalanche's ``StreamingLDA``.

Avalanche runs the body over every test image at every evaluation; cil runs it once per run (``run.reuse_features``,
:mod:`cil.features`). Rows at 5 and 10 sessions of Fashion-MNIST (2 and 1 classes per session). Wall time is from
config to accuracy matrix (ours also writes its run folder and checkpoints).

The **curve** (``--curve``): what reuse saves as the stream gets longer at the same data — a CIFAR-100-format stream
of synthetic images (written in CIFAR's pickle format, the paper-scale 100 classes, ``--curve-train``/``--curve-test``
images per class) cut into 5, 10 and 20 sessions, SimpleCIL with and without reuse and Avalanche's NCM. Accuracy
on random images means nothing here; only time is read. It writes ``benchmarks/feature_reuse.png``.

    python benchmarks/peers_frozen.py [--train-per-class 300] [--test-per-class 100] [--curve] [--readme]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from _machine import machine
from _readme import write_block
from _timing import timed
from peers import avalanche_matrix, build_stream, lite0, ours, theirs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class NCMNet(torch.nn.Module):
    """The model Avalanche's NCM plugins expect: ``feature_extractor`` and an ``eval_classifier``."""

    def __init__(self, body: torch.nn.Module):
        super().__init__()
        from avalanche.models import NCMClassifier

        self.feature_extractor = body
        self.eval_classifier = NCMClassifier(normalize=False)  # Euclidean distance to the raw class means

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.eval_classifier(self.feature_extractor(x))


def avalanche_ncm(stream, cfg, batch_size: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from avalanche.evaluation.metrics import accuracy_metrics
        from avalanche.training import Naive
        from avalanche.training.plugins import EvaluationPlugin
        from avalanche.training.plugins.update_ncm import CurrentDataNCMUpdate

    model = NCMNet(lite0(cfg).eval())
    strategy = Naive(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=batch_size, eval_mb_size=256, train_epochs=0, device="cpu", eval_every=-1,
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]), plugins=[CurrentDataNCMUpdate()],
    )  # fmt: skip
    return avalanche_matrix(strategy, stream)


def metrics(R: np.ndarray, counts: list[int]) -> tuple[float, float]:
    from cil.metrics import average_incremental_accuracy, last_accuracy

    return average_incremental_accuracy(R, counts), last_accuracy(R, counts)


PAIRS = [  # (label, ours config, extra overrides, Avalanche side)
    ("SimpleCIL (NCM) vs NCM", "simplecil/fashion_mnist.yaml", ["strategy.metric=euclidean"], "NCM"),
    ("FSA (none, Deep SLDA) vs StreamingLDA", "fsa/fashion_mnist_none.yaml", ["strategy.lda_mode=slda"], "SLDA"),
]


def run_avalanche(side: str, shared: list[str], args) -> np.ndarray:
    stream, cfg = build_stream(shared)
    if side == "NCM":
        return avalanche_ncm(stream, cfg, args.batch_size)
    return theirs("StreamingLDA", stream, cfg, SimpleNamespace(seed=args.seed, batch_size=args.batch_size))


def table(args, out: str) -> str:
    lines = [
        "| pair | sessions | cil: avg / last (%) | Avalanche: avg / last (%) | median wall s (cil \\| Avalanche) "
        "| speed-up, wall: median (range) | speed-up, CPU | body passes (cil \\| Avalanche): ceiling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for sessions in args.sessions:
        shared = [
            f"run.seed={args.seed}", f"stream.train_per_class={args.train_per_class}",
            f"stream.test_per_class={args.test_per_class}", f"stream.batch_size={args.batch_size}",
            f"stream.split=B0-Inc{10 // sessions}", "trainer.enable_progress_bar=false",
        ]  # fmt: skip
        # images through the frozen body: cil each training and test image once per run; Avalanche the training
        # images once and the whole test set after every session
        n_train, n_test = 10 * args.train_per_class, 10 * args.test_per_class
        ours_passes, theirs_passes = n_train + n_test, n_train + sessions * n_test
        for label, config, extra, side in PAIRS:
            walls, cpus = {"ours": [], "theirs": []}, {"ours": [], "theirs": []}
            for r in range(args.repeats):
                for which in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):  # interleaved
                    if which == "ours":
                        (R, counts), wall, cpu = timed(ours, config, [*shared, f"run.output_dir={out}", *extra])
                    else:
                        R_theirs, wall, cpu = timed(run_avalanche, side, shared, args)
                    walls[which].append(wall)
                    cpus[which].append(cpu)
            a, last = metrics(R, counts)
            ta, tlast = metrics(R_theirs, counts)
            speed = [t / o for o, t in zip(walls["ours"], walls["theirs"])]
            speed_cpu = [t / o for o, t in zip(cpus["ours"], cpus["theirs"])]
            ours_s, theirs_s = statistics.median(walls["ours"]), statistics.median(walls["theirs"])
            print(f"{label}, {sessions} sessions: ours {100 * a:.2f}/{100 * last:.2f} in {walls['ours']} s, "
                  f"Avalanche {100 * ta:.2f}/{100 * tlast:.2f} in {walls['theirs']} s", flush=True)  # fmt: skip
            lines.append(
                f"| {label} | {sessions} | {100 * a:.2f} / {100 * last:.2f} | {100 * ta:.2f} / {100 * tlast:.2f} | "
                f"{ours_s:.0f} \\| {theirs_s:.0f} | {statistics.median(speed):.2f}× ({min(speed):.2f}-"
                f"{max(speed):.2f}) | {statistics.median(speed_cpu):.2f}× | {ours_passes} \\| {theirs_passes}: "
                f"{theirs_passes / ours_passes:.1f}× |"
            )
    return "\n".join(lines) + (
        f"\n\n{args.repeats} interleaved repeats per pair (the first side swapped at every repeat); speed-up = "
        "Avalanche's time / cil's per pair of runs; the ceiling is the ratio of images through the body (the "
        "nearest-class-mean pair does little else; Deep SLDA adds Avalanche's per-sample update loop). "
        "cil's Lite0 runs "
        "in channels_last (backbone.memory_format=auto), Avalanche's in the default contiguous format, so the time "
        "per image differs too and a speed-up may exceed the ratio of passes."
    )


def curve(args, out: str) -> tuple[str, dict]:
    from tests.writers import write_cifar100

    data = Path(out) / "cifar100"
    write_cifar100(data, per_class_train=args.curve_train, per_class_test=args.curve_test)
    shared = [
        f"run.seed={args.seed}", "stream.name=cifar100", f"stream.data_root={data}", "stream.verify_checksums=false",
        "stream.train_per_class=null", "stream.test_per_class=null", f"stream.batch_size={args.batch_size}",
        "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    times: dict[str, list[float]] = {"cil, reuse": [], "cil, no reuse": [], "Avalanche NCM": []}
    for sessions in args.curve_sessions:
        split = [f"stream.split=B0-Inc{100 // sessions}"]
        for reuse in ("true", "false"):
            overrides = [*shared, *split, f"run.output_dir={out}", "strategy.metric=euclidean"]
            _, t, _ = timed(ours, "simplecil/fashion_mnist.yaml", [*overrides, f"run.reuse_features={reuse}"])
            times["cil, reuse" if reuse == "true" else "cil, no reuse"].append(t)
        _, t, _ = timed(run_avalanche, "NCM", [*shared, *split], args)
        times["Avalanche NCM"].append(t)
        print(f"curve, {sessions} sessions: " + ", ".join(f"{k} {v[-1]:.0f} s" for k, v in times.items()), flush=True)
    lines = ["| sessions | " + " | ".join(times) + " | saved by reuse |", "|---|---|---|---|---|"]
    for i, sessions in enumerate(args.curve_sessions):
        cells = " | ".join(f"{times[k][i]:.0f} s" for k in times)
        lines.append(f"| {sessions} | {cells} | {1 - times['cil, reuse'][i] / times['cil, no reuse'][i]:.0%} |")
    return "\n".join(lines), times


def plot(sessions: list[int], times: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for label, values in times.items():
        ax.plot(sessions, values, marker="o", label=label)
    ax.set_xlabel("sessions (same 100 classes, same images)")
    ax.set_ylabel("wall time, s")
    ax.set_xticks(sessions)
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title("Cost of the standard protocol vs stream length")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sessions", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side per pair, interleaved")
    parser.add_argument("--curve", action="store_true", help="also the stream-length curve (synthetic CIFAR-100)")
    parser.add_argument("--curve-sessions", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--curve-train", type=int, default=30)
    parser.add_argument("--curve-test", type=int, default=10)
    parser.add_argument("--readme", action="store_true", help="rewrite the block in README.md")
    args = parser.parse_args()
    os.environ.setdefault("CIL_QUIET", "1")
    from cil.cli import quiet_lightning

    quiet_lightning()
    torch.set_num_threads(torch.get_num_threads())
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        # warm-up, untimed: the first run of each side pays its imports and first-call costs
        tiny = ["stream.train_per_class=4", "stream.test_per_class=2", "trainer.enable_progress_bar=false"]
        ours("simplecil/fashion_mnist.yaml", [*tiny, f"run.output_dir={out}/warm-up"])
        run_avalanche("NCM", tiny, args)
        text = table(args, out) if args.sessions else ""
        text += (
            f"\n\nFashion-MNIST, {args.train_per_class} train / {args.test_per_class} test images per class, "
            f"tf_efficientnet_lite0 ImageNet weights at 64 px, batch {args.batch_size}, seed {args.seed}."
        )
        if args.curve:
            lines, times = curve(args, out)
            plot(args.curve_sessions, times, ROOT / "benchmarks" / "feature_reuse.png")
            text += (
                f"\n\nThe same 100 classes ({args.curve_train} train / {args.curve_test} test synthetic images per "
                f"class, CIFAR-100 format, Lite0 at 64 px) cut into more and more sessions "
                f"(`benchmarks/feature_reuse.png`):\n\n{lines}"
            )
    text += f"\n\n{machine()}; {time.perf_counter() - began:.0f} s in all."
    print(text)
    if args.readme:
        write_block("peers-frozen", text)


if __name__ == "__main__":
    main()
