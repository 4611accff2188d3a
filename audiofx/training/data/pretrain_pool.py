"""The pretraining pool: every dataset's usable clips cut into samples of the shortest clip
length, in memory (``load_pool``, ``ResidentPool``) or streamed from the store for pools
larger than the memory budget (``PoolLoader``, ``StreamedPool``).

The in-memory pool is the segments of every dataset, concatenated. ``PoolLoader`` gives the
same samples, numbered the same way, without holding them: one ``StreamingLoader`` per dataset (all folds) reads whole
clips, each batch is cut into segments on arrival, and the datasets' batches are interleaved.

Sample identity: pool index = dataset offset + clip index in the dataset (StreamingLoader's
``index``: fold order then row order, skipped clips left out) * segments + segment number,
exactly as ``torch.cat([segments(d.x, frames) for d in datasets])`` numbers its rows. So
NPID's memory bank means the same thing in both modes.

Order: a dataset with S segments per clip is read in batches of max(1, batch_size // S)
clips (b * S samples, near batch_size). The sequence of "which dataset's next batch" is a
seeded permutation of every dataset's batch count, drawn from (seed, epoch) alone: each
dataset contributes in proportion to its size, every sample is seen once per epoch (each
StreamingLoader covers its dataset once), and a resumed run repeats the same epochs. With
several ranks each StreamingLoader gives every rank the same number of batches of the same
sizes (padding by wrapping, like DistributedSampler), so all ranks take the same steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from audiofx.pipeline.reading import open_fold_reader
from audiofx.training.data.batches import Batch, seeded_generator
from audiofx.training.data.featuresets import FoldSet, usable_clips
from audiofx.training.data.memory import InMemoryData, InMemoryLoader, load_in_memory
from audiofx.training.data.statistics import ChannelMoments, channel_stats
from audiofx.training.data.streaming import StreamingLoader
from audiofx.training.runtime.distributed import Ranks

# Tells the interleaving generator apart from the ones StreamingLoader seeds from (seed, epoch).
_INTERLEAVE = 0x504F4F4C


def segments(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(N, C, F, T) -> (N * (T // frames), C, F, frames): consecutive, non-overlapping segments
    (the last T % frames frames are dropped)."""
    n, c, f, t = x.shape
    s = t // frames
    x = x[..., : s * frames].reshape(n, c, f, s, frames)
    return x.permute(0, 3, 1, 2, 4).reshape(n * s, c, f, frames)


