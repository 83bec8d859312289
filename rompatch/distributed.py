"""Work shared by several processes with torch.distributed (``torchrun``).

``torchrun --nproc-per-node N -m rompatch stats ...`` (or ``eval``) starts N copies of the command.
Each joins the process group (``joining``), takes its share of the work (``Group.mine``) and the
shares are combined with collectives: sums for statistics (``Group.all_sum``), gathered records for
evaluation (``Group.all_gather``). Rank 0 writes what a single process would write.

The group is passed explicitly to what uses it; nothing here is global. A process not started by
torchrun gets ``SINGLE``, where every share is the whole and every collective is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .errors import DeviceError


@dataclass(frozen=True)
class Group:
    """This process's place among ``world`` processes, and where its collectives run."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # CPU for gloo, this rank's GPU for nccl

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, i: int) -> bool:
        """Whether work item ``i`` (a batch, a record) is this process's: ``i % world == rank``."""
        return i % self.world == self.rank

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes (every process gets the sum), on ``t``'s device and dtype."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        x = t.to(self.device)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x.to(t.device)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process."""
        if self.world == 1:
            return flag
        return bool(self.all_sum(torch.tensor([1.0 if flag else 0.0])).item() == self.world)

    def all_gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order, on every process."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


SINGLE = Group()


def launched() -> bool:
    """Whether torchrun started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def rank_device(device: str | None) -> str | None:
    """The device a torchrun process loads its model onto: its own GPU (``cuda:LOCAL_RANK``) when
    ``device`` is ``auto``/``cuda`` and CUDA is there, else ``device`` unchanged."""
    if not launched():
        return device
    if (device in (None, "auto", "cuda")) and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu" if device in (None, "auto") else device


@contextmanager
def joining(device: str | None = None) -> Iterator[Group]:
    """The process group for the block: under torchrun, join it (nccl when this process computes on
    CUDA, else gloo) and leave it on exit; otherwise ``SINGLE``."""
    if not launched():
        yield SINGLE
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise DeviceError("this torch has no torch.distributed; run the command without torchrun")
    dev = torch.device(rank_device(device) or "cpu")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend=backend)
    try:
        yield Group(rank=dist.get_rank(), world=dist.get_world_size(), device=dev)
    finally:
        dist.destroy_process_group()
