"""Process-group setup under ``torchrun`` (NCCL on GPUs, gloo on CPUs) and the few collectives the loop needs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import UsageError


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job: rank, world size and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only rank 0 prints, logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def choose_device(requested: str | None, local_rank: int) -> torch.device:
    """``--device`` as a ``torch.device``; default cuda (``cuda:LOCAL_RANK``) when available, else cpu."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UsageError(f"--device {requested!r} is not a torch device; use e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {requested}: CUDA is not available here; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def setup(requested_device: str | None) -> DistEnv:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = choose_device(requested_device, int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, device)


def teardown(env: DistEnv) -> None:
    """Leave the process group if this process joined one."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all processes (identity when single-process)."""
    if not env.distributed:
        return values
    backend_device = env.device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(env: DistEnv, obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (a one-element list when single-process)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (``obj`` itself when single-process)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