def pool_sizes(foldsets: list[FoldSet], frames: int) -> list[int]:
    """Samples of each dataset in the pool: usable clips x segments of ``frames``. The usable
    clips are the manifest's count; a store written before the manifest recorded it counts
    them in its ``ok`` arrays."""
    sizes = []
    for fs in foldsets:
        m = fs.manifest()
        if all("ok" in m["folds"][f] for f in fs.folds):
            clips = sum(usable_clips(m, f) for f in fs.folds)
        else:
            store = fs.feature_store()
            clips = sum(int(open_fold_reader(store, fs.dataset, fs.key, f, m).ok.sum()) for f in fs.folds)
        sizes.append(clips * (int(m["shape"][-1]) // frames))
    return sizes


def load_pool(foldsets: list[FoldSet], frames: int, device: str | torch.device = "cpu",
              keep: int | None = None) -> tuple[torch.Tensor, InMemoryData | None]:
    """The in-memory pool: every dataset's usable clips cut into segments, one row per sample
    in pool-index order (equal to ``torch.cat([segments(load_in_memory(fs).x, frames) ...])``).
    The pool is allocated once at its final size, and each dataset is loaded, cut straight
    into it and let go, so the peak is the pool plus one dataset, not every dataset twice.
    The dataset at position ``keep`` (the kNN monitor's) is returned as loaded."""
    sizes = pool_sizes(foldsets, frames)
    x, kept, at = None, None, 0
    for i, fs in enumerate(foldsets):
        d = load_in_memory(fs, device=device)
        n, c, f, t = d.x.shape
        s = t // frames
        assert n * s == sizes[i], (fs.dataset, n * s, sizes[i])
        if x is None:
            x = torch.empty((sum(sizes), c, f, frames), dtype=d.x.dtype, device=d.x.device)
        # segments(d.x, frames) written in place: the split of the time axis and the permute are views
        x[at:at + n * s].view(n, s, c, f, frames).copy_(
            d.x[..., : s * frames].reshape(n, c, f, s, frames).permute(0, 3, 1, 2, 4))
        at += n * s
        if i == keep:
            kept = d
        del d
    return x, kept


class PoolLoader:
    """Batches of the pretraining pool streamed from the store (see the module docstring).

    ``foldsets``: one FoldSet (all folds) per dataset, in pool order; ``frames``: the pool's
    sample length (the shortest clip's frame count). ``stream``: extra StreamingLoader
    arguments (buffer_chunks, run_chunks, threads, prefetch). Batches: x float32 (B, C, F,
    frames) on ``device``, y zeros (labels are never read), index the pool indices.
    """

    def __init__(self, foldsets: list[FoldSet], frames: int, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu", **stream: Any):
        self.frames, self.batch_size, self.shuffle, self.seed = frames, batch_size, shuffle, seed
        self.loaders: list[StreamingLoader] = []
        self.segments: list[int] = []
        for fs in foldsets:
            shape = tuple(int(s) for s in fs.manifest()["shape"])
            s = shape[-1] // frames
            if s < 1:
                raise ValueError(f"{fs.dataset} has {shape[-1]} frames, fewer than the pool's {frames}")
            self.segments.append(s)
            self.loaders.append(StreamingLoader(fs, max(1, batch_size // s), shuffle=shuffle, seed=seed, rank=rank,
                                                world_size=world_size, device=device, **stream))
        sizes = [ld.n * s for ld, s in zip(self.loaders, self.segments)]
        self.offsets = np.cumsum([0] + sizes)[:-1].tolist()
        self.n = int(sum(sizes))  # pool samples (the memory bank's rows)
        self.epoch = 0

    def __len__(self) -> int:
        return sum(len(ld) for ld in self.loaders)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> np.ndarray:
        """Which dataset gives each batch of an epoch (positions in ``loaders``)."""
        which = np.repeat(np.arange(len(self.loaders)), [len(ld) for ld in self.loaders])
        if self.shuffle and len(which):
            which = which[torch.randperm(len(which), generator=seeded_generator(self.seed, epoch, _INTERLEAVE)).numpy()]
        return which

    def cut(self, d: int, batch: Batch) -> Batch:
        """A batch of dataset ``d``'s clips as pool samples: segments and their pool indices."""
        s = self.segments[d]
        x = segments(batch.x, self.frames)
        index = (self.offsets[d] + batch.index.view(-1, 1) * s
                 + torch.arange(s, device=batch.index.device).view(1, -1)).reshape(-1)
        return Batch(x, torch.zeros(len(index), dtype=torch.long, device=index.device), index)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        self.epoch += 1
        for ld in self.loaders:
            ld.set_epoch(epoch)
        # Generators: a loader starts its reading threads on its first batch, and close()
        # below stops them however the epoch ends.
        streams = [iter(ld) for ld in self.loaders]
        try:
            for d in self.order(epoch).tolist():
                yield self.cut(d, next(streams[d]))
        finally:
            for st in streams:
                st.close()


@torch.no_grad()
def pool_channel_stats(foldsets: list[FoldSet], frames: int, device: str | torch.device = "cpu",
                       batch_size: int = 64, ranks: Ranks = Ranks()) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of the pool's samples in one sequential pass over the store,
    accumulated in float64 (``ChannelMoments``, as ``channel_stats`` on the in-memory pool):
    the same values, without the pool in memory. Segments are a reshaping of the frames, so
    summing the cut clips' frames (the frames past the last whole segment dropped, as the
    in-memory pool drops them) gives the pool's sums. Under torchrun each rank reads
    an exact share of every dataset and the sums are added over the ranks
    (``streaming_channel_stats``)."""
    loader = PoolLoader(foldsets, frames, batch_size, shuffle=False, device=device, rank=ranks.rank,
                        world_size=ranks.world, exact_shares=True)
    moments = ChannelMoments(loader.loaders[0].shape[0], device)
    for batch in loader:
        moments.add(batch.x)
    moments.all_reduce(ranks)
    return moments.result()


class ResidentPool:
    """The pool in memory (``load_pool``); ``kept``: the dataset at position ``keep`` as loaded
    (all its folds), for the kNN monitor."""

    not_kept: str | None = None  # in memory, what is kept is never over the budget

    def __init__(self, foldsets: list[FoldSet], frames: int, device: str | torch.device, keep: int | None = None):
        self.x, self.kept = load_pool(foldsets, frames, device=device, keep=keep)
        n = self.x.shape[0]
        self.data = InMemoryData(x=self.x, y=torch.zeros(n, dtype=torch.long, device=self.x.device),
                                 index=torch.arange(n, device=self.x.device), clips=[""] * n, fold_of=[""] * n)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def loader(self, batch_size: int, seed: int = 0, ranks: Ranks = Ranks()) -> InMemoryLoader:
        """Shuffled batches; the short last batch is dropped when the pool holds more than one
        batch per rank (a contrastive batch of a few samples has few negatives, and BatchNorm
        few samples to normalise by)."""
        return InMemoryLoader(self.data, batch_size, shuffle=True, drop_last=len(self) > batch_size * ranks.world,
                              seed=seed, rank=ranks.rank, world_size=ranks.world)

    def statistics(self, ranks: Ranks = Ranks()) -> tuple[torch.Tensor, torch.Tensor]:
        return channel_stats(self.x)


class StreamedPool:
    """The pool streamed from the store (``PoolLoader``: the same samples, numbered the same
    way); ``kept``: folds held in memory beside it (the kNN monitor's), or None, and then
    ``not_kept`` says why when they were asked for."""

    def __init__(self, foldsets: list[FoldSet], frames: int, device: str | torch.device,
                 kept: InMemoryData | None = None, not_kept: str | None = None):
        self.foldsets, self.frames, self.device = foldsets, frames, device
        self.kept, self.not_kept = kept, not_kept
        self.n = sum(pool_sizes(foldsets, frames))

    def __len__(self) -> int:
        return self.n

    def loader(self, batch_size: int, seed: int = 0, ranks: Ranks = Ranks()) -> PoolLoader:
        """Shuffled batches, every sample once per epoch (no drop_last: the tail batches are
        short instead)."""
        return PoolLoader(self.foldsets, self.frames, batch_size, shuffle=True, seed=seed, rank=ranks.rank,
                          world_size=ranks.world, device=self.device)

    def statistics(self, ranks: Ranks = Ranks()) -> tuple[torch.Tensor, torch.Tensor]:
        return pool_channel_stats(self.foldsets, self.frames, device=self.device, ranks=ranks)
