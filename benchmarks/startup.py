"""A run's fixed cost: the wall time of a process that imports cil's session loop, and of a tiny complete run
(``cil run simplecil/digits`` on 16 px images, one session's worth of work per session), each in a fresh process,
repeated; beside them, a process importing only the libraries every run needs (torch, torchvision, Lightning, timm):
the floor while the loop is Lightning's. And what the imports are (``python -X importtime``: the largest top-level
packages).

    python benchmarks/startup.py [--repeats 5] [--readme]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import machine
from _readme import write_block
from _timing import median_range

ROOT = Path(__file__).resolve().parent.parent
CIL = (
    [str(ROOT / ".venv" / "bin" / "cil")]
    if (ROOT / ".venv" / "bin" / "cil").exists()
    else [sys.executable, "-m", "cil.cli"]
)

# what every run imports whatever its config: the floor of a run's fixed cost while the loop is Lightning's
LIBRARIES = ("torch", "torchvision", "pytorch_lightning", "timm")


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """(wall s, CPU s of the child process) of one run of ``command``."""
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime)


def top_imports(env: dict) -> list[tuple[str, float]]:
    """The cumulative import time of each package root the session loop imports (where it is first imported,
    nested or not), largest first: what a run pays before its first line of work."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import cil.session"], capture_output=True, text=True, env=env
    ).stderr
    totals = {}
    for line in out.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| \s*(\S+)$", line)
        if m and "." not in m.group(2) and not m.group(2).startswith("_"):
            totals[m.group(2)] = max(totals.get(m.group(2), 0.0), int(m.group(1)) / 1e6)
    return sorted(totals.items(), key=lambda kv: -kv[1])[:8]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    env = {**os.environ, "CIL_QUIET": "1"}
    floor, imports, runs = [], [], []
    with tempfile.TemporaryDirectory() as out:
        tiny = [*CIL, "run", "simplecil/digits", f"run.output_dir={out}", "backbone.image_size=16",
                "trainer.enable_progress_bar=false"]  # fmt: skip
        for _ in range(args.repeats):  # the three interleaved
            floor.append(timed([sys.executable, "-c", f"import {', '.join(LIBRARIES)}"], env))
            imports.append(timed([sys.executable, "-c", "import cil.session"], env))
            runs.append(timed(tiny, env))
    top = top_imports(env)

    def spread(v: list[tuple[float, float]]) -> str:
        return f"{median_range((w for w, _ in v), '.1f', ' s')} | {statistics.median(c for _, c in v):.1f} s"

    text = (
        f"| fresh process | wall: median (range) over {args.repeats} | CPU: median |\n|---|---|---|\n"
        f"| `import {', '.join(LIBRARIES)}` (the libraries every run needs, nothing of cil) | {spread(floor)} |\n"
        f"| `import cil.session` (torch, Lightning, timm, Avalanche's stream types) | {spread(imports)} |\n"
        f"| `cil run simplecil/digits` at 16 px, 5 sessions, run folder and plots | {spread(runs)} |\n\n"
        "Largest imports (`python -X importtime`, cumulative): "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in top)
        + f". {machine()}."
    )
    print(text)
    if args.readme:
        write_block("startup", text)


if __name__ == "__main__":
    main()
