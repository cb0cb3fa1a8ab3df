"""Data-parallel training over several processes (DDP): one process per GPU, or CPU processes (gloo).

Two ways in:

* ``torchrun --nproc-per-node N -m milotile.cli explore train ...`` -- torchrun sets ``RANK``,
  ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``; :func:`init_from_env` joins that group.
* :func:`launch` (``milotile explore train --nproc N``) -- spawns N processes on this machine,
  each joins a group on a free local port and runs the same function.

Each rank computes the loss on its slice of every *global* batch (:func:`shard`); DDP averages the
gradients, so the update equals single-process training on the whole batch (exactly for models
without BatchNorm; BatchNorm layers become ``SyncBatchNorm`` on CUDA -- PyTorch offers no CPU
SyncBatchNorm, so CPU ranks normalise with their own slice's statistics).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from milotile.runtime import set_threads, threads_per_task

log = logging.getLogger(__name__)

__all__ = ["is_distributed", "rank_world", "init_from_env", "wrap", "shard", "launch", "all_mean", "is_main"]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and outside a process group): the rank that logs and writes files."""
    return rank_world()[0] == 0


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment variables, if any.

    Returns True when a group with more than one rank is active afterwards.
    """
    if dist.is_initialized():
        return is_distributed()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    backend = _backend()
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    log.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)
    return is_distributed()


def local_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` with NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` (SyncBatchNorm on CUDA); the model itself outside a group."""
    if not is_distributed():
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    return torch.nn.parallel.DistributedDataParallel(model)


def shard(x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (rows split as evenly as possible)."""
    rank, world = rank_world()
    if world == 1:
        return x
    n = x.shape[0]
    lo, hi = rank * n // world, (rank + 1) * n // world
    return x[lo:hi]


def all_mean(value: float | torch.Tensor) -> float:
    """Mean of a scalar over all ranks (the value itself outside a group)."""
    if not is_distributed():
        return float(value)
    t = torch.as_tensor(float(value), dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, backend: str, fn: Callable[..., Any], args: tuple,
            kwargs: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:  # CPU ranks share the cores
        set_threads(threads_per_task(world))
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = fn(*args, **kwargs)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, backend: str | None = None, **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` in ``nprocs`` processes joined in one DDP group; return each rank's result.

    ``backend`` defaults to NCCL when CUDA is present (one GPU per rank), else gloo on CPU processes.
    ``fn`` must be importable (a module-level function); results travel back through ``torch.save``.
    """
    nprocs = int(nprocs)
    if nprocs < 1:
        raise ValueError(f"nprocs must be at least 1, got {nprocs}")
    backend = backend or _backend()
    if backend == "nccl" and nprocs > torch.cuda.device_count():
        raise ValueError(f"{nprocs} NCCL ranks need {nprocs} GPUs, {torch.cuda.device_count()} found")
    with tempfile.TemporaryDirectory(prefix="milotile-ddp-") as out_dir:
        mp.spawn(_worker, args=(nprocs, _free_port(), backend, fn, args, kwargs, out_dir), nprocs=nprocs, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(nprocs)]
