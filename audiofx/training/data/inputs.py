"""The one door from the store to the model: what a stage reads, in memory or streamed.

Every stage calls ``open_inputs`` with the folds it reads (of one feature set, or of several
for pretraining's pool), the memory budget, the device and the ranks. It chooses the data
mode by the one rule (``mode.choose_mode``: in memory when the folds' raw size fits the
budget, else streaming; a resume without --memory-budget keeps the mode its run recorded)
and returns ``Inputs``, which reads nothing until a stage asks for:

- ``folds(names)``: the usable clips of some folds, to train on or to pass over in order:
  rows of the set loaded once (``InMemoryData``), or ``StreamedFolds``. Both give
  ``loader(...)`` (shuffled batches, this rank's share), ``statistics(ranks)`` (per-channel
  mean and std, equal in both modes) and ``in_order(batch)``, and ``y``, ``clips``,
  ``fold_of`` and ``len``.
- ``resident(names)``: some folds in memory whatever the mode (a test fold, a validation
  split: each a fraction of the set).
- ``pool(frames, keep)``: the pretraining pool (pretrain_pool.py), ``ResidentPool`` or
  ``StreamedPool``: ``loader(batch, seed, ranks)``, ``statistics(ranks)``, ``len``, and
  ``kept``, a set held in memory beside it (the kNN monitor's).

So the stages hold no in-memory/streaming branches of their own; each prints ``describe()``
in its first line: the mode, the size and why.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from audiofx.errors import ConfigError
from audiofx.training.data.batches import Batch
from audiofx.training.data.featuresets import FoldSet
from audiofx.training.data.memory import InMemoryData, load_in_memory, subset
from audiofx.training.data.mode import DataMode, budget_bytes, choose_mode, gigabytes
from audiofx.training.data.pretrain_pool import ResidentPool, StreamedPool
from audiofx.training.data.statistics import streaming_channel_stats
from audiofx.training.data.streaming import StreamingLoader
from audiofx.training.runtime.distributed import Ranks


class StreamedFolds:
    """Folds that stay in the store: every pass streams them (``StreamingLoader``). The small
    arrays (labels, clip names) are read once, when first asked for."""

    def __init__(self, foldset: FoldSet, device: str | torch.device = "cpu"):
        self.foldset = foldset
        self.device = torch.device(device)
        self._index: StreamingLoader | None = None

    def loader(self, batch_size: int, *, shuffle: bool = True, drop_last: bool = False, seed: int = 0,
               ranks: Ranks = Ranks()) -> StreamingLoader:
        """Shuffled batches streamed from the store, this rank's share of each epoch."""
        return StreamingLoader(self.foldset, batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                               rank=ranks.rank, world_size=ranks.world, device=self.device)

    def statistics(self, ranks: Ranks = Ranks()) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, std) from one sequential pass (under torchrun each rank reads a share)."""
        return streaming_channel_stats(self.foldset, device=self.device, ranks=ranks)

    def in_order(self, batch: int) -> Iterator[Batch]:
        """Every row once, in order (one unshuffled pass), ``batch`` rows at a time."""
        return iter(StreamingLoader(self.foldset, batch, shuffle=False, device=self.device))

    @property
    def index(self) -> StreamingLoader:
        """A loader never iterated: what it read of the small arrays numbers the rows."""
        if self._index is None:
            self._index = StreamingLoader(self.foldset, 1, shuffle=False, device=self.device)
        return self._index

    def __len__(self) -> int:
        return self.index.n

    @property
    def y(self) -> torch.Tensor:
        return self.index.labels().to(self.device)

    @property
    def clips(self) -> list[str]:
        return list(self.index.clips)

    @property
    def fold_of(self) -> list[str]:
        return list(self.index.fold_of)


class Inputs:
    """What a stage reads (see the module docstring); made by ``open_inputs``."""

    def __init__(self, foldsets: list[FoldSet], mode: DataMode, device: str | torch.device):
        self.foldsets = foldsets
        self.mode = mode
        self.device = torch.device(device)
        self._loaded: InMemoryData | None = None

    @property
    def streaming(self) -> bool:
        return self.mode.streaming

    def describe(self) -> str:
        return self.mode.describe()

    def _the_set(self) -> FoldSet:
        """The one feature set that ``folds`` and ``resident`` take folds of."""
        if len(self.foldsets) != 1:
            raise ValueError(f"folds of one feature set were asked for, but {len(self.foldsets)} are open")
        return self.foldsets[0]

    def _loaded_rows(self, names: list[str]) -> InMemoryData:
        """Rows of the set loaded once (a view where they are one run of rows, else a copy)."""
        if self._loaded is None:
            self._loaded = load_in_memory(self._the_set(), device=self.device)
        data = self._loaded
        return subset(data, torch.from_numpy(np.isin(np.array(data.fold_of), list(names))))

    def _foldset_of(self, names: list[str]) -> FoldSet:
        """These folds of the set, in the set's order (the order of the rows in memory)."""
        whole = self._the_set()
        unknown = [f for f in names if f not in whole.folds]
        if unknown:
            raise ValueError(f"fold {unknown[0]} is not among the open folds {whole.folds}")
        return FoldSet(whole.store, whole.dataset, whole.key, [f for f in whole.folds if f in names])

    def folds(self, names: list[str]) -> InMemoryData | StreamedFolds:
        """The usable clips of these folds, in the set's fold order whatever the mode."""
        foldset = self._foldset_of(names)
        return StreamedFolds(foldset, self.device) if self.streaming else self._loaded_rows(foldset.folds)

    def resident(self, names: list[str]) -> InMemoryData:
        """These folds in memory whatever the mode: read from the store now when streaming."""
        foldset = self._foldset_of(names)
        return load_in_memory(foldset, device=self.device) if self.streaming else self._loaded_rows(foldset.folds)

    def pool(self, frames: int, keep: FoldSet | None = None) -> ResidentPool | StreamedPool:
        """Every set's clips cut into samples of ``frames``; ``keep``: folds of one of the sets
        to hold in memory beside it (``pool.kept``: in memory, that whole set as loaded;
        streaming, those folds, or None when they alone are over the budget, and then
        ``pool.not_kept`` says so)."""
        if not self.streaming:
            at = [fs.dataset for fs in self.foldsets].index(keep.dataset) if keep is not None else None
            return ResidentPool(self.foldsets, frames, self.device, keep=at)
        kept, not_kept = None, None
        if keep is not None:
            size = keep.raw_bytes()
            if size > self.mode.budget:
                not_kept = (f"{keep.dataset}'s folds for it take {size / 1e9:.2f} GB, over the memory budget of "
                            f"{self.mode.budget / 1e9:.2f} GB")
            else:
                kept = load_in_memory(keep, device=self.device)
        return StreamedPool(self.foldsets, frames, self.device, kept=kept, not_kept=not_kept)

    def release(self) -> None:
        """Let go of the set loaded in memory (a stage that only needed one pass over it)."""
        self._loaded = None


