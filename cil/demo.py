"""``make demo``: finetune (lower bound), joint (upper bound), SimpleCIL, FSA, MOS, Mamba-FSCIL, ZSCL (a
tiny random CLIP), DKVB and Avalanche's Replay (trained by Avalanche's own code, ``avalanche/digits``) on the
embedded digits stream (Mamba-FSCIL on its few-shot variant).

Prints one row per strategy (average incremental accuracy, last accuracy, forgetting) and the run folders.
Extra ``key=value`` arguments apply to every run (e.g. ``python -m cil.demo run.seed=1``).
"""

from __future__ import annotations

import sys
import time

from cil.cli import quiet_lightning
from cil.config import ConfigError, load_config
from cil.registry import BUILTIN_STRATEGIES

STRATEGIES = list(BUILTIN_STRATEGIES)  # bounds first, then the methods


def main(overrides: list[str]) -> int:
    from cil.runs import compare, load_run
    from cil.session import run_experiment

    quiet_lightning()
    try:
        configs = [load_config(f"{name}/digits", overrides) for name in STRATEGIES]
    except ConfigError as e:
        print(f"cil demo: error: {e}", file=sys.stderr)
        return 2
    began = time.perf_counter()
    runs = []
    for name, cfg in zip(STRATEGIES, configs):
        print(f"\n=== {name} on digits ({cfg.stream.split}, backbone {cfg.backbone.name}) ===", flush=True)
        runs.append(load_run(run_experiment(cfg)))
    table = compare(runs, ["avg_incremental_acc", "last_acc", "forgetting"])
    print(f"\nClass-incremental digits, {runs[0].summary['n_sessions']} sessions of 2 classes (accuracies in %);")
    print("mamba_fscil runs the few-shot variant: 4 base classes, then 3 sessions of 2-way 5-shot.\n")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"\nTotal {time.perf_counter() - began:.0f} s. Compare runs with: cil report {' '.join(map(str, table.run))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
