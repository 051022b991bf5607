"""torch.distributed for training and inference under torchrun (env://).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them
everything here is the single-process case (rank 0 of 1) and touches no process group.
gloo serves CPU tensors, NCCL CUDA ones; on CUDA each process takes the GPU of its LOCAL_RANK.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "init", "initialized", "shutdown", "env_world_size"]


@dataclass(frozen=True)
class Dist:
    """This process's place: rank of world_size; device: where its tensors live."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum each value over the ranks (float64); the values as they are on one process."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def all_reduce_min(self, values: list[float]) -> list[float]:
        """Minimum of each value over the ranks (float64)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank passes True (e.g. a signal that reached one rank)."""
        return bool(self.all_reduce_sum([float(flag)])[0]) if self.active else flag

    def gather_lists(self, items: list) -> list:
        """The concatenation of every rank's `items` (rank order), on every rank."""
        if not self.active:
            return list(items)
        boxes = [None] * self.world_size
        dist.all_gather_object(boxes, list(items))
        return [x for box in boxes for x in box]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_object(self, obj):
        """rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str) -> Dist:
    """Join the process group of torchrun's environment (once), or the single-process Dist.

    device: "cpu" or "cuda" (with several processes, "cuda" becomes cuda:LOCAL_RANK; "cuda:N"
    is refused there, since every rank would take the same GPU)."""
    world = env_world_size()
    if world <= 1:
        return Dist(device=torch.device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is not None:
            raise ValueError(f"--device {device}: under torchrun each process takes the GPU of its "
                             "LOCAL_RANK; pass --device cuda")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world)
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    if initialized():
        dist.destroy_process_group()
