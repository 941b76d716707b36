"""cil against Avalanche 0.6: the same Fashion-MNIST stream and the same ImageNet EfficientNet-Lite0, one process.

The stream is built once by cil (5 sessions × 2 classes, seeded class order, a seeded per-class subset, 64×64,
Lite0's own preprocessing) and it *is* an Avalanche benchmark, so Avalanche's strategies train on the very same
datasets, images and transforms. Pairs that compute the same thing:

====================================  =====================================================================
cil                                   Avalanche 0.6
====================================  =====================================================================
``finetune``                          ``Naive`` (backbone + ``IncrementalClassifier``, masked unseen units)
``joint``                             ``Cumulative``
``fsa`` adaptation=none, lda=slda     ``StreamingLDA`` (Deep SLDA, shrinkage 1e-4)
``fsa`` adaptation=none (code's LDA)  —
====================================  =====================================================================

plus Avalanche's classic strategies as extra rows: ``LwF``, ``EWC``, ``Replay`` and ``iCaRL``. Gradient-trained rows
share the optimiser (SGD, momentum 0.9, no weight decay, the same lr), epochs, batch size and the per-session cosine
schedule (Avalanche: ``LRSchedulerPlugin`` reset at each experience). Every row's accuracy matrix (accuracy on
session j's test classes after session i) comes from its own framework's evaluation; the metrics are then computed
from the matrices by the same functions (:mod:`cil.metrics`). Wall time is from config to accuracy matrix (stream,
model, training, every evaluation; ours also writes its run folder and checkpoints).

Agreement check on the frozen Lite0's features of the stream: Avalanche's ``StreamingLDA.predict`` given our
statistics (class means and W/N) must give our ``StreamingLDA(mode="slda")``'s predictions (the script exits non-zero
below 99.9%): the same prediction rule, ``(1 - eps) Sigma + eps I``, no prior. Fitted its own way (``fit`` one
sample at a time) Avalanche's head differs: its covariance update weights each sample by the *global* update count
and adds the raw outer product of each class's first sample, ours is the exact pooled within-class scatter; the
fraction of equal predictions is reported.

    python benchmarks/peers.py [--train-per-class 300] [--test-per-class 100] [--epochs 2] [--seed 0] [--readme]
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
from _timing import median_range

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def ours(config: str, overrides: list[str]) -> tuple[np.ndarray, list[int]]:
    from cil.config import load_config
    from cil.runs import load_run
    from cil.session import run_experiment

    run = load_run(run_experiment(load_config(ROOT / "configs" / config, overrides)))
    R = run.accuracy_matrix.to_numpy(dtype=float)
    return R[:, : R.shape[0]], list(run.summary["test_samples_per_session"])


def build_stream(overrides: list[str]):
    """cil's stream of the benchmark (and the config it came from): an Avalanche benchmark inside."""
    from functools import partial

    from cil.backbones import backbone_from_config
    from cil.config import load_config
    from cil.loaders import stream_transforms
    from cil.streams import create_stream

    cfg = load_config(ROOT / "configs" / "finetune" / "fashion_mnist.yaml", overrides)
    backbone = backbone_from_config(cfg.backbone)
    return create_stream(cfg.stream, partial(stream_transforms, backbone, cfg)), cfg


def lite0(cfg) -> torch.nn.Module:
    """Avalanche's Lite0: the same weights, in PyTorch's default (contiguous) memory format, as a model built for
    Avalanche is; cil's own runs pick channels_last for it (``backbone.memory_format=auto``)."""
    from omegaconf import OmegaConf

    from cil.backbones import backbone_from_config

    return backbone_from_config(OmegaConf.merge(cfg.backbone, {"memory_format": "contiguous"}))


def task_aware(stream):
    """The stream's Avalanche benchmark with task label 0 on every sample (class-incremental, as Avalanche's own
    SplitMNIST): LwF, EWC and the replay buffers read ``targets_task_labels``. Same datasets, images and transforms."""
    from avalanche.benchmarks import benchmark_from_datasets, with_classes_timeline, with_task_labels
    from avalanche.benchmarks.utils.classification_dataset import TaskAwareClassificationDataset
    from avalanche.benchmarks.utils.data_attribute import TaskLabels
    from avalanche.benchmarks.utils.flat_data import ConstantSequence

    def labelled(ds):
        return TaskAwareClassificationDataset([ds], data_attributes=[TaskLabels(ConstantSequence(0, len(ds)))])

    train, test = [labelled(d) for d in stream.train_data], [labelled(d) for d in stream.eval_data]
    return with_task_labels(with_classes_timeline(benchmark_from_datasets(train=train, test=test)))


