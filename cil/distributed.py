"""The few torch.distributed helpers statistics passes need; all are no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the process group (0 without one): what shards and samplers split data by."""
    return dist.get_rank() if is_distributed() else 0


def _launcher_rank() -> int:
    """The global rank torchrun (``RANK``), SLURM (``SLURM_PROCID``) or Lightning's launcher (``NODE_RANK`` and
    ``LOCAL_RANK``: ``LOCAL_RANK`` alone is 0 once per node) gave this process; 0 for a single process."""
    import os

    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    local, node = os.environ.get("LOCAL_RANK", "0"), os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0"))
    if local.isdigit() and node.isdigit() and (int(local) or int(node)):
        return 1  # not rank zero (the exact number needs the per-node process count)
    return 0


def slurm_job_id() -> str | None:
    """The SLURM job this process runs in (``<array job>_<task>`` for an array task), None outside SLURM."""
    import os

    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_rank_zero() -> bool:
    """The one test for rank-zero-only work (printing, writing the run folder): the process group's rank, or before
    it exists and after it is gone the rank the launcher put in the environment, correct on several nodes."""
    return rank() == 0 if is_distributed() else _launcher_rank() == 0


def barrier() -> None:
    """Wait for every process (nothing in a single process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all processes (gloo and nccl both accept float64 and int64)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard(n: int) -> list[int]:
    """This process's disjoint share of ``range(n)`` (no padding, so sums over shards are exact)."""
    return list(range(rank(), n, world_size()))


def broadcast_object(obj):
    """``obj`` from rank 0 on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every process concatenated in rank order (no gradient; any first-dimension sizes)."""
    if not is_distributed():
        return tensor
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, tensor.detach().cpu())
    return torch.cat(parts).to(tensor.device)


def gather_cat_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every process concatenated in rank order, differentiable (equal first-dimension sizes).

    The backward sums every process's gradient into its own slice, so with DDP's gradient averaging a loss
    computed on the gathered tensor trains as the single-process loss on the whole batch would.
    """
    if not is_distributed():
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor))


def all_reduce_min(value: int, device: torch.device | None = None) -> int:
    """The minimum of an integer over processes (itself in a single process)."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
