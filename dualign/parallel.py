"""Data-parallel stages: the few collective operations a sharded stage needs, on torch.distributed.

A stage run under `torchrun --nproc_per_node N` or `accelerate launch` (WORLD_SIZE > 1 in the
environment) opens `process_group()`, does its share of the work, and meets the other ranks
at `barrier` / `broadcast` / `gather`. A plain run is world size 1: the same calls, no
torch.distributed at all, so a stage keeps one code path.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from .errors import InputError
from .runio import dist_info

# How long a rank waits at a barrier for the others. Ranks finish their shards at different
# times (a shard of long answers, a slower GPU); torch's default (10 min for NCCL) would kill
# a healthy run, while a rank that dies is noticed by the launcher, which stops the others.
WAIT = timedelta(hours=6)


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks of one run, and the collectives between them.

    Attributes
    ----------
    rank : int
        0 .. world_size - 1; rank 0 writes the merged outputs.
    world_size : int
    local_rank : int
        Index of this rank on its machine (its GPU).
    """
    rank: int
    world_size: int
    local_rank: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to wait for at world size 1)."""
        if self.distributed:
            import torch
            import torch.distributed as dist

            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj`, on every rank (a collective: every rank calls it)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (a collective)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def rank_device(device: str | None, group: Group | None = None) -> str | None:
    """The device a rank loads its model on: under a distributed launch, `cuda:LOCAL_RANK`
    when CUDA is available (for no `device` or "cuda"), else "cpu"; an explicit "cpu" or
    "cuda:N" is kept. At world size 1, `device` unchanged.

    Raises
    ------
    InputError
        "auto" under a distributed launch (it would spread every rank's copy over all GPUs),
        or LOCAL_RANK not below the number of visible GPUs.
    """
    info = group or dist_info()
    if info.world_size <= 1:
        return device
    if device == "auto":
        raise InputError("--device auto spreads one model over all GPUs; under a distributed launch "
                         "each rank takes cuda:LOCAL_RANK (leave --device unset)", field="device")
    if device not in (None, "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    if info.local_rank >= torch.cuda.device_count():
        raise InputError(f"LOCAL_RANK={info.local_rank} but only {torch.cuda.device_count()} GPU(s) "
                         "are visible to this process", field="device")
    return f"cuda:{info.local_rank}"


@contextmanager
def process_group():
    """The ranks of this run, with torch.distributed set up when launched distributed.

    With WORLD_SIZE > 1 and no process group yet, one is initialized from the launcher's
    environment (MASTER_ADDR, MASTER_PORT): NCCL when CUDA is available (this rank's GPU made
    current first), else gloo; it is destroyed on leaving. A group someone else initialized
    (accelerate, a calling pipeline) is used as it is and left open. Hold one group around
    everything a process runs sharded (the pipelines do): a gloo group destroyed and set up
    again in one process can hang or fail in the second rendezvous.

    Yields
    ------
    Group

    Raises
    ------
    InputError
        Bad launcher variables (`dist_info`), or torch built without distributed support.
    """
    info = dist_info()
    import torch

    dist = torch.distributed if torch.distributed.is_available() else None
    if dist is not None and dist.is_initialized():
        yield Group(dist.get_rank(), dist.get_world_size(), info.local_rank)
        return
    if info.world_size == 1:
        yield Group(0, 1, 0)
        return
    if dist is None:
        raise InputError(f"WORLD_SIZE={info.world_size}, but this torch has no torch.distributed")
    cuda = torch.cuda.is_available()
    if cuda:
        if info.local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK={info.local_rank} but only {torch.cuda.device_count()} GPU(s) "
                             "are visible to this process")
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT)
    try:
        yield Group(dist.get_rank(), dist.get_world_size(), info.local_rank)
        # every rank done with the group before any tears its connections down: a gloo rank that
        # destroyed its group while the other still finished its last collective was aborted
        # once ("terminate called without an active exception") in a 2-rank test
        dist.barrier()
    finally:
        dist.destroy_process_group()
