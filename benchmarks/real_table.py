"""The headline real-data table: Fashion-MNIST, ImageNet EfficientNet-Lite0 against the same network randomly
initialised, 3 seeds, mean ± std (make bench-real).

Runs ``configs/simplecil/fashion_mnist.yaml``, ``configs/fsa/fashion_mnist_none.yaml`` (frozen backbone + the
code's LDA head) and ``configs/fsa/fashion_mnist.yaml`` (body adapted on session 1) with the ImageNet weights
(``backbone.weights=package:efficientnet_lite0``) and without (``backbone.weights=null``: timm's random init, seeded),
for ``run.seed`` = 0, 1, 2 (the seed also sets the class order and the per-class subset). The run folders are kept
under ``--output-dir`` (default ``runs/real-table``), named ``<row>-<weights>``, so the forgetting-curves notebook
can show them (``RUN_DIRS = sorted(glob.glob("runs/real-table/*/*"))``). ``--readme`` rewrites the table between the
``real-table`` markers of README.md.

    python benchmarks/real_table.py [--seeds 0 1 2] [--train-per-class 300] [--test-per-class 200] [--readme]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from _machine import machine
from _readme import write_block

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ROWS = [  # (run-name prefix, label, config)
    ("simplecil", "`simplecil` (frozen backbone, cosine prototypes)", "simplecil/fashion_mnist.yaml"),
    ("fsa-none", "`fsa` adaptation=none (frozen backbone, LDA head)", "fsa/fashion_mnist_none.yaml"),
    ("fsa-full", "`fsa` adaptation=full (body adapted on session 1, LDA head)", "fsa/fashion_mnist.yaml"),
]
WEIGHTS = {"random": "backbone.weights=null", "imagenet": "backbone.weights=package:efficientnet_lite0"}
METRICS = ("avg_incremental_acc", "last_acc", "forgetting")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--output-dir", default=str(ROOT / "runs" / "real-table"))
    parser.add_argument("--data-root", default=None, help="default: the configs' (Debian's path)")
    parser.add_argument("--readme", action="store_true", help="rewrite the table in README.md")
    args = parser.parse_args()
    os.environ.setdefault("CIL_QUIET", "1")
    from cil.cli import quiet_lightning
    from cil.config import load_config
    from cil.runs import load_run, over_seeds
    from cil.session import run_experiment

    quiet_lightning()
    began = time.perf_counter()
    runs = []
    for prefix, _, config in ROWS:
        for weights, override in WEIGHTS.items():
            for seed in args.seeds:
                overrides = [
                    f"run.seed={seed}", f"run.name={prefix}-{weights}", f"run.output_dir={args.output_dir}", override,
                    f"stream.train_per_class={args.train_per_class}", f"stream.test_per_class={args.test_per_class}",
                    "trainer.enable_progress_bar=false",
                ]  # fmt: skip
                if args.data_root:
                    overrides.append(f"stream.data_root={args.data_root}")
                t0 = time.perf_counter()
                run = load_run(run_experiment(load_config(ROOT / "configs" / config, overrides)))
                runs.append(run)
                print(f"{prefix}-{weights} seed {seed}: last acc {100 * run.metric('last_acc'):.2f} "
                      f"({time.perf_counter() - t0:.0f} s) {run.path}", flush=True)  # fmt: skip
    table = over_seeds(runs, METRICS)
    lines = [
        "| strategy | backbone | avg. incremental acc. (%) | last acc. (%) | forgetting (%) |",
        "|---|---|---|---|---|",
    ]
    for prefix, label, _ in ROWS:
        for weights in ("random", "imagenet"):
            row = table.loc[f"{prefix}-{weights}"]
            name = "ImageNet Lite0" if weights == "imagenet" else "random Lite0"
            lines.append(f"| {label} | {name} | " + " | ".join(row[m] for m in METRICS) + " |")
    lines += [
        "",
        f"Fashion-MNIST, 5 sessions × 2 classes (seeded order), {args.train_per_class} training and "
        f"{args.test_per_class} test images per class (seeded), tf_efficientnet_lite0 at 64 px; seeds "
        f"{', '.join(map(str, args.seeds))}, mean ± std over seeds; {machine()}; "
        f"{time.perf_counter() - began:.0f} s in all.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.readme:
        write_block("real-table", text)


if __name__ == "__main__":
    main()
