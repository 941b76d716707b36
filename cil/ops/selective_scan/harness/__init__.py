"""The CUDA selective scan's kernels, executed on the CPU.

``../csrc/selective_scan_kernels.cuh`` holds the kernels and their device helpers; nvcc compiles it for GPUs
(``selective_scan_cuda.cu`` includes it) and the host C++ compiler compiles the *same file* here, against
``cuda_on_cpu.h``, which defines the few CUDA names the kernels use. Each block's threads run as real concurrent
threads, ``__syncthreads()`` is a barrier over the block, ``__shfl_down_sync`` exchanges through a per-warp buffer
between warp barriers (a shuffle that not all 32 lanes reach, or in a partial warp, is an error), ``__shared__`` is
one instance per block, and the grid and block shapes are the launcher's (``threads_for``, ``forward_tile_for``,
``backward_tile_for``, shared with it). :func:`load` returns a module with the CUDA extension's ``fwd`` / ``bwd``, so
the autograd function of ``_cuda.py`` runs unchanged on it (:func:`selective_scan_harness`).

What this proves: the kernels' index arithmetic, their synchronisation (every barrier reached by every thread, no
missing barrier between a shared-memory write and another thread's read — under ThreadSanitizer, ``variant="tsan"``),
their shuffles, their bounds (AddressSanitizer and UndefinedBehaviorSanitizer, ``variant="asan"``), their results
against the sequential reference, and bitwise determinism. What only a GPU can show: speed, memory bandwidth,
occupancy, register use, and anything nvcc's code generation alone decides (fast-math intrinsics, fused
multiply-adds: the harness compares at the tolerances the GPU tests use).

The library is built with ``g++`` on first use (a few seconds; cached by source hash under ``CIL_HARNESS_DIR``, by
default ``~/.cache/cil/scan_harness``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent  # the sources, relative to it: the driver includes ../csrc/selective_scan_kernels.cuh
SOURCES = ["harness/scan_harness.cpp", "harness/cuda_on_cpu.h", "csrc/selective_scan_kernels.cuh"]
FLAGS = {
    "plain": ["-O1"],
    # bounds of global and local memory, use after scope, signed overflow and other undefined behaviour
    "asan": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
    # data races between the threads of a block (a missing __syncthreads)
    "tsan": ["-O1", "-fsanitize=thread"],
}
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_DSTATE = 256
_lock = threading.Lock()
_loaded: dict[tuple[str, Optional[str]], HarnessKernels] = {}


class HarnessError(RuntimeError):
    """The kernel failed on the harness: a divergent barrier or shuffle, a launch limit, a sanitizer report."""


def build(variant: str = "plain", root: Optional[Path] = None, folder: Optional[Path] = None) -> Path:
    """Compile the harness and return the shared library's path; cached by the sources' hash. ``root``: a copy of
    the sources' folder (``harness/``, ``csrc/``), for tests that seed a bug into it."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise HarnessError("the CPU harness needs a C++ compiler (g++; set CXX)")
    root = Path(root) if root is not None else ROOT
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((root / name).read_bytes())
    digest.update(" ".join(FLAGS[variant]).encode())
    folder = Path(folder or os.environ.get("CIL_HARNESS_DIR", Path.home() / ".cache" / "cil" / "scan_harness"))
    folder.mkdir(parents=True, exist_ok=True)
    library = folder / f"scan_harness_{variant}_{digest.hexdigest()[:16]}.so"
    if not library.is_file():
        partial = library.with_name(f"{library.name}.{os.getpid()}.tmp")
        command = [compiler, "-std=c++17", "-g", "-fPIC", "-shared", "-pthread", "-Wall", "-Wno-unknown-pragmas"]
        command += [*FLAGS[variant], str(root / SOURCES[0]), "-o", str(partial)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise HarnessError(f"building the CPU harness failed:\n{done.stderr[-4000:]}")
        os.replace(partial, library)
    return library


class HarnessKernels:
    """``fwd`` / ``bwd`` with the CUDA extension's signatures (``selective_scan_cuda.cu``), on CPU tensors. The
    allocation and the final fixed-order sums mirror that launcher."""

    def __init__(self, library: Path, min_blocks: int = 0):
        self.lib = ctypes.CDLL(str(library))
        self.lib.cil_last_error.restype = ctypes.c_char_p
        for name in ("cil_forward_tile_for", "cil_backward_tile_for"):
            getattr(self.lib, name).argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int]
        self.lib.cil_backward_shared_bytes.restype = ctypes.c_int64
        self.path = library
        # the tile policy: 0 = the launcher's (kMinBlocks); tests lower it to reach tiles above 16 channels at
        # shapes small enough for the CPU
        self.min_blocks = min_blocks

    def with_min_blocks(self, min_blocks: int) -> HarnessKernels:
        """The same kernels with another tile policy (see ``tile_for`` in the kernels' header)."""
        return HarnessKernels(self.path, min_blocks)

    # -- the launcher's bookkeeping --
    @staticmethod
    def _params(u, A, B, C, D, z, bias, softplus):
        batch, dim, length = u.shape
        dstate = A.shape[1]
        varying_B, varying_C = B.dim() == 4, C.dim() == 4
        groups = B.shape[1] if varying_B else (C.shape[1] if varying_C else 1)
        if dstate > MAX_DSTATE:
            raise HarnessError(f"selective_scan (cuda): dstate {dstate} > {MAX_DSTATE}")
        shape = (ctypes.c_int * 5)(batch, dim, length, dstate, groups)
        flags = (ctypes.c_int * 6)(varying_B, varying_C, D.numel() > 0, z.numel() > 0, bias.numel() > 0, softplus)
        return shape, flags, (batch, dim, length, dstate, groups, varying_B, varying_C)

    @staticmethod
    def _pointers(tensors) -> ctypes.Array:
        return (ctypes.c_void_p * len(tensors))(
            *[t.data_ptr() if t is not None and t.numel() else None for t in tensors]
        )

    def _check(self, code: int) -> None:
        if code != 0:
            raise HarnessError(self.lib.cil_last_error().decode())

    def threads_for(self, dstate: int) -> int:
        return self.lib.cil_threads_for(dstate)

    def backward_tile_for(self, group_size: int, rows: int) -> int:
        """Channels per backward block for groups of ``group_size`` channels and ``rows`` = batch * dim."""
        return self.lib.cil_backward_tile_for(group_size, rows, self.min_blocks)

    def backward_shared_bytes(self, varying_B: bool, varying_C: bool, threads: int) -> int:
        """The backward's dynamic shared memory per block (B / C staged for a chunk), as the launcher asks."""
        return self.lib.cil_backward_shared_bytes(int(varying_B), int(varying_C), threads)

    def forward_tile_for(self, group_size: int, rows: int) -> int:
        """Channels per forward block (they share one read of B / C)."""
        return self.lib.cil_forward_tile_for(group_size, rows, self.min_blocks)

    def fwd(self, u, delta, A, B, C, D, z, bias, softplus, want_last):
        shape, flags, (batch, dim, _, dstate, groups, *_) = self._params(u, A, B, C, D, z, bias, softplus)
        out = torch.empty_like(u)
        y = torch.empty(u.shape, dtype=torch.float32)
        last = torch.empty(batch, dim, dstate, dtype=torch.float32) if want_last else torch.empty(0)
        if u.numel() == 0:
            return out, y, last.zero_()
        inputs = self._pointers([u, delta, B, C, z, A, D, bias])
        tile = self.forward_tile_for(dim // groups, batch * dim)
        code = self.lib.cil_scan_fwd(
            DTYPES[u.dtype], shape, flags, tile, inputs, ctypes.c_void_p(out.data_ptr()),
            ctypes.c_void_p(y.data_ptr()), ctypes.c_void_p(last.data_ptr() if want_last else None),
        )  # fmt: skip
        self._check(code)
        return out, y, last

    def bwd(self, u, delta, A, B, C, D, z, bias, softplus, y_pre, dout, dlast):
        shape, flags, (batch, dim, length, dstate, groups, varying_B, varying_C) = self._params(
            u, A, B, C, D, z, bias, softplus
        )
        f32 = dict(dtype=torch.float32)
        tile = self.backward_tile_for(dim // groups, batch * dim)
        tiles = dim // tile
        n_chunks = -(-length // 64)

        def empty(*shape):  # the launcher's torch.empty, poisoned: an element the kernel fails to write shows as NaN
            return torch.full(shape, float("nan"), **f32)

        du, ddelta = empty(*u.shape), empty(*u.shape)
        dz = empty(*u.shape) if z.numel() else torch.empty(0, **f32)
        dA_rows = empty(batch, dim, dstate)
        dD_rows, dbias_rows = empty(batch, dim), empty(batch, dim)
        dB_tiles = empty(batch, tiles, length, dstate) if varying_B else empty(batch, dim, dstate)
        dC_tiles = empty(batch, tiles, length, dstate) if varying_C else empty(batch, dim, dstate)
        carry = empty(batch * dim * n_chunks * dstate if n_chunks > 1 else 1)
        dout32 = dout.float().contiguous()
        dlast32 = dlast.float().contiguous() if dlast.numel() else dlast
        if u.numel() > 0:
            inputs = self._pointers([u, delta, B, C, z, A, D, bias])
            scratch = [y_pre, dout32, dlast32, carry, du, ddelta, dz, dA_rows, dD_rows, dbias_rows, dB_tiles, dC_tiles]
            code = self.lib.cil_scan_bwd(DTYPES[u.dtype], shape, flags, tile, inputs, self._pointers(scratch))
            self._check(code)
        else:  # as the launcher: nothing scanned, the last state is zero whatever the parameters
            for t in (dA_rows, dD_rows, dbias_rows, dB_tiles, dC_tiles):
                t.zero_()

        def per_group(partial, varying):
            if not varying:
                return partial.sum(0)
            return partial.view(batch, groups, tiles // groups, length, dstate).sum(2)

        return (du, ddelta, dA_rows.sum(0), per_group(dB_tiles, varying_B), per_group(dC_tiles, varying_C),
                dD_rows.sum(0), dbias_rows.sum(0), dz)  # fmt: skip


def load(variant: str = "plain", root: Optional[Path] = None) -> HarnessKernels:
    """The harness's kernels (built on first use). A sanitizer variant must run in a process that loaded the
    sanitizer's runtime first (``LD_PRELOAD``; see :func:`sanitizer_environment`)."""
    key = (variant, None if root is None else str(root))
    with _lock:
        if key not in _loaded:
            _loaded[key] = HarnessKernels(build(variant, root))
        return _loaded[key]


def sanitizer_environment(variant: str) -> dict[str, str]:
    """Environment for a Python process that loads the ``asan`` or ``tsan`` harness: the runtime preloaded (an
    uninstrumented interpreter cannot load it later), reports fatal, Python's own allocations not reported as leaks."""
    compiler = shutil.which(os.environ.get("CXX", "g++")) or "g++"
    names = {"asan": ["libasan.so", "libstdc++.so"], "tsan": ["libtsan.so", "libstdc++.so"]}[variant]
    found = [
        subprocess.run([compiler, f"-print-file-name={n}"], capture_output=True, text=True).stdout.strip()
        for n in names
    ]
    env = {**os.environ, "LD_PRELOAD": " ".join(found)}  # libstdc++ too: ASan intercepts its __cxa_throw
    if variant == "asan":
        env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=0:exitcode=86"
        env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1:exitcode=86"
    else:
        env["TSAN_OPTIONS"] = "halt_on_error=1:exitcode=86:report_signal_unsafe=0"
    return env


def selective_scan_harness(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False, kernels=None
):
    """The selective scan through the CUDA path's autograd function with the kernels run on the CPU harness (same
    semantics as :func:`cil.ops.selective_scan.selective_scan`); ``kernels``: a :class:`HarnessKernels`."""
    from cil.ops.selective_scan._cuda import CUDASelectiveScan

    kernels = kernels or load()
    B, C = (M.unsqueeze(1) if M.dim() == 3 else M for M in (B, C))
    out, last = CUDASelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, kernels)
    return (out, last) if return_last_state else out


__all__ = ["HarnessError", "HarnessKernels", "build", "load", "sanitizer_environment", "selective_scan_harness"]
