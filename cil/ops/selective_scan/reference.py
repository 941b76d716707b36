"""The selective scan, written as plainly as possible: the definition every faster implementation is tested against.

One step per time index, in float32 (float64 inputs stay float64), following the recurrence in
:func:`cil.ops.selective_scan.selective_scan`'s docstring. Gradients come from autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float32, or float64 when any input is float64 (the scan never computes below float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def selective_scan_reference(
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
):
    dtype, out_dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias), u.dtype
    batch, dim, length = u.shape
    u, delta, A = u.to(dtype), delta.to(dtype), A.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)  # threshold 20, as the CUDA kernel

    def at_step(M: torch.Tensor, t: int) -> torch.Tensor:
        """B or C for every channel at step t: (dim, n) when fixed, (batch, dim, n) when varying."""
        if M.dim() == 2:
            return M.to(dtype)
        if M.dim() == 3:  # (batch, n, L): one group
            M = M.unsqueeze(1)
        groups = M.shape[1]
        return M[..., t].to(dtype).repeat_interleave(dim // groups, dim=1)  # channel d reads group d // (dim/G)

    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, :, t, None] * A)  # exp(Δ_t A)
        h = decay * h + (delta[:, :, t] * u[:, :, t])[..., None] * at_step(B, t)
        ys.append((h * at_step(C, t)).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(dtype)[:, None]
    out = y if z is None else y * F.silu(z.to(dtype))
    return (out.to(out_dtype), h) if return_last_state else out.to(out_dtype)
