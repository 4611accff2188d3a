"""In memory or streaming: the one rule every stage reads its folds by.

The folds are held in memory when their raw size (``FoldSet.raw_bytes``: clips * prod(shape)
* 2 bytes, from the manifest) fits the memory budget, else streamed from the store. The
budget is --memory-budget GB, or by default half of what is free where the data would live.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from audiofx.training.runtime.distributed import Ranks

MODE_MEMORY = "memory"
MODE_STREAMING = "streaming"


def available_memory(device: str | torch.device = "cpu") -> int:
    """Free bytes: MemAvailable from /proc/meminfo, or free memory of a CUDA device."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass(frozen=True)
class DataMode:
    """How a stage reads a FoldSet: ``mode`` "memory" or "streaming", from the folds' raw
    size and the memory budget (both in bytes)."""

    mode: str
    size: int
    budget: int
    kept: bool = False  # the mode recorded by the run a --resume continues, whatever the budget

    @property
    def streaming(self) -> bool:
        return self.mode == MODE_STREAMING

    def describe(self) -> str:
        """'in memory (0.015 GB, budget 8.2 GB)' or 'streaming (0.015 GB, over the budget of 0 GB)';
        'streaming (0.015 GB, as the resumed run started)' for a kept mode."""
        if self.kept:
            return f"{'streaming' if self.streaming else 'in memory'} ({gigabytes(self.size)}, as the resumed run started)"
        if self.streaming:
            return f"streaming ({gigabytes(self.size)}, over the budget of {gigabytes(self.budget)})"
        return f"in memory ({gigabytes(self.size)}, budget {gigabytes(self.budget)})"


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.3g} GB"


def budget_bytes(gb: float | None) -> int | None:
    """--memory-budget GB as bytes (None: the default budget)."""
    return None if gb is None else round(gb * 1e9)


def choose_mode(size: int, budget: int | None = None, device: str | torch.device = "cpu", *,
                recorded: dict[str, Any] | None = None, ranks: Ranks = Ranks()) -> DataMode:
    """The one rule every stage reads its folds by: in memory when their raw size in bytes
    (``FoldSet.raw_bytes``: clips * prod(shape) * 2) fits the budget, else streaming.

    - The budget is ``budget`` bytes (--memory-budget; 0 always streams), or by default half of
      what is free where the data would live: MemAvailable for the CPU, free memory of the
      device for CUDA (the model and activations need the rest).
    - Under torchrun (``ranks.active``) every rank must take the same mode, and free memory
      differs between ranks (one GPU each): the default budget is the smallest of the ranks'.
    - ``recorded``: the config.json of the run a --resume continues. Without --memory-budget
      the run keeps the mode it started in (the mode decides the batch order; free memory may
      differ now); runs from before streaming existed were in memory.
    """
    given = budget is not None
    budget = int(budget) if given else available_memory(device) // 2
    if not given and ranks.active:
        smallest = torch.tensor([budget], dtype=torch.int64, device=device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        budget = int(smallest.item())
    if not given and recorded is not None:
        return DataMode(recorded.get("data_mode", MODE_MEMORY), size, budget, kept=True)
    return DataMode(MODE_MEMORY if size <= budget else MODE_STREAMING, size, budget)
