"""Chunked selective scan with a hand-written backward: the pure-PyTorch path for any device.

Time is cut into chunks of ``chunk`` steps. Within a chunk the affine recurrence ``h_t = a_t h_{t-1} + b_t``
(``a_t = exp(Δ_t A)``, ``b_t = Δ_t B_t u_t``) is solved either in parallel by recursive doubling (``parallel=True``,
the default on GPUs): ``log2(chunk)`` rounds of ``(a, b)_t <- (a_t a_{t-k}, a_t b_{t-k} + b_t)``, which only
multiplies decays in [0, 1] and so never overflows (unlike ``exp(cumsum)`` and a division); or one in-place step at
a time (the default on CPUs, where it moves far less memory). Across chunks the state is carried sequentially.

The forward pass keeps only the state at each chunk start (``O(batch * dim * dstate * chunks)``); the backward pass
recomputes each chunk's states from it, runs the adjoint recurrence ``λ_t = C_t gy_t + a_{t+1} λ_{t+1}`` backwards
with the same chunk solver, and forms every gradient from ``(λ, h)`` of the chunk. Batch rows and channels are
processed in tiles so a chunk's temporaries stay within ``tile_bytes``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from cil.ops.selective_scan.reference import compute_dtype

DEFAULT_CHUNK = 8
DEFAULT_TILE_BYTES = 2 * 2**20  # about one core's L2 here: temporaries stay in cache


def _doubling_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All h_t of h_t = a_t h_{t-1} + b_t along dim 0 with h_{-1} = 0 (fold an initial state into b_0)."""
    length, k = a.shape[0], 1
    while k < length:
        b_next = b.clone()
        b_next[k:].addcmul_(a[k:], b[:-k])
        if 2 * k < length:  # the products are only needed for the next round
            a_next = a.clone()
            a_next[k:].mul_(a[:-k])
            a = a_next
        b, k = b_next, 2 * k
    return b


