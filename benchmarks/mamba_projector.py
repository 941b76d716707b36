"""Mamba-FSCIL's projector: one forward + backward with our scan against the PyTorch reference scan.

Two shapes of the official settings (``docs/methods/mamba_fscil.md`` §2), with d_state = dt_rank = 256:

- CIFAR-100 incremental: 64 cached 640 x 2 x 2 maps, base branch frozen, new branch trained (4 directions);
- miniImageNet base: 64 images' 640 x 5 x 5 maps into a 512-wide base branch (with the residual projection).

Each is timed with the scan the dispatcher picks for the device (``impl=None``: the fused C++ kernel on CPU, ours on
CUDA once built) and with ``impl="reference"``, in the same process; the script checks both give the same loss.

    python benchmarks/mamba_projector.py [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
from _machine import machine

from cil.layers.ssm import DualSelectiveProjector

SHAPES = {
    # name: (batch, C_in, C_out, side, residual projection, new branch)
    "CIFAR incremental (64, 640x2x2)": (64, 640, 640, 2, False, True),
    "mini base (64, 640x5x5 -> 512)": (64, 640, 512, 5, True, False),
}


def use_scan(model: torch.nn.Module, impl: str | None) -> None:
    for module in model.modules():
        if hasattr(module, "scan_impl"):
            module.scan_impl = impl


def step(model: DualSelectiveProjector, maps: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    out = model(maps)
    loss = out.features.square().mean() + out.gate.square().mean()
    loss.backward()
    return float(loss.detach())


def best_time(model, maps, repeats: int) -> tuple[float, float]:
    loss = step(model, maps)  # warm-up (and the kernel build on first use)
    times = []
    for _ in range(repeats):
        if maps.is_cuda:
            torch.cuda.synchronize()
        began = time.perf_counter()
        step(model, maps)
        if maps.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return min(times), loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"machine: {machine()}, device {args.device}; forward + backward, best of {args.repeats}\n")
    print(f"{'shape':34s} {'reference (s)':>14s} {'ours (s)':>10s} {'ratio':>7s}")
    for name, (batch, c_in, c_out, side, residual, new) in SHAPES.items():
        torch.manual_seed(0)
        model = DualSelectiveProjector(c_in, c_out, (side, side), residual_proj=residual, new_branch=new)
        model.to(args.device)
        if new:  # the incremental session trains the new branch only; give its gate a non-zero start
            model.base.requires_grad_(False)
            with torch.no_grad():
                model.new.ssm.block.in_proj.weight.normal_(0, 0.02)
        maps = torch.randn(batch, c_in, side, side, device=args.device)
        use_scan(model, "reference")
        reference, loss_ref = best_time(model, maps, args.repeats)
        use_scan(model, None)
        ours, loss = best_time(model, maps, args.repeats)
        assert abs(loss - loss_ref) <= 1e-4 * max(1.0, abs(loss_ref)), (loss, loss_ref)
        print(f"{name:34s} {reference:14.3f} {ours:10.3f} {reference / ours:6.1f}x")


if __name__ == "__main__":
    main()