def open_inputs(foldsets: list[FoldSet], memory_budget_gb: float | None = None, device: str | torch.device = "cpu",
                *, ranks: Ranks = Ranks(), recorded: dict[str, Any] | None = None,
                manifests: list[dict[str, Any]] | None = None, needs_memory: str | None = None) -> Inputs:
    """Inputs over ``foldsets`` in the mode the rule picks (see the module docstring).

    ``recorded``: the config.json of the run a --resume continues; ``manifests``: the sets'
    manifests when the caller has just read them; ``needs_memory``: an option that works only
    in memory (Zhou et al.'s fragments cut and copy the training set): refused in one line
    when the folds are over the budget."""
    manifests = manifests or [fs.manifest() for fs in foldsets]
    size = sum(fs.raw_bytes(m) for fs, m in zip(foldsets, manifests))
    mode = choose_mode(size, budget_bytes(memory_budget_gb), device, recorded=recorded, ranks=ranks)
    if mode.streaming and needs_memory:
        raise ConfigError(f"{needs_memory} needs the training folds in memory, but their features "
                          f"({gigabytes(mode.size)}) are over the memory budget of {gigabytes(mode.budget)}",
                          f"raise --memory-budget to at least {mode.size / 1e9:.3g} (GB) if the memory is there, "
                          f"or drop {needs_memory}")
    return Inputs(foldsets, mode, device)
