"""Mamba-FSCIL (Li et al., 2024): a dual selective-SSM projector on a frozen-after-base backbone, a fixed ETF
classifier, and class-sensitive losses on the new branch's selective-scan inputs (``methods/mamba_fscil.md``).

This file holds the method's losses (§1, "class-sensitive selective scan"); the projector is
:class:`cil.ssm.DualSelectiveProjector`, the classifier :class:`cil.heads.EtfClassifier` with
:func:`cil.heads.dot_regression_loss`. All losses work without a process group; under DDP the presence checks
take the minimum over processes, as the official code's ``all_reduce(MIN)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cil.distributed import all_reduce_min


def suppression_loss(gate: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``‖G[rows]‖_F / numel(G[rows])``: a plain (not squared) Frobenius norm over the element count."""
    selected = gate[rows]
    return torch.linalg.vector_norm(selected) / selected.numel()


def separation_loss(param: torch.Tensor, base: torch.Tensor, novel: torch.Tensor) -> torch.Tensor:
    """``mean |I - S|`` with S the 2x2 cosine matrix of the base and novel means of ``param`` over every axis
    but its feature axis (samples, directions, tokens): ``|cos(p_b, p_n)| / 2``."""
    dims = [d for d in range(param.dim()) if d != param.dim() - 2]  # (B, K, R|N, L): keep the feature axis
    means = torch.stack([param[base].mean(dims), param[novel].mean(dims)])
    unit = F.normalize(means, dim=-1)
    return torch.mean(torch.abs(torch.eye(2, device=param.device) - unit @ unit.T))


def class_sensitive_losses(
    gate: torch.Tensor,
    params_new: dict[str, torch.Tensor],
    labels: torch.Tensor,
    num_base_classes: int,
    w_supp: float,
    w_novel: float,
    w_sep_new: float,
    w_sep: float = 0.0,
    params_base: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The incremental-session losses of the code's ``calculate_class_sensitive_losses``, by name.

    Base samples are those with a label below ``num_base_classes`` (replayed means of earlier novel classes count as
    novel). Suppression of the new branch's gate on base samples, enhancement (negative) on novel ones, and
    separation of the base/novel means of dt, B, C, each only when every process's batch has such samples.
    """
    base, novel = labels < num_base_classes, labels >= num_base_classes
    has_base = all_reduce_min(int(base.sum()), labels.device) > 0
    has_novel = all_reduce_min(int(novel.sum()), labels.device) > 0
    losses: dict[str, torch.Tensor] = {}
    if has_base and w_supp > 0:
        losses["supp_base"] = w_supp * suppression_loss(gate, base)
    if has_novel and w_novel > 0:
        losses["supp_novel"] = -w_novel * suppression_loss(gate, novel)
    if has_base and has_novel:
        for prefix, weight, params in (("sep_new", w_sep_new, params_new), ("sep_base", w_sep, params_base)):
            if weight > 0 and params:
                for key, value in params.items():
                    losses[f"{prefix}_{key}"] = weight * separation_loss(_with_directions(value), base, novel)
    return losses


def _with_directions(param: torch.Tensor) -> torch.Tensor:
    """(B, R, L) parameters of the h-direction call as (B, 1, R, L), the code's layout for 'ssm'."""
    return param.unsqueeze(1) if param.dim() == 3 else param


__all__ = ["class_sensitive_losses", "separation_loss", "suppression_loss"]
