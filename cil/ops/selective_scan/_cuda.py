"""Our CUDA selective scan (``csrc/selective_scan_cuda.cu``), compiled with PyTorch's extension builder on first use.

The build is attempted only when torch sees a CUDA device, takes a minute or two once, and is cached by PyTorch
(``TORCH_EXTENSIONS_DIR``, by default under ``~/.cache/torch_extensions``). Without a CUDA device, ``nvcc`` or
ninja the kernel is unavailable, :func:`unavailable_reason` says why, and the dispatcher runs the chunked PyTorch
path instead (with a one-line warning for CUDA tensors).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cuda.cu"
CUDA_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]
MAX_DSTATE = 256
_lock = threading.Lock()
_module = None
_failure: Optional[str] = None


def _cuda_home() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME

    for home in (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return home
    return CUDA_HOME


def build(verbose: bool = False):
    """Compile and load the extension (no CUDA device needed to compile); raises on failure."""
    from torch.utils.cpp_extension import load as load_extension

    home = _cuda_home()
    if home:
        os.environ.setdefault("CUDA_HOME", home)
    if not torch.cuda.is_available():  # compiling without a device: name the architectures (Ampere, Hopper)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # some toolkits keep libcudart in lib/ rather than the lib64/ the builder links against
    ldflags = [f"-L{Path(home) / sub}" for sub in ("lib64", "lib") if home and (Path(home) / sub).is_dir()]
    # torch's CUDA headers include cuSPARSE/cuBLAS headers that a minimal toolkit may lack; the pip CUDA packages
    # torch depends on (nvidia/*/include) carry them
    includes = []
    try:
        import nvidia

        includes = sorted(str(p) for root in nvidia.__path__ for p in Path(root).glob("*/include") if p.is_dir())
    except ImportError:
        pass
    return load_extension(
        "cil_selective_scan_cuda",
        [str(SOURCE)],
        extra_cuda_cflags=CUDA_FLAGS,
        extra_ldflags=ldflags,
        extra_include_paths=includes,
        verbose=verbose,
    )


def load():
    """The compiled extension (built on the first call when a CUDA device exists), or None."""
    global _module, _failure
    with _lock:
        if _module is None and _failure is None:
            if not torch.cuda.is_available():
                _failure = "torch sees no CUDA device"
            else:
                try:
                    logging.getLogger(__name__).info("building the CUDA selective scan (once, 1-2 minutes)")
                    _module = build()
                except Exception as e:  # no nvcc, no ninja, a failed build: the chunked path still works
                    text = str(e).strip()
                    _failure = f"the build failed ({type(e).__name__}: {text.splitlines()[-1] if text else ''})"
    return _module


def unavailable_reason(*tensors: Optional[torch.Tensor]) -> Optional[str]:
    """Why the kernel cannot run these tensors, or None if it can."""
    present = [t for t in tensors if t is not None]
    off = [t.device.type for t in present if not t.is_cuda]
    if off:
        return f"the inputs are on {off[0]}, not on a CUDA device"
    if any(t.dtype == torch.float64 for t in present):
        return "the CUDA kernel runs float32, float16 and bfloat16 inputs, not float64"
    if len(present) >= 3 and present[2].dim() == 2 and present[2].shape[1] > MAX_DSTATE:
        return f"dstate {present[2].shape[1]} > {MAX_DSTATE}"
    if load() is None:
        return f"the CUDA kernel is not available: {_failure}"
    return None


class CUDASelectiveScan(torch.autograd.Function):
    """``kernels``: the compiled extension (:func:`load`), or the same kernels on the CPU harness
    (:mod:`cil.ops.selective_scan.harness`), which exposes the same ``fwd`` / ``bwd``."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, want_last=True, kernels=None):
        # the last state is written only when asked, and an unused output's gradient is not materialised as
        # zeros (the backward then never reads dlast): (batch, dim, dstate) float32 each way, 1 GB at CUB's batch 256
        ctx.set_materialize_grads(False)
        kernels = kernels if kernels is not None else load()
        dtype = u.dtype
        time_major = [M.transpose(-1, -2).contiguous() if M.dim() == 4 else M.contiguous() for M in (B, C)]
        f32 = [
            t.float().contiguous() if t is not None else u.new_empty(0, dtype=torch.float32) for t in (A, D, delta_bias)
        ]
        A32, D32, bias32 = f32
        u_, delta_, z_ = (t.to(dtype).contiguous() if t is not None else u.new_empty(0) for t in (u, delta, z))
        B_, C_ = (M.to(dtype) for M in time_major)
        out, y, last = kernels.fwd(u_, delta_, A32, B_, C_, D32, z_, bias32, delta_softplus, want_last)
        ctx.kernels = kernels
        ctx.save_for_backward(u_, delta_, A32, B_, C_, D32, z_, bias32, y)
        ctx.softplus = delta_softplus
        ctx.has = (D is not None, z is not None, delta_bias is not None)
        ctx.input_dtypes = [t.dtype if t is not None else None for t in (u, delta, A, B, C, D, z, delta_bias)]
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, bias, y = ctx.saved_tensors
        has_D, has_z, has_bias = ctx.has
        dout = dout if dout is not None else torch.zeros_like(u)
        dlast = dlast.float().contiguous() if dlast is not None else u.new_empty(0, dtype=torch.float32)
        du, ddelta, dA, dB, dC, dD, dbias, dz = ctx.kernels.bwd(
            u, delta, A, B, C, D, z, bias, ctx.softplus, y, dout.contiguous(), dlast
        )
        dB, dC = (g.transpose(-1, -2) if g.dim() == 4 else g for g in (dB, dC))
        if has_z and dz.shape != u.shape:  # L = 0: an empty z reads as "no z" to the launcher (found by the harness)
            dz = torch.zeros(u.shape, dtype=torch.float32, device=u.device)
        grads = [du, ddelta, dA, dB, dC, dD if has_D else None, dz if has_z else None, dbias if has_bias else None]
        cast = [g.to(t) if g is not None else None for g, t in zip(grads, ctx.input_dtypes)]
        return (*cast, None, None, None)


def selective_scan_cuda(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """The selective scan on our CUDA kernel (same semantics as :func:`cil.ops.selective_scan.selective_scan`)."""
    reason = unavailable_reason(u, delta, A, B, C, D, z, delta_bias)
    if reason is not None:
        raise RuntimeError(f"selective_scan: impl='cuda' is unavailable: {reason}")
    B, C = (M.unsqueeze(1) if M.dim() == 3 else M for M in (B, C))  # one group; autograd undoes the view
    out, last = CUDASelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return (out, last) if return_last_state else out


__all__ = ["build", "load", "selective_scan_cuda", "unavailable_reason"]
