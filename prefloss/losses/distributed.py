"""Cross-rank reductions for the losses' batch-level state (no-ops without torch.distributed)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def gather_values(values: torch.Tensor) -> torch.Tensor:
    """Concatenate 1-D ``values`` from every rank (ranks may hold different counts), ``[Σ n_r]``."""
    if not is_distributed() or dist.get_world_size() == 1:
        return values
    world = dist.get_world_size()
    size = torch.tensor([values.numel()], device=values.device, dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = values.new_zeros(longest)
    padded[: values.numel()] = values
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over all ranks (a new tensor; the input is not modified)."""
    out = value.clone()
    if is_distributed() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
