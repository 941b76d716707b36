"""Our CUDA selective scan on a GPU: time, achieved bandwidth and its fraction of the measured copy bandwidth.

Shapes: Mamba-FSCIL's scans (float32, dstate 256, varying B/C, D, delta bias, softplus; z where the method uses
it) and a standard Mamba block (batch 8, dim 1536, dstate 16, L 2048). For each: forward and forward+backward time
(CUDA events, median of ``--repeats`` after warm-up) for ours, the chunked PyTorch path and the sequential
reference (skipped where it would not fit), and mamba-ssm's kernel when it is installed. Bytes come from the
traffic model (compulsory bytes only, no chunk-state write for ours); the fraction is against a
device-to-device copy measured in the same run.

    python benchmarks/scan_cuda.py [--repeats 50]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

SHAPES = {
    # name: (batch, dim, L, dstate, groups, z)
    "CIFAR base (64, 640, 4)": (64, 640, 4, 256, 1, True),
    "CIFAR inc (8, 640, 4)": (8, 640, 4, 256, 1, True),
    "mini base (64, 512, 25)": (64, 512, 25, 256, 1, True),
    "CUB base (64, 4096, 49), G4": (64, 4096, 49, 256, 4, False),
    "Mamba block (8, 1536, 2048), N16": (8, 1536, 2048, 16, 1, True),
}


def traffic(batch, dim, length, dstate, groups, z, s=4) -> tuple[float, float]:
    """Compulsory bytes of forward and backward (c = 1, no chunk-state write)."""
    m, p = batch * dim * length, batch * groups * dstate * length
    fwd = s * m * (2 + 2 * z + 1) + 2 * s * p + 4 * dim * dstate + 8 * dim
    bwd = s * m * (3 + 2 * z) + 2 * s * p + s * m * (2 + z) + 2 * 4 * p
    return fwd, bwd


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(repeats: int) -> float:
    x = torch.empty(512 * 2**20 // 4, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / timed(lambda: y.copy_(x), repeats)


def inputs(batch, dim, length, dstate, groups, z):
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device="cuda", generator=g)

    return dict(
        u=r(batch, dim, length).requires_grad_(),
        delta=r(batch, dim, length).mul(0.5).requires_grad_(),
        A=(-torch.rand(dim, dstate, device="cuda", generator=g) - 0.05).requires_grad_(),
        B=r(batch, groups, dstate, length).requires_grad_(),
        C=r(batch, groups, dstate, length).requires_grad_(),
        D=r(dim).requires_grad_(),
        z=r(batch, dim, length).requires_grad_() if z else None,
        delta_bias=r(dim).mul(0.5).requires_grad_(),
    )


def main() -> None:
    from cil.ops.selective_scan import cuda_unavailable_reason, selective_scan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--reference-limit-gb", type=float, default=20.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("scan_cuda: skipped, torch sees no CUDA device")  # `make bench` runs on CPU machines too
        return
    reason = cuda_unavailable_reason(torch.zeros(1, device="cuda"))
    if reason:
        raise SystemExit(f"our CUDA kernel is unavailable: {reason}")
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        selective_scan_fn = None
    peak = copy_bandwidth(args.repeats)
    print(f"{torch.cuda.get_device_name()}; measured copy bandwidth {peak / 1e9:.0f} GB/s\n")
    print("| shape | impl | fwd (ms) | fwd GB/s | % copy | fwd+bwd (ms) | GB/s | % copy | vs reference | vs chunked |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        batch, dim, length, dstate, groups, z = shape
        data = inputs(*shape)
        fwd_bytes, bwd_bytes = traffic(*shape)
        ref_gb = batch * dim * length * dstate * 4 * 3 / 1e9  # exp(ΔA), ΔBu and the states it materialises
        impls = {"ours": dict(impl="cuda"), "chunked": dict(impl="chunked")}
        if ref_gb < args.reference_limit_gb:
            impls["reference"] = dict(impl="reference")
        if selective_scan_fn is not None:
            impls["mamba-ssm"] = None
        rows = {}
        for impl, kwargs in impls.items():
            if kwargs is None:
                call = partial(selective_scan_fn, **data, delta_softplus=True)
            else:
                call = partial(selective_scan, **data, delta_softplus=True, **kwargs)
            forward = timed(call, args.repeats)
            both = timed(lambda call=call: call().sum().backward(), max(3, args.repeats // 5))
            rows[impl] = (forward, both)
        for impl, (forward, both) in rows.items():
            f_bw, b_bw = fwd_bytes / forward, (fwd_bytes + bwd_bytes) / both
            vs_ref = f"{rows['reference'][1] / both:.1f}×" if "reference" in rows else "–"
            vs_chunked = f"{rows['chunked'][1] / both:.1f}×"
            print(
                f"| {name} | {impl} | {forward * 1e3:.3f} | {f_bw / 1e9:.0f} | {100 * f_bw / peak:.0f}% | "
                f"{both * 1e3:.3f} | {b_bw / 1e9:.0f} | {100 * b_bw / peak:.0f}% | {vs_ref} | {vs_chunked} |"
            )


if __name__ == "__main__":
    main()
