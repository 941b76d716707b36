r"""The selective scan of Mamba (Gu & Dao, 2023): one public function, three implementations behind it.

``selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)`` has the semantics and
tensor layouts of mamba-ssm's ``selective_scan_fn`` (real ``A``). For batch ``b``, channel ``d`` (of ``dim``),
state ``n`` (of ``dstate``) and time ``t`` (of ``L``)::

    Δ[b,d,t]   = softplus(delta[b,d,t] + delta_bias[d])     (softplus only if delta_softplus; bias optional)
    h[b,d,n,t] = exp(Δ[b,d,t] A[d,n]) h[b,d,n,t-1] + Δ[b,d,t] B[.,n,t] u[b,d,t],      h[b,d,n,-1] = 0
    y[b,d,t]   = Σ_n C[.,n,t] h[b,d,n,t] + D[d] u[b,d,t]                          (D optional)
    out        = y * silu(z)  if z is given, else y

Shapes: ``u``, ``delta``, ``z``: (batch, dim, L). ``A``: (dim, dstate). ``B`` and ``C``, each independently, fixed
``(dim, dstate)`` (``B[d, n]`` at every step) or varying ``(batch, dstate, L)`` or ``(batch, groups, dstate, L)``
(channel d reads group ``d // (dim // groups)``, so ``dim`` must be divisible by ``groups``). ``D``, ``delta_bias``:
(dim,). Everything is computed in float32 (float64 inputs in float64) and ``out`` is cast back to ``u``'s dtype;
with ``return_last_state`` the result is ``(out, h[..., L-1])``, the state (batch, dim, dstate) in the compute dtype.

Implementations (``impl``): ``"reference"`` (:mod:`.reference`, one step at a time, autograd), ``"chunked"``
(:mod:`.chunked`, parallel within chunks, hand-written recomputing backward; any device), ``"cpu"`` (:mod:`.cpu`,
a fused C++ kernel compiled on first use) and ``"cuda"`` (our CUDA kernel). ``impl=None`` picks ``"cuda"`` for GPU
tensors when that kernel is built, ``"cpu"`` for CPU tensors when that one builds, else ``"chunked"``.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from cil.ops.selective_scan import cpu
from cil.ops.selective_scan.chunked import selective_scan_chunked
from cil.ops.selective_scan.reference import selective_scan_reference

IMPLS = ("reference", "chunked", "cpu", "cuda")


def cuda_unavailable_reason(*tensors: torch.Tensor) -> Optional[str]:
    """Why the CUDA kernel cannot run these tensors, or None if it can (builds it on first use)."""
    from cil.ops.selective_scan import _cuda

    return _cuda.unavailable_reason(*tensors)


_warned: set[str] = set()


def _fallback_warning(reason: str) -> None:
    if reason not in _warned:  # once per reason, one line
        _warned.add(reason)
        warnings.warn(f"selective_scan: CUDA tensors run on the chunked PyTorch path: {reason}", stacklevel=3)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    impl: Optional[str] = None,
):
    """The selective scan (see the module docstring); ``impl`` forces an implementation."""
    check_inputs(u, delta, A, B, C, D, z, delta_bias)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if impl is None:
        if u.is_cuda:
            reason = cuda_unavailable_reason(u, delta, A, B, C, D, z, delta_bias)
            impl = "cuda" if reason is None else "chunked"
            if reason is not None:
                _fallback_warning(reason)
        else:
            impl = "cpu" if u.device.type == "cpu" and cpu.load() is not None else "chunked"
    if impl == "reference":
        return selective_scan_reference(*args)
    if impl == "chunked":
        return selective_scan_chunked(*args)
    if impl == "cpu":
        return cpu.selective_scan_cpu(*args)
    if impl == "cuda":
        reason = cuda_unavailable_reason(u, delta, A, B, C, D, z, delta_bias)
        if reason is not None:
            raise RuntimeError(f"selective_scan: impl='cuda' is unavailable: {reason}")
        from cil.ops.selective_scan._cuda import selective_scan_cuda

        return selective_scan_cuda(*args)
    raise ValueError(f"selective_scan: impl={impl!r} is not valid; choose one of {list(IMPLS)} or None")


FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None) -> None:
    """Errors that name the argument, its shape or dtype, and what was expected."""

    def fail(name: str, got, expected: str) -> None:
        raise ValueError(f"selective_scan: {name} has {got}; expected {expected}")

    for name, t in (
        ("u", u),
        ("delta", delta),
        ("A", A),
        ("B", B),
        ("C", C),
        ("D", D),
        ("z", z),
        ("delta_bias", delta_bias),
    ):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOATS:
            fail(name, f"dtype {t.dtype}", "a real floating dtype (float16, bfloat16, float32 or float64)")
        if t.device != u.device:
            fail(name, f"device {t.device}", f"u's device {u.device}")
    if u.dim() != 3:
        fail("u", f"shape {tuple(u.shape)}", "(batch, dim, L)")
    batch, dim, length = u.shape
    for name, t in (("delta", delta), ("z", z)):
        if t is not None and t.shape != u.shape:
            fail(name, f"shape {tuple(t.shape)}", f"u's shape (batch, dim, L) = {tuple(u.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        fail("A", f"shape {tuple(A.shape)}", f"(dim, dstate) with dim = {dim}")
    dstate = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        ok = (
            (M.dim() == 2 and tuple(M.shape) == (dim, dstate))
            or (M.dim() == 3 and tuple(M.shape) == (batch, dstate, length))
            or (
                M.dim() == 4
                and M.shape[0] == batch
                and M.shape[2:] == (dstate, length)
                and M.shape[1] > 0
                and dim % M.shape[1] == 0
            )
        )
        if not ok:
            fail(
                name,
                f"shape {tuple(M.shape)}",
                f"(dim, dstate) = {(dim, dstate)}, (batch, dstate, L) = {(batch, dstate, length)} or "
                f"(batch, groups, dstate, L) = ({batch}, groups, {dstate}, {length}) with {dim} divisible by groups",
            )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (dim,):
            fail(name, f"shape {tuple(t.shape)}", f"(dim,) = ({dim},)")


__all__ = ["selective_scan", "selective_scan_reference", "selective_scan_chunked", "check_inputs", "IMPLS"]
