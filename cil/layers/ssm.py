"""Selective state-space (Mamba) projectors on feature maps, as Mamba-FSCIL builds them; every scan runs through
:func:`cil.ops.selective_scan.selective_scan`.

- :class:`SelectiveSSM`: the Mamba block on the unfused path the official code runs (``mamba_simple.py`` with
  ``use_out_proj=False``): ``in_proj`` to (x, z); causal depthwise conv + SiLU on x; ``x_proj`` to (dt_low, B, C);
  ``delta = dt_proj.weight @ dt_low`` with ``dt_proj.bias`` passed to the scan as ``delta_bias`` (softplus inside);
  S4D-real ``A = -exp(A_log)``, ``A_log = log(1..N)``; ``D`` skip; ``y = scan(...) * SiLU(z)``; no out_proj.
- :class:`FourDirectionSSM`: one shared block over the map's tokens in four orders (rows, rows reversed, columns,
  columns reversed), outputs put back in row order and summed (Mamba-FSCIL's ``version='ssm'``).
- :func:`mlp_projection`: 1x1 conv, LayerNorm over the whole (C, H, W) map, LeakyReLU(0.1), [again], 1x1 conv.
- :class:`DualSelectiveProjector`: Mamba-FSCIL's neck: a base branch (trained in the base session), an optional
  new branch whose gate half of ``in_proj`` starts at zero (it outputs exactly 0 until trained), and the pooled
  input as residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from cil.ops.selective_scan import selective_scan


@dataclass
class SSMOutput:
    """A block's output (B, L, d_inner), its pre-activation gate z (B, d_inner, L), and the input-dependent
    parameters dt_low (B, R, L), B (B, N, L), C (B, N, L) when asked for."""

    y: torch.Tensor
    gate: torch.Tensor
    params: dict[str, torch.Tensor] = field(default_factory=dict)


class SelectiveSSM(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 256,
        dt_rank: Optional[int] = None,
        d_conv: int = 4,
        expand: float = 1,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_impl: Optional[str] = None,
    ):
        super().__init__()
        self.d_inner = int(expand * d_model)
        self.d_state = d_state
        self.dt_rank = dt_rank if dt_rank is not None else d_state  # Mamba-FSCIL: dt_rank = d_state
        self.scan_impl = scan_impl
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner)
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        # dt ~ log-uniform in [dt_min, dt_max], and the bias is its softplus inverse (Mamba's init)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))

    def forward(self, tokens: torch.Tensor, return_params: bool = False) -> SSMOutput:
        length = tokens.shape[1]
        x, z = self.in_proj(tokens).transpose(1, 2).chunk(2, dim=1)  # (B, d_inner, L) each
        x = F.silu(self.conv1d(x)[..., :length])  # causal: keep the first L outputs
        dt_low, b, c = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt_low, b, c = (t.transpose(1, 2).contiguous() for t in (dt_low, b, c))  # (B, R|N, L)
        delta = self.dt_proj.weight @ dt_low  # bias goes to the scan as delta_bias
        y = selective_scan(
            x,
            delta,
            -torch.exp(self.A_log.float()),
            b,
            c,
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            impl=self.scan_impl,
        )
        params = {"dt": dt_low, "B": b, "C": c} if return_params else {}
        return SSMOutput(y.transpose(1, 2), z, params)


def _columns(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Row-major (B, h*w, d) tokens in column-major order."""
    return tokens.reshape(tokens.shape[0], h, w, -1).transpose(1, 2).reshape(tokens.shape[0], h * w, -1)


