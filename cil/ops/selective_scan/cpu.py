"""The fused CPU selective scan (``cpu_kernel.cpp``), compiled with PyTorch's C++ extension builder on first use.

The build takes about half a minute once and is cached by PyTorch (``TORCH_EXTENSIONS_DIR``, by default under
``~/.cache/torch_extensions``). Without a C++ compiler or ninja the kernel is unavailable, and the dispatcher uses
the chunked PyTorch path instead.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Optional

import torch

from cil.ops.selective_scan.reference import compute_dtype

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
# -ffast-math lets GCC vectorise exp through glibc's vector math library and reassociate the sums over the state
FLAGS = ["-O3", "-ffast-math"] + (
    ["-mavx2", "-mfma"] if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else []
)
_lock = threading.Lock()
_module = None
_failure: Optional[str] = None


def load():
    """The compiled extension (built on first call), or None; :func:`unavailable_reason` then says why."""
    global _module, _failure
    with _lock:
        if _module is None and _failure is None:
            try:
                # its import warns that no CUDA runtime exists, which is irrelevant to a CPU build
                logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
                from torch.utils.cpp_extension import load as build

                logging.getLogger(__name__).info("building the fused CPU selective scan (once, ~30 s)")
                _module = build("cil_selective_scan_cpu", [str(SOURCE)], extra_cflags=FLAGS, verbose=False)
            except Exception as e:  # no compiler, no ninja, a failed build: the chunked path still works
                _failure = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    return _module


def unavailable_reason() -> Optional[str]:
    return None if load() is not None else f"the fused CPU kernel could not be built ({_failure})"


def _empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


class FusedCPUSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        B, C = (M.transpose(-1, -2) if M.dim() == 4 else M for M in (B, C))  # varying: time-major (b, G, L, n)
        args = [
            t.to(dtype).contiguous() if t is not None else _empty(u.to(dtype))
            for t in (u, delta, A, B, C, D, z, delta_bias)
        ]
        out, y, last = load().fwd(*args, delta_softplus)
        ctx.save_for_backward(*args)
        ctx.config = (delta_softplus, dtype, [t is not None for t in (D, z, delta_bias)])
        ctx.input_dtypes = [t.dtype if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias)]
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, bias = ctx.saved_tensors
        softplus, dtype, (has_D, has_z, has_bias) = ctx.config
        dout = dout.to(dtype).contiguous() if dout is not None else torch.zeros_like(u)
        dlast = dlast.to(dtype).contiguous() if dlast is not None else _empty(u)
        du, ddelta, dA, dB, dC, dz = load().bwd(u, delta, A, B, C, D, z, bias, softplus, dout, dlast)
        gy = dout * torch.nn.functional.silu(z) if has_z else dout
        dD = (gy * u).sum((0, 2)) if has_D else None
        dbias = ddelta.sum((0, 2)) if has_bias else None
        dB, dC = (g.transpose(-1, -2) if g.dim() == 4 else g for g in (dB, dC))
        grads = [du, ddelta, dA, dB, dC, dD, dz if has_z else None, dbias]
        cast = [g.to(t) if g is not None else None for g, t in zip(grads, ctx.input_dtypes)]
        return (*cast, None)


def selective_scan_cpu(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    if load() is None:
        raise RuntimeError(f"selective_scan: impl='cpu' is unavailable: {unavailable_reason()}")
    if u.device.type != "cpu":
        raise RuntimeError(f"selective_scan: impl='cpu' runs CPU tensors; these are on {u.device}")
    B, C = (M.unsqueeze(1) if M.dim() == 3 else M for M in (B, C))
    out, last = FusedCPUSelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last) if return_last_state else out
