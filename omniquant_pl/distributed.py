"""Data-parallel calibration under torchrun: this process's place among the others, and the few
collectives that keep every process's decisions the same.

torchrun starts one process per device and sets WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE.
`train.batch_size` stays the global batch, so one config gives the same result at any process
count: each process holds `batch_size / world_size` windows of every global batch (see `shard`),
each block's Trainer all-reduces the gradients (Lightning's DDP strategy), and the losses that
decide something (epoch losses, keep_best, non-finite retries) are reduced here as (sum, count).
Without torchrun (or with one process) every function here is a no-op.
"""
from __future__ import annotations

import atexit
import inspect
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from omniquant_pl.errors import ConfigError

log = logging.getLogger(__name__)

# rank 0 evaluates (perplexity, zero-shot tasks) and saves the model while the others wait at a
# barrier: collectives get far longer than torch's default 10 (NCCL) / 30 (gloo) minutes
COLLECTIVE_TIMEOUT = timedelta(hours=4)
# DistributedDataParallel's options in this torch (newer ones renamed broadcast_buffers)
DDP_OPTIONS = frozenset(inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters)


@dataclass(frozen=True)
class Processes:
    """This process's rank among torchrun's processes (one process per device)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Processes:
        env = os.environ if env is None else env
        world_size = int(env.get("WORLD_SIZE", 1))
        processes = cls(world_size=world_size, rank=int(env.get("RANK", 0)), local_rank=int(env.get("LOCAL_RANK", 0)),
                        local_world_size=int(env.get("LOCAL_WORLD_SIZE", world_size)))
        if processes.world_size % processes.local_world_size:
            raise ConfigError(
                f"torchrun started {processes.world_size} processes with {processes.local_world_size} on this node; "
                "start the same number on every node (--nproc_per_node)"
            )
        return processes

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank_zero(self) -> bool:
        """Whether this process writes the run's files, evaluates and prints progress."""
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size

    def device(self, device: torch.device) -> torch.device:
        """This process's own GPU (cuda:LOCAL_RANK) when several processes share a node's GPUs."""
        if device.type == "cuda" and self.is_distributed:
            return torch.device("cuda", self.local_rank)
        return device

    def local_batch_size(self, batch_size: int, nsamples: int) -> int:
        """Windows per step on this process: the global `batch_size` split evenly over the processes,
        the last (shorter) global batch too; a one-line ConfigError otherwise."""
        world = self.world_size
        if batch_size % world:
            raise ConfigError(f"train.batch_size {batch_size} cannot be split over {world} processes; "
                              f"set train.batch_size to a multiple of {world}")
        if nsamples % batch_size % world:
            raise ConfigError(
                f"calib.nsamples {nsamples} leaves a last batch of {nsamples % batch_size} windows that cannot be "
                f"split over {world} processes; set calib.nsamples to a multiple of {batch_size} (train.batch_size)"
            )
        return batch_size // world

    def shard_rows(self, nsamples: int, batch_size: int) -> list[int]:
        """Indices of the windows this process holds: for global batch k of size n_k (the global
        `batch_size`, or less for the last), rows [k·B + r·n_k/W, k·B + (r+1)·n_k/W). Its k-th local
        batch is its part of the single-process k-th batch, so one batch order serves every rank."""
        self.local_batch_size(batch_size, nsamples)
        rows: list[int] = []
        for start in range(0, nsamples, batch_size):
            part = min(batch_size, nsamples - start) // self.world_size
            rows += range(start + self.rank * part, start + (self.rank + 1) * part)
        return rows

    def shard(self, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
        """This process's windows (N/W, seqlen) of all the calibration windows (N, seqlen)."""
        if not self.is_distributed:
            return windows
        return windows[self.shard_rows(windows.shape[0], batch_size)]


def is_active() -> bool:
    """Whether collectives run: a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device() -> torch.device:
    """NCCL reduces tensors on this process's GPU, gloo on the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_process_group(processes: Processes, device: torch.device) -> None:
    """The process group (NCCL on GPUs, gloo on the CPU) when torchrun started several processes,
    before any collective; every block's Trainer, and a later run in the same process, reuses it.
    It lives until the process exits (a second init through torchrun's store could read the first
    one's stale addresses)."""
    if not processes.is_distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None)
    atexit.register(_destroy_process_group)
    log.info("data-parallel calibration: process %d of %d (%s)", processes.rank, processes.world_size, backend)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here (rank 0's evaluation, saving)."""
    if is_active():
        device = _collective_device()
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def global_mean(total: torch.Tensor, count: int) -> float:
    """sum / count over every process (each passes its own), e.g. a mean loss over all windows."""
    if not is_active():
        return (total / max(count, 1)).item()
    pair = torch.stack([total.detach().double().reshape(()), torch.tensor(float(count), dtype=torch.float64)
                        .to(total.device)]).to(_collective_device())
    dist.all_reduce(pair)
    return (pair[0] / pair[1].clamp(min=1)).item()


def global_channel_mean(total: torch.Tensor, count: int) -> torch.Tensor:
    """Per-channel sum / count over every process (each passes its own): input mean squares."""
    if not is_active():
        return total / max(count, 1)
    pair = torch.cat([total.detach().double().reshape(-1), torch.tensor([float(count)], dtype=torch.float64,
                                                                        device=total.device)]).to(_collective_device())
    dist.all_reduce(pair)
    return (pair[:-1] / pair[-1].clamp(min=1)).to(total.device, total.dtype)


def global_sum(values: list[int]) -> list[int]:
    """Element-wise sum over every process (token counts per expert)."""
    if not is_active() or not values:
        return values
    tensor = torch.tensor(values, dtype=torch.long, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def global_ranges(ranges: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Per-channel (min, max) input ranges (LET's initialisation) over every process's windows, in place."""
    if not is_active():
        return
    for name in sorted(ranges):
        merged = []
        for value, op in zip(ranges[name], (dist.ReduceOp.MIN, dist.ReduceOp.MAX)):
            reduced = value.to(_collective_device())
            dist.all_reduce(reduced, op=op)
            merged.append(reduced.to(value.device))
        ranges[name] = (merged[0], merged[1])


def differs_from_rank_zero(value: Any) -> bool:
    """Whether any process's `value` (picklable, comparable) differs from rank 0's: the same answer
    on every process, so all of them can stop together."""
    if not is_active():
        return False
    flag = torch.tensor([int(value != broadcast_from_rank_zero(value))], device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def broadcast_from_rank_zero(obj: Any) -> Any:
    """Rank 0's `obj` (picklable) on every process."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def trainer_placement(processes: Processes, device: torch.device, find_unused_parameters: bool) -> dict[str, Any]:
    """A block Trainer's placement arguments: one device, or Lightning's DDP strategy over torchrun's
    processes (gradients all-reduced after every backward). Each process already holds its shard,
    so Lightning must not swap our batch order for a DistributedSampler."""
    if not processes.is_distributed:
        return {"devices": 1}
    from lightning.pytorch.strategies import DDPStrategy

    # the frozen block's buffers are the same everywhere: no broadcast before every forward
    buffers = "forward_sync_buffers" if "forward_sync_buffers" in DDP_OPTIONS else "broadcast_buffers"
    strategy = DDPStrategy(
        process_group_backend="nccl" if device.type == "cuda" else "gloo",
        find_unused_parameters=find_unused_parameters,  # experts that received no tokens get no gradient
        timeout=COLLECTIVE_TIMEOUT,
        **{buffers: False},
    )
    return {"devices": processes.local_world_size, "num_nodes": processes.num_nodes, "strategy": strategy,
            "use_distributed_sampler": False}


def quiet_other_ranks(processes: Processes) -> None:
    """Processes other than rank 0 log warnings and errors only (rank 0 tells the story once)."""
    if not processes.is_rank_zero:
        for name in ("omniquant_pl", "callbacks"):
            logging.getLogger(name).setLevel(logging.WARNING)
