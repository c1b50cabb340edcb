"""Which process this is (rank, world size, local rank), its device, and the process group of the non-Lightning commands.

One place answers "who am I" for every command and library path: a running torch.distributed group first, then the
launcher's environment (torchrun: RANK / WORLD_SIZE / LOCAL_RANK; srun: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID),
else a single process. Lightning's own launcher is used by `fit`; `prepare`, `sample` and `sweep` use this module.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch


@dataclass(frozen=True)
class Ranks:
    """rank in [0, world), world size, and the rank within this node (which GPU to take)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in [0, world size {self.world}); check RANK/WORLD_SIZE or "
                             "SLURM_PROCID/SLURM_NTASKS")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> Ranks:
    """Ranks from torchrun's or srun's environment variables; a single process when neither launched us."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return Ranks(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return Ranks()


def current() -> Ranks:
    """An initialised torch.distributed group wins over the environment (Lightning may set up the group itself)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        local = from_environment().local_rank
        return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size(), local)
    return from_environment()


def device_for(device: str | torch.device, local_rank: int = 0) -> torch.device:
    """"auto": cuda:LOCAL_RANK when CUDA is there, else cpu; "cuda": cuda:LOCAL_RANK; anything else as given."""
    name = str(device)
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; pass --device cpu (or auto)")
    return torch.device(name)


@contextlib.contextmanager
def process_group(ranks: Ranks, device: torch.device) -> Iterator[None]:
    """A process group for the duration of a command when several ranks run and none exists yet (NCCL on CUDA)."""
    import torch.distributed as dist

    if ranks.world == 1 or dist.is_initialized():
        yield
        return
    if "MASTER_ADDR" not in os.environ:
        raise ValueError(f"rank {ranks.rank}/{ranks.world}: MASTER_ADDR/MASTER_PORT are not set; launch with torchrun "
                         "or export them")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL barriers use the current device
    # Rank 0 may merge an npz of 50k PNGs while the others wait: far more than the default timeout.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ranks.rank, world_size=ranks.world,
                            timeout=timedelta(hours=3))
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank when a process group runs; nothing otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
