"""Selective scan on the CPU: the chunked path and the fused kernel against the reference at Mamba-FSCIL's shapes.

Shapes (Mamba-FSCIL's paper configs; float32, d_state 256, varying B/C, D, delta bias and softplus as the model
calls it):
CIFAR-100 base (64, 640, 4) with z, CIFAR-100 incremental (8, 640, 4) with z, miniImageNet base (64, 512, 25) with z,
and CUB-200 base (·, 4096, 49) with 4 groups and no z, at a reduced batch: the reference materialises
(batch, dim, L, d_state) tensors, about 13 GB each at batch 64.

For each shape and implementation: forward and forward+backward time (minimum of the repeats, all run side by side
in this process), the ratio to the reference, the peak extra memory of one forward+backward (resident-set growth in
a fresh child process), and the largest difference from the reference's output.

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
    print(
        f"{'shape (batch, dim, L)':<34} {'impl':<9} {'fwd s':>7} {'ratio':>6} {'fwd+bwd s':>9} {'ratio':>6}"
        f" {'peak MB':>8} {'max |diff|':>10}",
        flush=True,
    )
    impls = ("reference", "chunked", "cpu")
    for name, batch, dim, length, groups, gate in shapes:
        inputs = make(batch, dim, length, groups, gate)
        reference = step(inputs, "reference", False)
        fwd, both = {}, {}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits all alike
            for impl in impls:
                fwd[impl] = min(fwd.get(impl, float("inf")), timed(inputs, impl, False, 1))
                both[impl] = min(both.get(impl, float("inf")), timed(inputs, impl, True, 1))
        for impl in impls:
            diff = (step(inputs, impl, False) - reference).abs().max().item()
            peak = peak_mb((batch, dim, length, groups, gate), impl)
            label = f"{name} ({batch}, {dim}, {length})" if impl == "reference" else ""
            print(
                f"{label:<34} {impl:<9} {fwd[impl]:>7.3f} {fwd['reference'] / fwd[impl]:>5.1f}x"
                f" {both[impl]:>9.3f} {both['reference'] / both[impl]:>5.1f}x {peak:>8.0f} {diff:>10.1e}",
                flush=True,
            )
    print("\ntimes in seconds (best of the repeats); ratio = reference time / this time")


if __name__ == "__main__":
    main()