def avalanche_matrix(strategy, stream) -> np.ndarray:
    """Train an Avalanche strategy experience by experience; R[i, j] from its own evaluation after each one."""
    bench = task_aware(stream)
    T = len(bench.train_stream)
    R = np.zeros((T, T))
    # Avalanche 0.6's iCaRL plugin still reads the legacy ``experience.benchmark.n_classes_per_exp`` and
    # ``classes_order``, which experiences of ``benchmark_from_datasets`` lack: attach them (labels are already in
    # order of appearance, so the order is 0..n-1)
    legacy = SimpleNamespace(
        n_classes_per_exp=[len(c) for c in stream.classes_per_session], classes_order=list(range(stream.n_classes))
    )
    for i, experience in enumerate(bench.train_stream):
        experience.benchmark = legacy
        strategy.train(experience)
        results = strategy.eval(bench.test_stream)
        for j in range(T):
            (key,) = [
                k for k in results if k.startswith("Top1_Acc_Exp/eval_phase/test_stream/") and k.endswith(f"Exp{j:03d}")
            ]
            R[i, j] = results[key]
    return R


def theirs(name: str, stream, cfg, args) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from avalanche.evaluation.metrics import accuracy_metrics
        from avalanche.models import IncrementalClassifier
        from avalanche.training import EWC, LwF, Naive, Replay, StreamingLDA
        from avalanche.training.plugins import EvaluationPlugin, LRSchedulerPlugin
        from avalanche.training.supervised import Cumulative, ICaRL

    torch.manual_seed(args.seed)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    common = dict(
        train_mb_size=args.batch_size, eval_mb_size=256, device="cpu", evaluator=evaluator, eval_every=-1
    )  # fmt: skip
    backbone = lite0(cfg)
    if name == "StreamingLDA":
        strategy = StreamingLDA(
            slda_model=backbone, criterion=torch.nn.CrossEntropyLoss(), input_size=backbone.num_features,
            num_classes=stream.n_classes, shrinkage_param=1e-4, **common,
        )  # fmt: skip
        return avalanche_matrix(strategy, stream)
    if name == "ICaRL":
        model_parts = dict(
            feature_extractor=backbone, classifier=torch.nn.Linear(backbone.num_features, stream.n_classes)
        )
        params = list(model_parts["feature_extractor"].parameters()) + list(model_parts["classifier"].parameters())
    else:
        model = torch.nn.Sequential(backbone, IncrementalClassifier(backbone.num_features, initial_out_features=2))
        params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    scheduler = LRSchedulerPlugin(torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs))
    common.update(train_epochs=args.epochs, plugins=[scheduler])
    ce = torch.nn.CrossEntropyLoss()
    if name == "ICaRL":
        strategy = ICaRL(**model_parts, optimizer=optimizer, memory_size=args.memory, buffer_transform=None,
                         fixed_memory=True, **common)  # fmt: skip
    elif name == "Naive":
        strategy = Naive(model=model, optimizer=optimizer, criterion=ce, **common)
    elif name == "Cumulative":
        strategy = Cumulative(model=model, optimizer=optimizer, criterion=ce, **common)
    elif name == "LwF":
        strategy = LwF(model=model, optimizer=optimizer, criterion=ce, alpha=1.0, temperature=2.0, **common)
    elif name == "EWC":
        strategy = EWC(model=model, optimizer=optimizer, criterion=ce, ewc_lambda=args.ewc_lambda, **common)
    elif name == "Replay":
        strategy = Replay(model=model, optimizer=optimizer, criterion=ce, mem_size=args.memory, **common)
    else:
        raise ValueError(name)
    return avalanche_matrix(strategy, stream)


