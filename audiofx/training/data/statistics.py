"""Per-channel input statistics: the mean and standard deviation every stage standardises its
inputs with (of the training folds only), computed alike in memory and streaming.

Both sum the same rows in the same pieces of ``STATS_BATCH`` in float64 (``ChannelMoments``),
so a streamed set gets bit for bit the statistics its in-memory copy would.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from audiofx.training.data.featuresets import FoldSet
from audiofx.training.data.streaming import StreamingLoader
from audiofx.training.runtime.distributed import Ranks

STATS_BATCH = 256  # rows per piece of the statistics, in memory and streaming alike


class ChannelMoments:
    """Per-channel sums of x and x^2 of (B, C, F, T) batches, in float64, batch by batch; the
    mean and std of everything added. ``channel_stats`` (resident tensors, in chunks) and
    ``streaming_channel_stats`` (one sequential pass) both use it, so that the same rows
    added in the same pieces give bit-identical statistics."""

    def __init__(self, channels: int, device: str | torch.device = "cpu"):
        self.total = torch.zeros(channels, dtype=torch.float64, device=device)
        self.sq = torch.zeros_like(self.total)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        part = x.double()
        self.total += part.sum(dim=(0, 2, 3))
        self.sq += (part * part).sum(dim=(0, 2, 3))
        self.count += x.shape[0] * x.shape[2] * x.shape[3]

    def all_reduce(self, ranks: Ranks) -> None:
        """Under torchrun: the moments summed over the ranks, each of which added a disjoint
        share (one collective; every rank ends with the same sums)."""
        if not ranks.active:
            return
        packed = torch.cat([self.total, self.sq, self.total.new_tensor([float(self.count)])])
        dist.all_reduce(packed)
        c = self.total.numel()
        self.total, self.sq, self.count = packed[:c], packed[c:2 * c], int(packed[-1].item())

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), float32 (1, C, 1, 1); std from E[x^2] - mean^2, at least 1e-6."""
        mean = self.total / self.count
        std = (self.sq / self.count - mean * mean).clamp_min(1e-12).sqrt()
        return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


def streaming_channel_stats(foldset: FoldSet, device: str | torch.device = "cpu", batch: int = STATS_BATCH,
                            threads: int = 2, ranks: Ranks = Ranks()) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) of every usable clip of ``foldset``, from one sequential
    (unshuffled) streaming pass: the rows come in the order ``load_in_memory`` keeps them and
    in pieces of ``batch``, so the result equals ``channel_stats(x, chunk=batch)`` of the
    loaded set bit for bit (float16 -> float32 -> float64 is exact either way).

    Under torchrun (``ranks.active``) each rank reads its own exact share and the sums are
    added over the ranks, so the store is read once, not once per rank; the result then
    differs from the one-process pass only by the order of float64 additions (~1e-16)."""
    loader = StreamingLoader(foldset, batch, shuffle=False, threads=threads, device=device, rank=ranks.rank,
                             world_size=ranks.world, exact_shares=True)
    moments = ChannelMoments(loader.shape[0], device)
    for b in loader:
        moments.add(b.x)
    moments.all_reduce(ranks)
    return moments.result()


def channel_stats(x: torch.Tensor, chunk: int = STATS_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of (N, C, F, T) float16 features, accumulated in float64 in
    chunks. Inputs are standardised with the training folds' statistics only. A streaming
    run computes the same numbers in one pass over the store (``streaming_channel_stats``)."""
    moments = ChannelMoments(x.shape[1], x.device)
    for i in range(0, x.shape[0], chunk):
        moments.add(x[i:i + chunk])
    return moments.result()


def fold_copies(mean: torch.Tensor, std: torch.Tensor, copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel statistics of a set storing ``copies`` copies of each clip, one after
    another along the channels (K * C), as one copy's C channels: the mean and std over every
    copy (equal counts, so the moments average). A network sees one copy at a time, standardised
    alike whichever copy it is, and evaluation standardises the plain set with the same C."""
    if copies == 1:
        return mean, std
    c = mean.shape[1] // copies
    m = mean.double().view(copies, c)
    second = (std.double().view(copies, c) ** 2 + m * m).mean(0)
    folded = m.mean(0)
    return folded.float().view(1, c, 1, 1), (second - folded * folded).clamp_min(1e-12).sqrt().float().view(1, c, 1, 1)
