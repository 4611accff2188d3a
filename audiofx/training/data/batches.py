"""What both loaders hand out and how they order it: a Batch, the labels' two forms, the
seeded generators every permutation comes from, and a rank's share of an epoch.

Shuffling is repeatable: every permutation comes from a ``torch.Generator`` seeded from
(seed, epoch[, rank]). With ``world_size`` > 1 each rank gets a disjoint share of equal
length, padded by wrapping around like ``torch.utils.data.DistributedSampler``, so every
rank runs the same number of batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """One batch: x float32 (B, C, bins, T) on the device; y int64 (B,) or float32 multi-hot
    (B, n_classes); index int64 (B,) global sample indices."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


def torch_labels(y: np.ndarray, multilabel: bool) -> torch.Tensor:
    """Stored labels as a tensor: int64 class indices, or bool (N, n_classes) multi-hot."""
    return torch.from_numpy(np.ascontiguousarray(y, dtype=bool if multilabel else np.int64))


def batch_labels(y: torch.Tensor) -> torch.Tensor:
    """Labels as a model wants them: int64 class indices, or float32 multi-hot."""
    return y.float() if y.dtype == torch.bool else y


def mix_seed(*parts: int) -> int:
    """A 63-bit torch seed from several integers, well mixed (seed 0 epoch 1 != seed 1 epoch 0)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def seeded_generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(mix_seed(*parts))
    return g


def rank_span(rank: int, world_size: int, n: int, drop_last: bool, exact: bool = False) -> tuple[int, int, int]:
    """(start, stop, per_rank) of a rank's share of n samples, DistributedSampler-style:
    per_rank = ceil(n / ws) (positions past n wrap around) or floor(n / ws) with drop_last.
    ``exact``: every sample on exactly one rank, shares differing by at most one."""
    if exact:
        start, stop = rank * n // world_size, (rank + 1) * n // world_size
        return start, stop, stop - start
    per_rank = n // world_size if drop_last else -(-n // world_size)
    return rank * per_rank, (rank + 1) * per_rank, per_rank


def check_batching(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
