"""The training step against the hardware: images/s of forward + backward + SGD step for cil's backbones, in both
memory formats, against the FLOP count and a matmul measured in the same process.

For each (backbone, image size): a bare step (the timm body from cil's factory, a linear head, cross-entropy, SGD
with momentum) on a fixed random batch, in ``contiguous`` (NCHW) and ``channels_last`` (NHWC) memory format, the two
alternating step by step after a warm-up, repeated. The FLOPs of a step are counted with PyTorch's own
``torch.utils.flop_counter.FlopCounterMode`` on the forward and taken x3 for forward + backward (the usual
approximation: the backward costs about twice the forward); the ceiling is an fp32 matmul of the same thread count
timed here. Printed: ms per step (median, range), images/s, achieved GFLOP/s and its fraction of the matmul's, and
the ratio contiguous / channels_last per step with its range.

With ``--runs``: end to end, ``cil run finetune/fashion_mnist`` (Lite0 at 64 px; 300 train / 100 test images per
class) in each format for seeds 0 and 1, alternating: accuracy within seed noise, and the wall time of each run.

With ``--compile``: ``torch.compile`` of the Lite0 step at 64 px (channels_last), its compile time (the first
step) beside the eager and compiled steady-state step, and the steps a run must take before compiling pays.

    python benchmarks/train_step.py [--repeats 5] [--steps 10] [--batch 64] [--runs] [--compile] [--readme]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _machine import machine
from _readme import write_block
from _timing import median_range

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [("resnet10t", 32), ("resnet10t", 64), ("tf_efficientnet_lite0", 64), ("resnet18", 112)]


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def forward_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def make_step(name: str, size: int, batch: int, memory_format: str, compiled: bool = False):
    """(step, body, batch of inputs): one SGD-with-momentum step of the timm body + a linear head on a fixed batch."""
    from cil.backbones import create_backbone

    memory = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    model = create_backbone(name).train().to(memory_format=memory)
    head = torch.nn.Linear(model.num_features, 10)
    x = torch.randn(batch, 3, size, size).to(memory_format=memory)
    y = torch.randint(0, 10, (batch,))
    optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
    body = torch.compile(model) if compiled else model

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(head(body(x)), y)
        loss.backward()
        optimizer.step()

    return step, model, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", action="store_true", help="finetune/fashion_mnist end to end in both formats")
    parser.add_argument("--compile", action="store_true", help="torch.compile of the Lite0 step: compile time and gain")
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    if args.runs:
        return end_to_end(args)
    if args.compile:
        return compiled(args)
    peak = matmul_gflops()
    lines = [
        "| backbone @ px | format | ms / step (median, range) | images/s | GFLOP/s | of matmul "
        "| contiguous / channels_last |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, size in CASES:
        torch.manual_seed(0)
        steps, flops = {}, None
        for fmt in ("contiguous", "channels_last"):
            steps[fmt], model, x = make_step(name, size, args.batch, fmt)
            if flops is None:
                flops = 3 * forward_flops(model, x)  # the whole batch: BatchNorm needs more than one sample
            for _ in range(3):
                steps[fmt]()
        times = {f: [] for f in steps}
        for r in range(args.repeats):
            for fmt in steps if r % 2 == 0 else list(steps)[::-1]:
                t = time.perf_counter()
                for _ in range(args.steps):
                    steps[fmt]()
                times[fmt].append((time.perf_counter() - t) / args.steps)
        ratios = [a / b for a, b in zip(times["contiguous"], times["channels_last"])]
        for fmt in steps:
            med = statistics.median(times[fmt])
            gflops = flops / med / 1e9
            ratio = median_range(ratios) if fmt == "channels_last" else ""
            lines.append(
                f"| {name} @ {size} | {fmt} | {median_range((1e3 * t for t in times[fmt]), '.1f')} "
                f"| {args.batch / med:.0f} | {gflops:.1f} | {100 * gflops / peak:.0f}% | {ratio} |"
            )
        print(lines[-2], lines[-1], sep="\n", flush=True)
    text = "\n".join(lines) + (
        f"\n\nBatch {args.batch}, SGD with momentum, a linear head; FLOPs per step = 3 x the forward's "
        f"(torch.utils.flop_counter); the matmul ceiling measured here: {peak:.0f} GFLOP/s (fp32 1024^3); "
        f"{args.repeats} repeats of {args.steps} steps, the two formats alternating; {machine()}."
    )
    print(text)
    if args.readme:
        write_block("train-step", text)


def compiled(args) -> None:
    torch.manual_seed(0)
    results = {}
    for mode in ("eager", "compiled"):
        step, _, _ = make_step("tf_efficientnet_lite0", 64, args.batch, "channels_last", compiled=mode == "compiled")
        began = time.perf_counter()
        step()  # compiles the forward and backward graphs
        first = time.perf_counter() - began
        for _ in range(2):
            step()
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            for _ in range(args.steps):
                step()
            times.append((time.perf_counter() - began) / args.steps)
        results[mode] = (first, statistics.median(times))
        print(f"{mode}: first step {first:.1f} s, then {1e3 * results[mode][1]:.0f} ms per step", flush=True)
    saved = results["eager"][1] - results["compiled"][1]
    overhead = results["compiled"][0] - results["eager"][0]
    pays = f"after {overhead / saved:.0f} steps" if saved > 0 else "never (the compiled step is not faster)"
    text = (
        f"torch.compile of the Lite0 training step at 64 px (channels_last, batch {args.batch}): first step "
        f"{results['compiled'][0]:.1f} s against {results['eager'][0]:.1f} s eager; steady state "
        f"{1e3 * results['compiled'][1]:.0f} ms against {1e3 * results['eager'][1]:.0f} ms per step: compiling pays "
        f"{pays}. {machine()}."
    )
    print(text)
    if args.readme:
        write_block("train-step-compile", text)


def end_to_end(args) -> None:
    import os
    import tempfile

    os.environ.setdefault("CIL_QUIET", "1")
    from cil.cli import quiet_lightning
    from cil.config import load_config
    from cil.runs import load_run
    from cil.session import run_experiment

    quiet_lightning()
    rows = ["| seed | memory format | avg / last accuracy (%) | wall s |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as out:
        for seed in (0, 1):
            formats = ["contiguous", "channels_last"] if seed == 0 else ["channels_last", "contiguous"]
            for fmt in formats:
                overrides = [f"run.output_dir={out}", f"run.seed={seed}", f"backbone.memory_format={fmt}",
                             "stream.train_per_class=300", "stream.test_per_class=100",
                             "trainer.enable_progress_bar=false"]  # fmt: skip
                began = time.perf_counter()
                run = load_run(run_experiment(load_config("finetune/fashion_mnist", overrides)))
                wall = time.perf_counter() - began
                avg, last = (100 * run.metric(m) for m in ("avg_incremental_acc", "last_acc"))
                rows.append(f"| {seed} | {fmt} | {avg:.2f} / {last:.2f} | {wall:.0f} |")
                print(rows[-1], flush=True)
    setting = "`finetune/fashion_mnist` (2 epochs, batch 64), 300 / 100 images per class"
    text = "\n".join(rows) + f"\n\n{setting}; {machine()}."
    print(text)
    if args.readme:
        write_block("memory-format-runs", text)


if __name__ == "__main__":
    main()
