"""The training step against the hardware: images/s of forward + backward + SGD step for cil's backbones, in both
memory formats, against the FLOP count and a matmul measured in the same process.

For each (backbone, image size): a bare step (the timm body from cil's factory, a linear head, cross-entropy, SGD
with momentum) on a fixed random batch, in ``contiguous`` (NCHW) and ``channels_last`` (NHWC) memory format, the two
alternating step by step after a warm-up, repeated. The FLOPs of a step are counted with PyTorch's own
``torch.utils.flop_counter.FlopCounterMode`` on the forward and taken x3 for forward + backward (the usual
approximation: the backward costs about twice the forward); the ceiling is an fp32 matmul of the same thread count
timed here. Printed: ms per step (median, range), images/s, achieved GFLOP/s and its fraction of the matmul's, and
the ratio contiguous / channels_last per step with its range.

    python benchmarks/train_step.py [--repeats 5] [--steps 10] [--batch 64] [--readme]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [("resnet10t", 32), ("tf_efficientnet_lite0", 64), ("resnet18", 112)]


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


def step_fn(model, head, x, y, optimizer):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(head(model(x)), y)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    from cil.backbones import create_backbone

    peak = matmul_gflops()
    lines = [
        "| backbone @ px | format | ms / step (median, range) | images/s | GFLOP/s | of matmul | contiguous / channels_last |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, size in CASES:
        torch.manual_seed(0)
        steps, flops = {}, None
        for fmt in ("contiguous", "channels_last"):
            memory = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            model = create_backbone(name).train().to(memory_format=memory)
            head = torch.nn.Linear(model.num_features, 10)
            x = torch.randn(args.batch, 3, size, size).to(memory_format=memory)
            y = torch.randint(0, 10, (args.batch,))
            params = [*model.parameters(), *head.parameters()]
            steps[fmt] = step_fn(model, head, x, y, torch.optim.SGD(params, lr=0.01, momentum=0.9))
            if flops is None:
                flops = 3 * forward_flops(model, x[:1]) * args.batch
            for _ in range(3):
                steps[fmt]()
        times = {f: [] for f in steps}
        for r in range(args.repeats):
            for fmt in steps if r % 2 == 0 else list(steps)[::-1]:
                t = time.perf_counter()
                for _ in range(args.steps):
                    steps[fmt]()
                times[fmt].append((time.perf_counter() - t) / args.steps)
        ratios = [c / l for c, l in zip(times["contiguous"], times["channels_last"])]
        for fmt in steps:
            med = statistics.median(times[fmt])
            gflops = flops / med / 1e9
            ratio = (
                f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if fmt == "channels_last" else ""
            )
            lines.append(
                f"| {name} @ {size} | {fmt} | {1e3 * med:.1f} ({1e3 * min(times[fmt]):.1f}-{1e3 * max(times[fmt]):.1f}) "
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


if __name__ == "__main__":
    main()