@torch.no_grad()
def slda_agreement(stream, cfg) -> dict[str, float]:
    """Avalanche's StreamingLDA and our slda head on the same frozen features.

    ``exact``: Avalanche's prediction rule given *our* statistics (class means, W/N) against our head: the same
    function, so the predictions must agree. ``streaming``: each fitted its own way (Avalanche one sample at a time
    with its approximate covariance update): the fraction of equal test predictions, reported.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from avalanche.training import StreamingLDA as AvalancheSLDA

    from cil.layers.lda import StreamingLDA

    backbone = lite0(cfg).eval()

    def features(datasets):
        xs, ys = [], []
        for ds in datasets:
            for x, y, *_ in torch.utils.data.DataLoader(ds, batch_size=256):
                xs.append(backbone(x))
                ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    train_x, train_y = features(stream.stats_data)  # session order, the evaluation transform
    test_x, test_y = features(stream.eval_data)

    def avalanche_slda():
        return AvalancheSLDA(
            slda_model=torch.nn.Identity(), criterion=torch.nn.CrossEntropyLoss(), input_size=train_x.shape[1],
            num_classes=stream.n_classes, shrinkage_param=1e-4,
        )  # fmt: skip

    streaming = avalanche_slda()
    for f, y in zip(train_x, train_y):  # one sample at a time, as its training loop does
        streaming.fit(f[None], y[None])
    head = StreamingLDA(train_x.shape[1], mode="slda", shrinkage=1e-4)
    head.update(train_x, train_y)
    ours_pred = head.logits(test_x).argmax(1)
    streaming_pred = streaming.predict(test_x).argmax(1)
    # Avalanche's prediction rule on our statistics, in float64 as ours (with shrinkage 1e-4 the covariance is badly
    # conditioned, and float32 flips near-ties)
    given = avalanche_slda()
    given.muK, given.cK = head.means.clone(), head.counts.clone()
    given.Sigma = head.scatter / head.num_samples
    given.num_updates = head.num_samples
    theirs_logits, ours_logits = given.predict(test_x.double()), head.logits(test_x)
    return {
        "exact": float((theirs_logits.argmax(1) == ours_pred).float().mean()),
        "max_logit_diff": float((theirs_logits - ours_logits).abs().max() / ours_logits.abs().max()),
        "streaming": float((streaming_pred == ours_pred).float().mean()),
        "ours_acc": float((ours_pred == test_y).float().mean()),
        "theirs_acc": float((streaming_pred == test_y).float().mean()),
        "n": len(test_y),
    }


ROWS = [  # (label, ours config or None, Avalanche strategy or None, extra overrides of ours)
    ("fine-tuning", "finetune/fashion_mnist.yaml", "Naive", []),
    ("joint / cumulative", "joint/fashion_mnist.yaml", "Cumulative", []),
    ("Deep SLDA head on frozen Lite0", "fsa/fashion_mnist_none.yaml", "StreamingLDA", ["strategy.lda_mode=slda"]),
    ("FSA head (code's LDA) on frozen Lite0", "fsa/fashion_mnist_none.yaml", None, []),
    ("LwF", None, "LwF", []),
    ("EWC", None, "EWC", []),
    ("Replay", None, "Replay", []),
    ("iCaRL", None, "ICaRL", []),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--memory", type=int, default=200, help="Replay / iCaRL memory size")
    parser.add_argument("--ewc-lambda", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None, help="default: the config's (Debian's path)")
    parser.add_argument("--rows", nargs="+", default=None, help="labels' first words to run (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved (median and range)")
    parser.add_argument("--readme", action="store_true", help="rewrite the peers table in README.md")
    args = parser.parse_args()
    os.environ.setdefault("CIL_QUIET", "1")
    from cil.cli import quiet_lightning
    from cil.metrics import average_incremental_accuracy, forgetting, last_accuracy

    quiet_lightning()
    shared = [
        f"run.seed={args.seed}", f"stream.train_per_class={args.train_per_class}",
        f"stream.test_per_class={args.test_per_class}", f"stream.batch_size={args.batch_size}",
        "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    if args.data_root:
        shared.append(f"stream.data_root={args.data_root}")
    training = [f"strategy.epochs={args.epochs}", f"strategy.lr={args.lr}", "strategy.momentum=0.9"]
    stream, cfg = build_stream(shared)
    counts = stream.eval_counts()
    n_train = sum(len(d) for d in stream.train_data)
    print(
        f"stream: {stream.name}, classes {stream.original_class_ids}, {n_train} train / {sum(counts)} test images, "
        f"{cfg.backbone.name} at {cfg.backbone.image_size} px",
        flush=True,
    )

    def metrics(R: np.ndarray) -> tuple[float, float, float]:
        return average_incremental_accuracy(R, counts), last_accuracy(R, counts), forgetting(R)

    lines, spreads = [], []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for label, config, avalanche_name, extra in ROWS:
            if args.rows and not any(label.lower().startswith(r.lower()) for r in args.rows):
                continue
            cells, times, cpu = ["—", "—"], [None, None], [None, None]
            runs = {0: [], 1: []}  # (wall, cpu) per repeat
            sides = [i for i, v in enumerate((config, avalanche_name)) if v is not None]
            # a row with one side has no ratio to pin down: one run gives its accuracy
            for r in range(args.repeats if len(sides) == 2 else 1):
                for i in sides if r % 2 == 0 else sides[::-1]:  # interleaved, the first side swapped each repeat
                    t0, c0 = time.perf_counter(), time.process_time()
                    if i == 0:
                        trained = training if "finetune" in config or "joint" in config else []
                        R, _ = ours(config, [*shared, f"run.output_dir={out}", *trained, *extra])
                    else:
                        s, c = build_stream(shared)
                        R = theirs(avalanche_name, s, c, args)
                    runs[i].append((time.perf_counter() - t0, time.process_time() - c0))
                    a, last, f = metrics(R)
                    cells[i] = f"{100 * a:.2f} / {100 * last:.2f} / {100 * f:.2f}"
                    side = ("ours", "theirs")[i]
                    print(f"{label} [{side}]: avg {100 * a:.2f} last {100 * last:.2f} forgetting {100 * f:.2f} "
                          f"in {runs[i][-1][0]:.0f} s (CPU {runs[i][-1][1]:.0f} s)", flush=True)  # fmt: skip
            for i in sides:
                times[i] = statistics.median(w for w, _ in runs[i])
                cpu[i] = statistics.median(c for _, c in runs[i])
            if len(sides) == 2 and args.repeats > 1:
                wall_ratios = [o[0] / t[0] for o, t in zip(runs[0], runs[1])]
                cpu_ratios = [o[1] / t[1] for o, t in zip(runs[0], runs[1])]
                spreads.append(
                    f"{label}: cil/Avalanche wall {median_range(wall_ratios)}, CPU {median_range(cpu_ratios)} "
                    f"over {args.repeats} interleaved pairs"
                )
            ratio = f"{times[0] / times[1]:.2f}" if None not in times else "—"
            wall = " \\| ".join(f"{t:.0f}" if t is not None else "—" for t in times)  # one cell: cil \| Avalanche
            names = f"`{config.split('/')[0]}`" if config else "—"
            names += f" / `{avalanche_name}`" if avalanche_name else " / —"
            lines.append(f"| {label} | {names} | {cells[0]} | {cells[1]} | {wall} | {ratio} |")
        agreement = slda_agreement(stream, cfg)
    header = [
        "| method | cil / Avalanche | cil: avg / last / forgetting (%) | Avalanche: avg / last / forgetting (%) "
        "| wall s (cil \\| Avalanche) | time ratio cil/Avalanche |",
        "|---|---|---|---|---|---|",
    ]
    a = agreement
    note = (
        f"\nSLDA check on the same frozen features ({a['n']} test images): Avalanche's prediction rule on our "
        f"statistics gives our head's prediction on {100 * a['exact']:.2f}% of them (largest logit difference "
        f"{a['max_logit_diff']:.1e} of the largest logit); fitted its own way (one sample "
        f"at a time, its approximate covariance update) its predictions equal ours on {100 * a['streaming']:.2f}% "
        f"(accuracy {100 * a['theirs_acc']:.2f}% vs ours {100 * a['ours_acc']:.2f}%).\n\nFashion-MNIST 5 × 2 classes "
        f"(order {stream.original_class_ids}), {args.train_per_class} train / {args.test_per_class} test images per "
        f"class, tf_efficientnet_lite0 ImageNet weights at 64 px, {args.epochs} epochs, SGD lr {args.lr}, batch "
        f"{args.batch_size}, memory {args.memory}, EWC λ {args.ewc_lambda:g}, seed {args.seed}; {machine()}; "
        f"{time.perf_counter() - began:.0f} s in all."
    )
    text = "\n".join(header + lines) + "\n" + note
    if spreads:
        text += "\n\nMedians of interleaved repeats; time ratios: " + "; ".join(spreads) + "."
    print(text)
    if args.readme:
        write_block("peers-table", text)
    if agreement["exact"] < 0.999:
        raise SystemExit(f"the SLDA prediction rules disagree on {100 * (1 - agreement['exact']):.2f}% of test images")


if __name__ == "__main__":
    main()