class _Tile:
    """A block of batch rows and channels, viewed as (time, batch, groups, channels per group, dstate).

    Channels are cut into whole groups, or into parts of one group, so a tile's channels read one slice of the
    varying B/C (batch, groups, n, L); fixed B/C (dim, n) are per channel and simply sliced.
    """

    def __init__(self, rows: slice, chans: slice, groups: slice, per_group: int):
        self.rows, self.chans, self.groups = rows, chans, groups
        self.num_groups, self.per_group = groups.stop - groups.start, per_group

    def channels(self, x: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """(batch, dim, L) -> this tile's (T, b, G, Dg, 1)"""
        x = x[self.rows, self.chans, t0:t1]
        return x.permute(2, 0, 1).reshape(t1 - t0, x.shape[0], self.num_groups, self.per_group, 1)

    def weights(self, M: torch.Tensor) -> torch.Tensor:
        """(dim, n) -> (1, 1, G, Dg, n)"""
        return M[self.chans].reshape(1, 1, self.num_groups, self.per_group, M.shape[-1])

    def step_input(self, M: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
        """B or C for the tile and chunk: (1, 1, G, Dg, n) if fixed, else (T, b, G, 1, n)."""
        if M.dim() == 2:
            return self.weights(M)
        # contiguous: a permuted operand would make every product's output take its odd strides
        return M[self.rows, self.groups, :, t0:t1].permute(3, 0, 1, 2).unsqueeze(3).contiguous()

    def state(self, h: torch.Tensor) -> torch.Tensor:
        """(batch, dim, n) -> this tile's (b, G, Dg, n)"""
        h = h[self.rows, self.chans]
        return h.reshape(h.shape[0], self.num_groups, self.per_group, h.shape[-1])

    def put(self, target: torch.Tensor, value: torch.Tensor, t0: int, t1: int, add: bool = False) -> None:
        """Write (T, b, G, Dg, 1) back into (batch, dim, L)."""
        value = value.reshape(t1 - t0, -1, self.num_groups * self.per_group).permute(1, 2, 0)
        view = target[self.rows, self.chans, t0:t1]
        view.add_(value) if add else view.copy_(value)


def _tiles(batch: int, dim: int, groups: int, n: int, chunk: int, dtype: torch.dtype, tile_bytes: int):
    """Tiles whose (chunk, rows, channels, n) temporaries stay within ``tile_bytes`` (small enough for the cache)."""
    per_group = dim // groups
    per_channel = chunk * n * torch.finfo(dtype).bits // 8
    width = max(1, tile_bytes // per_channel)  # channels of one batch row that fit
    blocks = []
    if width >= per_group:
        k = min(groups, width // per_group)  # whole groups per tile
        for g0 in range(0, groups, k):
            g1 = min(g0 + k, groups)
            blocks.append((slice(g0 * per_group, g1 * per_group), slice(g0, g1), per_group))
    else:
        for g in range(groups):
            for c0 in range(0, per_group, width):
                c1 = min(c0 + width, per_group)
                blocks.append((slice(g * per_group + c0, g * per_group + c1), slice(g, g + 1), c1 - c0))
    for chans, grps, part in blocks:
        rows_per_tile = max(1, tile_bytes // (per_channel * (chans.stop - chans.start)))
        for b0 in range(0, batch, rows_per_tile):
            yield _Tile(slice(b0, min(b0 + rows_per_tile, batch)), chans, grps, part)


def _chunk_states(A5, dt5, u5, Bc, h0, parallel: bool):
    """Decays a_t and states h_t (T, b, G, Dg, n) of one chunk, starting from state h0 (b, G, Dg, n)."""
    a = torch.mul(dt5, A5).exp_()
    h = torch.mul(dt5 * u5, Bc)  # Δ_t B_t u_t
    h[0].addcmul_(a[0], h0)
    if parallel:
        return a, _doubling_scan(a, h)
    for t in range(1, h.shape[0]):  # in place, one pass over the chunk: the cheapest form on a CPU
        h[t].addcmul_(a[t], h[t - 1])
    return a, h


def _reverse_scan(a: torch.Tensor, src: torch.Tensor, carry: torch.Tensor, parallel: bool) -> torch.Tensor:
    """λ_t = src_t + a_{t+1} λ_{t+1} along dim 0, with λ_{T-1} = src_{T-1} + carry (in place on src)."""
    src[-1] += carry
    if parallel:
        decay = torch.cat([a[1:], torch.zeros_like(a[:1])]).flip(0)
        return _doubling_scan(decay, src.flip(0)).flip(0)
    for t in range(src.shape[0] - 2, -1, -1):
        src[t].addcmul_(a[t + 1], src[t + 1])
    return src


def _sum_n(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Σ_n x * M with x (T, b, G, Dg, n) and M fixed (1, 1, G, Dg, n) or varying (T, b, G, 1, n) -> (T, b, G, Dg, 1)."""
    if M.shape[3] == 1:
        return x @ M.transpose(-1, -2)
    return (x * M).sum(-1, keepdim=True)


class ChunkedSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, tile_bytes, parallel):
        dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias)
        batch, dim, length = u.shape
        n = A.shape[1]
        uc, dt, Ac = u.to(dtype), _delta(delta, delta_bias, delta_softplus, dtype), A.to(dtype)
        Bx, Cx = B.to(dtype), C.to(dtype)
        chunk = max(1, min(chunk, length))
        starts = list(range(0, length, chunk))
        y = torch.empty(batch, dim, length, dtype=dtype, device=u.device)
        checkpoints = torch.empty(len(starts), batch, dim, n, dtype=dtype, device=u.device)
        last = torch.empty(batch, dim, n, dtype=dtype, device=u.device)
        for tile in _tiles(batch, dim, _groups(B, C), n, chunk, dtype, tile_bytes):
            A5 = tile.weights(Ac)
            h = tile.state(last).new_zeros(tile.state(last).shape)
            for c, t0 in enumerate(starts):
                t1 = min(t0 + chunk, length)
                tile.state(checkpoints[c]).copy_(h)
                dt5, u5 = tile.channels(dt, t0, t1), tile.channels(uc, t0, t1)
                _, H = _chunk_states(A5, dt5, u5, tile.step_input(Bx, t0, t1), h, parallel)
                tile.put(y, _sum_n(H, tile.step_input(Cx, t0, t1)), t0, t1)
                h = H[-1]
            tile.state(last).copy_(h)
        if D is not None:
            y = y + uc * D.to(dtype)[:, None]
        out = y if z is None else y * F.silu(z.to(dtype))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, checkpoints, y if z is not None else None)
        ctx.config = (delta_softplus, chunk, tile_bytes, dtype, parallel)
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, checkpoints, y = ctx.saved_tensors
        delta_softplus, chunk, tile_bytes, dtype, parallel = ctx.config
        batch, dim, length = u.shape
        n = A.shape[1]
        uc, Ac = u.to(dtype), A.to(dtype)
        raw = _delta(delta, delta_bias, False, dtype)
        dt = F.softplus(raw) if delta_softplus else raw
        Bx, Cx = B.to(dtype), C.to(dtype)
        dout = dout.to(dtype) if dout is not None else torch.zeros_like(uc)

        dz = None
        if z is not None:
            zc = z.to(dtype)
            sig = torch.sigmoid(zc)
            dz = dout * y * sig * (1 + zc * (1 - sig))
            gy = dout * zc * sig  # dout * silu(z)
        else:
            gy = dout
        du = gy * D.to(dtype)[:, None] if D is not None else torch.zeros_like(uc)
        dD = (gy * uc).sum((0, 2)) if D is not None else None
        ddt, dA, dB, dC = torch.zeros_like(uc), torch.zeros_like(Ac), torch.zeros_like(Bx), torch.zeros_like(Cx)
        starts = list(range(0, length, chunk))
        for tile in _tiles(batch, dim, _groups(B, C), n, chunk, dtype, tile_bytes):
            A5 = tile.weights(Ac)
            carry = tile.state(dlast).to(dtype) if dlast is not None else None
            if carry is None:
                carry = torch.zeros_like(tile.state(checkpoints[0]))
            for c in reversed(range(len(starts))):
                t0 = starts[c]
                t1 = min(t0 + chunk, length)
                h0 = tile.state(checkpoints[c])
                dt5, u5, gy5 = tile.channels(dt, t0, t1), tile.channels(uc, t0, t1), tile.channels(gy, t0, t1)
                Bc, Cc = tile.step_input(Bx, t0, t1), tile.step_input(Cx, t0, t1)
                a, H = _chunk_states(A5, dt5, u5, Bc, h0, parallel)
                # adjoint λ_t = C_t gy_t + a_{t+1} λ_{t+1}, run backwards; the later chunks arrive through `carry`
                lam = _reverse_scan(a, gy5 * Cc, carry, parallel)
                carry = a[0] * lam[0]
                lam_B = _sum_n(lam, Bc)  # Σ_n λ_t B_t
                w = a.mul_(lam)  # λ_t Ā_t h_{t-1}, in place of the decays
                w[0].mul_(h0)
                w[1:].mul_(H[:-1])
                tile.put(du, dt5 * lam_B, t0, t1, add=True)
                tile.put(ddt, u5 * lam_B + (w * A5).sum(-1, keepdim=True), t0, t1, add=True)
                tile.weights(dA).add_((w * dt5).sum((0, 1)))
                dtu = dt5 * u5
                if B.dim() == 2:
                    tile.weights(dB).add_((lam * dtu).sum((0, 1)))
                else:  # Σ over the tile's channels of each group, as a batched product
                    dB[tile.rows, tile.groups, :, t0:t1] += (dtu.transpose(-1, -2) @ lam).squeeze(3).permute(1, 2, 3, 0)
                if C.dim() == 2:
                    tile.weights(dC).add_((H * gy5).sum((0, 1)))
                else:
                    dC[tile.rows, tile.groups, :, t0:t1] += (gy5.transpose(-1, -2) @ H).squeeze(3).permute(1, 2, 3, 0)
        ddelta = ddt * torch.sigmoid(raw) if delta_softplus else ddt
        dbias = ddelta.sum((0, 2)) if delta_bias is not None else None
        grads = (du, ddelta, dA, dB, dC, dD, dz, dbias)
        inputs = (u, delta, A, B, C, D, z, delta_bias)
        cast = tuple(g.to(x.dtype) if g is not None else None for g, x in zip(grads, inputs))
        return (*cast, None, None, None, None)


def _groups(B: torch.Tensor, C: torch.Tensor) -> int:
    """Groups of the varying B/C (batch, groups, n, L); 1 when both are fixed (dim, n)."""
    return next((M.shape[1] for M in (B, C) if M.dim() == 4), 1)


def _delta(delta, delta_bias, softplus, dtype):
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype)[:, None]
    return F.softplus(dt) if softplus else dt


def selective_scan_chunked(
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
    chunk: int = DEFAULT_CHUNK,
    tile_bytes: int = DEFAULT_TILE_BYTES,
    parallel: Optional[bool] = None,
):
    """The chunked scan; ``parallel`` solves each chunk by recursive doubling (default on GPUs) instead of one
    in-place step at a time (default on CPUs, where it moves the least memory)."""
    if parallel is None:
        parallel = u.device.type != "cpu"
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, tile_bytes, parallel)
    out, last = ChunkedSelectiveScan.apply(*args)
    return (out, last) if return_last_state else out
