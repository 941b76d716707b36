"""Every strategy on the embedded digits stream, 3 seeds: mean ± std of the final metrics, ranked (make bench-digits).

Runs each strategy's ``configs/<strategy>/digits.yaml`` (the ``make demo`` settings) with ``run.seed`` = 0, 1, 2
(the seed also sets the class order, the train/test split and the initialisation), then prints a Markdown table
ranked by last accuracy. ``--readme`` rewrites the table between the ``digits-table`` markers of README.md.
Random backbones (nothing can be downloaded here): the table ranks the pipelines on this toy stream, not the methods
on their papers' benchmarks. Mamba-FSCIL runs its few-shot variant (4 base classes, 3 sessions of 2-way 5-shot).

    python benchmarks/digits_table.py [--seeds 0 1 2] [--readme]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from _machine import machine
from _readme import write_block

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ["finetune", "joint", "simplecil", "fsa", "mos", "mamba_fscil", "zscl", "dkvb"]
METRICS = ["avg_incremental_acc", "last_acc", "forgetting"]


def table(results: dict[str, list[dict[str, float]]], seeds: list[int]) -> str:
    rows = []
    for name, runs in results.items():
        stats = {m: (np.mean([r[m] for r in runs]), np.std([r[m] for r in runs])) for m in METRICS}
        rows.append((name, stats))
    rows.sort(key=lambda row: -row[1]["last_acc"][0])
    lines = [
        "| rank | strategy | avg. incremental acc. (%) | last acc. (%) | forgetting (%) |",
        "|---|---|---|---|---|",
    ]
    for rank, (name, stats) in enumerate(rows, 1):
        cells = " | ".join(f"{100 * mu:.2f} ± {100 * sd:.2f}" for mu, sd in (stats[m] for m in METRICS))
        lines.append(f"| {rank} | `{name}` | {cells} |")
    lines.append("")
    lines.append(f"Seeds {', '.join(map(str, seeds))}; mean ± std over seeds; {machine()}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--readme", action="store_true", help="rewrite the table in README.md")
    args = parser.parse_args()
    os.environ.setdefault("CIL_QUIET", "1")
    from cil.cli import quiet_lightning
    from cil.config import load_config
    from cil.runs import load_run
    from cil.session import run_experiment

    quiet_lightning()
    results: dict[str, list[dict[str, float]]] = {}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for name in args.strategies:
            for seed in args.seeds:
                overrides = [f"run.seed={seed}", f"run.output_dir={out}", "trainer.enable_progress_bar=false"]
                run = load_run(run_experiment(load_config(ROOT / "configs" / name / "digits.yaml", overrides)))
                results.setdefault(name, []).append({m: run.metric(m) for m in METRICS})
                print(f"{name} seed {seed}: last acc {100 * run.metric('last_acc'):.2f}", flush=True)
    text = table(results, args.seeds) + f" {time.perf_counter() - began:.0f} s in all."
    print(text)
    if args.readme:
        write_block("digits-table", text)


if __name__ == "__main__":
    main()
