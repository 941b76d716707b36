"""Our CUDA selective scan on a GPU: time, achieved bandwidth and its fraction of the measured copy bandwidth.

Shapes: Mamba-FSCIL's scans (float32, dstate 256, varying B/C, D, delta bias, softplus; z where the method uses
it) and a standard Mamba block (batch 8, dim 1536, dstate 16, L 2048). For each: forward and forward+backward time
(CUDA events, median of ``--repeats`` after warm-up) for ours, the chunked PyTorch path and the sequential
reference (skipped where it would not fit), and mamba-ssm's kernel when it is installed. Bytes come from the
traffic model (compulsory bytes only, no chunk-state write for ours); the fraction is against a
device-to-device copy measured in the same run.

    python benchmarks/scan_cuda.py [--repeats 50]
    python benchmarks/scan_cuda.py --model   # the traffic model's table only: bytes, not a measurement
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


def old_tile(group_size: int) -> int:
    """The backward's tile before the per-tile sums (issue 31): the largest of 16, 8, 4, 2 dividing the group."""
    return next((t for t in (16, 8, 4, 2) if group_size % t == 0), 1)


def kernel_extras(batch, dim, length, dstate, groups, z, s=4) -> dict[str, dict[str, float]]:
    """Bytes the kernels move beyond the compulsory ones, before and after the backward's dB / dC were summed per
    tile in registers and the forward's B / C read once per tile (both B and C varying, as in every shape here).

    ``scratch``: the backward's per-tile dB / dC partials at HBM level — before: zeroed (memset), written back, read
    by the caller's sum over tiles; after: stored once, read by the sum. ``rmw``: before, every channel read and
    wrote its tile's slice (served by L2 while the slice stays there). ``fwd_bc`` / ``bwd_bc``: B and C reads the
    kernels issue (to L1 / L2; the compulsory model counts each once): before, the forward read both per channel and
    the backward B twice and C once per channel (B once more for the chunk starts when L > 64); after, the forward
    reads them once per tile of up to 8 channels and the backward once per tile (16-64 channels) into shared memory.
    ``carry``: L > 64 only, chunk-start states (before: written and read once per channel; after: written once, read
    by the next chunk's sweep, the adjoint pass and the dC pass) and, after, the adjoint and dA carried between
    chunks (written and read once each).
    """
    from cil.ops.selective_scan.harness import load

    kernels = load()
    rows, group = batch * dim, dim // groups
    per_row = rows * length * dstate * s  # one (batch, dim, L, dstate) array of B's dtype
    c = -(-length // 64)
    tiles_before, tiles_after = dim // old_tile(group), dim // kernels.backward_tile_for(group, rows)
    forward_tiles = dim // kernels.forward_tile_for(group, rows)
    slice_bytes = batch * length * dstate * 4  # one tile's partial
    state_rows = rows * dstate * 4
    return {
        "before": dict(
            tile=dim // tiles_before,
            scratch=2 * 3 * tiles_before * slice_bytes,
            rmw=2 * 2 * rows * length * dstate * 4,
            fwd_bc=2 * per_row,
            bwd_bc=(3 + (c > 1)) * per_row,
            carry=2 * state_rows * (c - 1),
        ),
        "after": dict(
            tile=dim // tiles_after,
            scratch=2 * 2 * tiles_after * slice_bytes,
            rmw=0,
            fwd_bc=2 * per_row * forward_tiles // dim,
            bwd_bc=(2 + (c > 1)) * per_row * tiles_after // dim,
            carry=(4 + 2 + 2) * state_rows * (c - 1),
        ),
    }


def print_model() -> None:
    """The traffic model's table (no GPU needed): compulsory bytes and the kernels' extras, before and after."""
    mb = 1e6
    columns = ["shape", "bwd tile", "dB/dC scratch", "per-channel RMW at L2", "fwd B/C reads", "bwd B/C reads"]
    print("| " + " | ".join(columns + ["chunk carry"]) + " |  (MB, before → after)")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, shape in SHAPES.items():
        extras = kernel_extras(*shape)
        before, after = extras["before"], extras["after"]
        print(
            f"| {name} | {before['tile']} → {after['tile']} | {before['scratch'] / mb:,.0f} → "
            f"{after['scratch'] / mb:,.0f} | {before['rmw'] / mb:,.0f} → 0 | {before['fwd_bc'] / mb:,.0f} → "
            f"{after['fwd_bc'] / mb:,.0f} | {before['bwd_bc'] / mb:,.0f} → {after['bwd_bc'] / mb:,.0f} | "
            f"{before['carry'] / mb:,.0f} → {after['carry'] / mb:,.0f} |"
        )
    print("\ncompulsory bytes (forward + backward, MB):")
    for name, shape in SHAPES.items():
        print(f"  {name}: {sum(traffic(*shape)) / mb:,.1f}")


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
    parser.add_argument("--model", action="store_true", help="print the traffic model's table and stop (no GPU)")
    args = parser.parse_args()
    if args.model:
        print_model()
        return
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
