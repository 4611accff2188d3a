"""Data-parallel runs under torchrun: `torchrun --nproc-per-node N -m audiofx finetune ...`.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them everything runs in one process.
NCCL on GPUs, gloo on CPU. Rank 0 alone writes the run folder; every rank trains on its own
share of each epoch's permutation, and DDP averages the gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from audiofx.errors import ConfigError
from audiofx.training.runtime.device import pick_device


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched_ranks() -> int:
    """How many ranks torchrun started (WORLD_SIZE); 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_name: str | None) -> tuple[Ranks, torch.device]:
    world = launched_ranks()
    if world <= 1:
        return Ranks(), pick_device(device_name)
    use_cuda = torch.cuda.is_available() and device_name not in ("cpu",)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()


def wrap(model: torch.nn.Module, ranks: Ranks, device: torch.device, broadcast_buffers: bool = True) -> torch.nn.Module:
    """DistributedDataParallel when there are several ranks, the model itself otherwise."""
    if not ranks.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=broadcast_buffers)


def average_batchnorm_statistics(model: torch.nn.Module, ranks: Ranks) -> None:
    """Average BatchNorm running means and variances over the ranks. Pretraining wraps its
    methods without DDP's buffer broadcast (the memory bank or queue would be sent at every
    step; the methods keep those in step themselves), so each rank's running statistics
    follow its own share: averaged once an epoch, before the checkpoint, the saved encoder
    normalises with statistics of the whole epoch, the same on every rank."""
    if not ranks.active:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for stats in (module.running_mean, module.running_var):
                if stats is not None:
                    dist.all_reduce(stats, op=dist.ReduceOp.SUM)
                    stats.div_(ranks.world)


def run_on_ranks(stage, cfg, say):
    """Run `stage(cfg, ranks, device, say)` in this process or as one torchrun rank: rank 0
    alone talks, every rank needs the same --name (they open one run folder), and the process
    group is torn down however the stage ends."""
    ranks, device = init_distributed(cfg.device)
    try:
        if cfg.name is None and ranks.active:
            raise ConfigError("a distributed run needs --name", "every rank must open the same run folder")
        return stage(cfg, ranks, device, say if ranks.main else (lambda *a, **k: None))
    finally:
        shutdown(ranks)


def shutdown(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()
