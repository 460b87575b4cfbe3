"""torchrun / torch.distributed set-up and the two collectives the trainer needs (sum all-reduce, barrier)."""

from __future__ import annotations

import dataclasses
import logging
import os

import torch


log = logging.getLogger(__name__)


@dataclasses.dataclass
class DistInfo:
    """This process's place in the run: global ``rank``, ``world_size`` and ``local_rank`` (its GPU on the node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) when ``WORLD_SIZE`` > 1; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(tensor: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place (identity in a single process); returns it."""
    if dist_info.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(dist_info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()