def _rows(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Column-major (B, h*w, d) tokens back in row-major order."""
    return tokens.reshape(tokens.shape[0], w, h, -1).transpose(1, 2).reshape(tokens.shape[0], h * w, -1)


class FourDirectionSSM(nn.Module):
    """One shared :class:`SelectiveSSM` over the tokens of an h x w map in four orders, summed in row order.

    ``gate`` is the sum of the four pre-activation gates put back in row order. With ``faithful_quirks`` it is what
    the official code computes instead: it reverses the reversed directions' (B, d, L) gates along dim 1, the
    *channel* axis, so the sum is ``2 Z + 2 R(Z)`` (R reverses channels and tokens) instead of ``4 Z``.
    """

    def __init__(self, block: SelectiveSSM, faithful_quirks: bool = True):
        super().__init__()
        self.block = block
        self.faithful_quirks = faithful_quirks

    def forward(self, tokens: torch.Tensor, h: int, w: int, return_params: bool = False) -> SSMOutput:
        along = self.block(tokens, return_params=return_params)  # only this direction's parameters are kept
        back = self.block(tokens.flip(1))
        cols = _columns(tokens, h, w)
        down = self.block(cols)
        up = self.block(cols.flip(1))
        y = along.y + back.y.flip(1) + _rows(down.y, h, w) + _rows(up.y.flip(1), h, w)
        reverse = 1 if self.faithful_quirks else 2  # the code flips the channel axis of the (B, d, L) gates

        def gate_rows(g: torch.Tensor) -> torch.Tensor:  # (B, d, L) in column order -> row order
            return _rows(g.transpose(1, 2), h, w).transpose(1, 2)

        gate = along.gate + back.gate.flip(reverse) + gate_rows(down.gate) + gate_rows(up.gate.flip(reverse))
        return SSMOutput(y, gate, along.params)


class SS2D(nn.Module):
    """VMamba's 2-D selective scan as Mamba-FSCIL's ``version='ss2d'`` uses it (CUB): ``in_proj`` to (x, z);
    depthwise 3x3 conv + SiLU on x; the four direction sequences (rows, rows reversed, columns, columns reversed)
    with their own ``x_proj`` / ``dt_proj`` / ``A_log`` / ``D``, scanned in ONE grouped call (4 groups, no z in
    the scan); outputs put back in row order and summed, LayerNorm, times SiLU(z). The gate is the pre-activation
    z map (B, H, W, d_inner); the parameters are dt_low (B, 4, R, L), B and C (B, 4, N, L)."""

    directions = 4

    def __init__(self, d_model: int, d_state: int = 256, dt_rank: Optional[int] = None, d_conv: int = 3,
                 expand: float = 1, scan_impl: Optional[str] = None):  # fmt: skip
        super().__init__()
        k, d = self.directions, int(expand * d_model)
        self.d_inner, self.d_state, self.scan_impl = d, d_state, scan_impl
        self.dt_rank = dt_rank if dt_rank is not None else d_state
        self.in_proj = nn.Linear(d_model, 2 * d, bias=False)
        self.conv2d = nn.Conv2d(d, d, d_conv, padding=(d_conv - 1) // 2, groups=d)
        per_direction = [SelectiveSSM(d, d_state, self.dt_rank, expand=1) for _ in range(k)]  # Mamba's inits
        self.x_proj_weight = nn.Parameter(torch.stack([m.x_proj.weight.detach() for m in per_direction]))
        self.dt_projs_weight = nn.Parameter(torch.stack([m.dt_proj.weight.detach() for m in per_direction]))
        self.dt_projs_bias = nn.Parameter(torch.stack([m.dt_proj.bias.detach() for m in per_direction]))
        self.A_logs = nn.Parameter(torch.cat([m.A_log.detach() for m in per_direction]))  # (K * d, N)
        self.Ds = nn.Parameter(torch.ones(k * d))
        self.out_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, return_params: bool = False) -> SSMOutput:
        b, h, w, _ = x.shape
        length, k, d = h * w, self.directions, self.d_inner
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, d) each; z is the gate before its activation
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))  # (B, d, H, W)
        rows, cols = x.flatten(2), x.transpose(2, 3).flatten(2)  # (B, d, L) in row / column order
        xs = torch.stack([rows, rows.flip(-1), cols, cols.flip(-1)], dim=1)  # (B, K, d, L)
        dbc = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dt_low, bs, cs = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=2)
        delta = torch.einsum("bkrl,kdr->bkdl", dt_low, self.dt_projs_weight)
        ys = selective_scan(
            xs.reshape(b, k * d, length),
            delta.reshape(b, k * d, length),
            -torch.exp(self.A_logs.float()),
            bs.contiguous(),
            cs.contiguous(),
            self.Ds.float(),
            delta_bias=self.dt_projs_bias.flatten().float(),
            delta_softplus=True,
            impl=self.scan_impl,
        ).view(b, k, d, length)

        def column_to_row(t: torch.Tensor) -> torch.Tensor:  # (B, d, L) in column order -> row order
            return t.view(b, d, w, h).transpose(-1, -2).reshape(b, d, length)

        y = ys[:, 0] + ys[:, 1].flip(-1) + column_to_row(ys[:, 2] + ys[:, 3].flip(-1))  # (B, d, L), row order
        y = self.out_norm(y.transpose(1, 2)) * F.silu(z.flatten(1, 2))  # (B, L, d)
        params = {"dt": dt_low, "B": bs, "C": cs} if return_params else {}
        return SSMOutput(y, z, params)


def mlp_projection(in_channels: int, out_channels: int, mid_channels: int, size: tuple[int, int], layers: int = 2):
    """1x1 conv → LayerNorm over (C, H, W) jointly → LeakyReLU(0.1) [→ again] → 1x1 conv without bias."""
    if layers not in (2, 3):
        raise ValueError(f"layers={layers} must be 2 or 3")
    modules: list[nn.Module] = [
        nn.Conv2d(in_channels, mid_channels, 1),
        nn.LayerNorm([mid_channels, *size]),
        nn.LeakyReLU(0.1),
    ]
    if layers == 3:
        modules += [nn.Conv2d(mid_channels, mid_channels, 1), nn.LayerNorm([mid_channels, *size]), nn.LeakyReLU(0.1)]
    modules.append(nn.Conv2d(mid_channels, out_channels, 1, bias=False))
    return nn.Sequential(*modules)


class SelectiveBranch(nn.Module):
    """MLP projection → tokens + positional embedding → selective SSM (``"ssm"``: four directions through one
    shared block; ``"ss2d"``: :class:`SS2D`) → mean over tokens."""

    def __init__(
        self, in_channels, out_channels, size, layers=2, d_state=256, dt_rank=None, faithful_quirks=True, version="ssm"
    ):
        super().__init__()
        if version not in ("ssm", "ss2d"):
            raise ValueError(f"version={version!r} is not valid; choose 'ssm' or 'ss2d'")
        self.mlp = mlp_projection(in_channels, out_channels, 2 * in_channels, size, layers)
        self.pos_embed = nn.Parameter(torch.zeros(1, size[0] * size[1], out_channels))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if version == "ssm":
            self.ssm = FourDirectionSSM(SelectiveSSM(out_channels, d_state, dt_rank), faithful_quirks)
        else:
            self.ssm = SS2D(out_channels, d_state, dt_rank)

    def forward(self, feature_map: torch.Tensor) -> SSMOutput:
        b, _, h, w = feature_map.shape
        tokens = self.mlp(feature_map).flatten(2).transpose(1, 2) + self.pos_embed  # row-major (h, w) tokens
        if isinstance(self.ssm, SS2D):
            out = self.ssm(tokens.view(b, h, w, -1), return_params=True)
        else:
            out = self.ssm(tokens, h, w, return_params=True)
        return SSMOutput(out.y.mean(1), out.gate, out.params)


@dataclass
class ProjectorOutput:
    features: torch.Tensor  # (B, C_out): what the classifier sees
    gate: torch.Tensor  # the new branch's pre-activation gate (the base branch's without a new branch)
    params: dict[str, torch.Tensor]  # the new branch's dt/B/C (h direction), or the base branch's
    base_params: Optional[dict[str, torch.Tensor]]  # None when the frozen base branch was computed ahead


class DualSelectiveProjector(nn.Module):
    """Mamba-FSCIL's neck (``MambaNeck``, ``version='ssm'``) on a backbone feature map (B, C_in, H, W).

    ``features = base(F) + residual(F) [+ new(F.detach())]``; ``residual`` is the pooled map, through a bias-free
    linear layer when ``residual_proj``. With ``detach_base`` (CIFAR, miniImageNet) the base branch and residual are
    detached once the new branch exists. The new branch's z-half of ``in_proj`` starts at zero: z = 0 makes
    ``SiLU(z) = 0``, so it adds exactly nothing until trained.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        size: tuple[int, int],
        layers: int = 2,
        layers_new: int = 2,
        d_state: int = 256,
        dt_rank: Optional[int] = None,
        residual_proj: bool = False,
        new_branch: bool = False,
        detach_base: bool = True,
        faithful_quirks: bool = True,
        version: str = "ssm",
    ):
        super().__init__()
        self.base = SelectiveBranch(in_channels, out_channels, size, layers, d_state, dt_rank, faithful_quirks, version)
        self.residual = nn.Linear(in_channels, out_channels, bias=False) if residual_proj else nn.Identity()
        if not residual_proj and in_channels != out_channels:
            raise ValueError(f"in_channels {in_channels} != out_channels {out_channels} needs residual_proj=True")
        self.detach_base = detach_base
        self.new: Optional[SelectiveBranch] = None
        self._new_settings = (layers_new, d_state, dt_rank, faithful_quirks, version)
        if new_branch:
            self.add_new_branch()

    def add_new_branch(self) -> None:
        """Attach the incremental branch (layers_new MLP layers), its gate projection at zero."""
        layers, d_state, dt_rank, faithful_quirks, version = self._new_settings
        conv = self.base.mlp[0]
        out_channels = self.base.pos_embed.shape[-1]
        size = tuple(self.base.mlp[1].normalized_shape[1:])
        self.new = SelectiveBranch(
            conv.in_channels, out_channels, size, layers, d_state, dt_rank, faithful_quirks, version
        )
        ssm = self.new.ssm
        with torch.no_grad():
            in_proj = (ssm.block if isinstance(ssm, FourDirectionSSM) else ssm).in_proj.weight
            in_proj[in_proj.shape[0] // 2 :].zero_()  # z = 0: the new branch outputs exactly 0 at first
        self.new.to(self.base.pos_embed.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a checkpoint written after the base session holds the new branch: create it before the children load
        if self.new is None and any(key.startswith(prefix + "new.") for key in state_dict):
            self.add_new_branch()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def kept(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The base branch + residual, detached (what ``forward`` keeps of them once the new branch exists)."""
        return (self.base(feature_map).y + self.residual(feature_map.mean((2, 3)))).detach()

    def forward(self, feature_map: torch.Tensor, kept: Optional[torch.Tensor] = None) -> ProjectorOutput:
        """``kept``: the detached base branch + residual of ``feature_map`` computed ahead (``detach_base`` only:
        then the base branch is not run, and the output's ``base_params`` is None)."""
        if kept is not None:
            if self.new is None or not self.detach_base:
                raise ValueError("kept= needs the new branch and detach_base=True")
            new = self.new(feature_map.detach())
            return ProjectorOutput(kept + new.y, new.gate, new.params, None)
        base = self.base(feature_map)
        residual = self.residual(feature_map.mean((2, 3)))
        if self.new is None:
            return ProjectorOutput(base.y + residual, base.gate, base.params, base.params)
        new = self.new(feature_map.detach())
        kept = base.y + residual
        if self.detach_base:
            kept = kept.detach()
        return ProjectorOutput(kept + new.y, new.gate, new.params, base.params)


__all__ = [
    "DualSelectiveProjector",
    "FourDirectionSSM",
    "ProjectorOutput",
    "SS2D",
    "SSMOutput",
    "SelectiveBranch",
    "SelectiveSSM",
    "mlp_projection",
]
