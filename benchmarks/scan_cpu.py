"""Selective scan on the CPU: the chunked fast path against the sequential reference, at Mamba-FSCIL's shapes.

Shapes (``shared/scan.md`` §3; float32, d_state 256, varying B/C, D, delta bias and softplus as the model calls it):
CIFAR-100 base (64, 640, 4) with z, CIFAR-100 incremental (8, 640, 4) with z, miniImageNet base (64, 512, 25) with z,
and CUB-200 base (·, 4096, 49) with 4 groups and no z, at a reduced batch: the reference materialises
(batch, dim, L, d_state) tensors, about 13 GB each at batch 64.

For each shape: forward and forward+backward time of both (minimum of the repeats, the two run side by side in this
process), their ratio, the peak extra memory of one forward+backward (measured in a child process, resident set
growth), and the largest difference between the two outputs.

    python benchmarks/scan_cpu.py [--cub-batch 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import torch

from cil.ops.selective_scan import selective_scan

N = 256


def make(batch, dim, length, groups, gate, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g) * 0.5,
        "A": -torch.rand(dim, N, generator=g) * 4,
        "B": torch.randn(batch, groups, N, length, generator=g),
        "C": torch.randn(batch, groups, N, length, generator=g),
        "D": torch.randn(dim, generator=g),
        "z": torch.randn(batch, dim, length, generator=g) if gate else None,
        "delta_bias": torch.randn(dim, generator=g) * 0.5,
    }


def step(inputs, impl, backward):
    leaves = {k: (v.clone().requires_grad_(backward) if v is not None else None) for k, v in inputs.items()}
    out = selective_scan(**leaves, delta_softplus=True, impl=impl)
    if backward:
        out.backward(torch.ones_like(out))
    return out.detach()


def timed(inputs, impl, backward, repeats):
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        step(inputs, impl, backward)
        best = min(best, time.perf_counter() - began)
        if best > 10:  # one repeat is enough for the slow ones
            break
    return best


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """VmHWM, the peak resident set of this process image (ru_maxrss would carry the parent's peak over exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _child(shape, impl, queue):
    inputs = make(*shape)
    before = _rss_mb()
    step(inputs, impl, backward=True)
    queue.put(_peak_rss_mb() - before)


def peak_mb(shape, impl) -> float:
    ctx = mp.get_context("spawn")  # a forked child would inherit OpenMP's thread pool in an unusable state
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(shape, impl, queue))
    child.start()
    value = queue.get()
    child.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cub-batch", type=int, default=4)
    args = parser.parse_args()
    shapes = [
        ("CIFAR base", 64, 640, 4, 1, True),
        ("CIFAR incremental", 8, 640, 4, 1, True),
        ("mini base", 64, 512, 25, 1, True),
        (f"CUB base (batch {args.cub_batch})", args.cub_batch, 4096, 49, 4, False),
    ]
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    print(f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, float32, d_state {N}\n", flush=True)
    header = (
        f"{'shape (batch, dim, L)':<34} {'fwd ref':>8} {'fwd ours':>8} {'ratio':>6} {'f+b ref':>8} {'f+b ours':>8}"
        f" {'ratio':>6} {'peak MB ref':>11} {'peak MB ours':>12} {'max |diff|':>10}"
    )
    print(header, flush=True)
    for name, batch, dim, length, groups, gate in shapes:
        inputs = make(batch, dim, length, groups, gate)
        diff = (step(inputs, "reference", False) - step(inputs, "chunked", False)).abs().max().item()
        fwd = [timed(inputs, impl, False, args.repeats) for impl in ("reference", "chunked")]
        both = [timed(inputs, impl, True, args.repeats) for impl in ("reference", "chunked")]
        peaks = [peak_mb((batch, dim, length, groups, gate), impl) for impl in ("reference", "chunked")]
        label = f"{name} ({batch}, {dim}, {length})"
        print(
            f"{label:<34} {fwd[0]:>8.3f} {fwd[1]:>8.3f} {fwd[0] / fwd[1]:>5.1f}x {both[0]:>8.3f} {both[1]:>8.3f}"
            f" {both[0] / both[1]:>5.1f}x {peaks[0]:>11.0f} {peaks[1]:>12.0f} {diff:>10.1e}",
            flush=True,
        )
    print("\ntimes in seconds; ratio = reference / chunked")


if __name__ == "__main__":
    main()
