"""Folds streamed from the store, for sets larger than the memory budget.

Background threads read runs of ``run_chunks`` consecutive chunks in a shuffled run order
(long sequential reads, never random per-clip ones: those measured ~60x slower than a raw
memmap, docs/benchmarks.md); a shuffle buffer of ``buffer_chunks`` chunks mixes samples
across runs. Samples are numbered as in memory (fold order, then row order, skipped clips
left out), so the two loaders' batches can be compared.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from audiofx.pipeline.reading import FoldReader, open_fold_reader
from audiofx.pipeline.store import manifest_chunk_clips
from audiofx.training.data.batches import Batch, batch_labels, check_batching, rank_span, seeded_generator, torch_labels
from audiofx.training.data.featuresets import FoldSet


@dataclass(frozen=True, eq=False)
class _Run:
    """``run_chunks`` consecutive chunks of one fold: the unit of reading and of sharing out."""

    fold: int  # position in FoldSet.folds
    rows: np.ndarray  # usable row numbers within the fold, ascending
    first: int  # global index of rows[0]


@dataclass(frozen=True, eq=False)
class _Piece:
    """A contiguous part [lo, hi) of a run's usable rows, as one rank reads it."""

    run: _Run
    lo: int
    hi: int

    @property
    def read_range(self) -> tuple[int, int]:
        return int(self.run.rows[self.lo]), int(self.run.rows[self.hi - 1]) + 1

    def keep(self) -> np.ndarray:
        a, _ = self.read_range
        return self.run.rows[self.lo:self.hi] - a


class _Pool:
    """The shuffle buffer. Rows stay in the arrays the readers filled; the buffer holds only
    (array, row, global index) as integers, so shuffling it and dropping what went out
    moves no feature bytes. A row is copied once, when its batch is built (and cast to
    float32 on the way). An array is let go when none of its rows is left."""

    def __init__(self) -> None:
        self.arrays: dict[int, torch.Tensor] = {}
        self.count = 0
        self.src = np.empty(0, np.int64)
        self.row = np.empty(0, np.int64)
        self.index = np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def add(self, x: np.ndarray, rows: np.ndarray, index: np.ndarray) -> None:
        self.arrays[self.count] = torch.from_numpy(x)
        self.src = np.concatenate([self.src, np.full(len(rows), self.count, np.int64)])
        self.row = np.concatenate([self.row, rows.astype(np.int64)])
        self.index = np.concatenate([self.index, index])
        self.count += 1

    def permute(self, perm: np.ndarray) -> None:
        self.src, self.row, self.index = self.src[perm], self.row[perm], self.index[perm]

    def take(self, start: int, stop: int) -> tuple[list[tuple[torch.Tensor, int]], np.ndarray]:
        """Rows [start, stop) of the buffer as ((array, row) list, global indices): holds the
        arrays, so a batch can be assembled after the buffer has dropped them."""
        arrays = self.arrays
        rows = [(arrays[s], r) for s, r in zip(self.src[start:stop].tolist(), self.row[start:stop].tolist())]
        return rows, self.index[start:stop].copy()

    def drop(self, n: int) -> None:
        """Forget the first n rows, and every array none of the others is in."""
        self.src, self.row, self.index = self.src[n:], self.row[n:], self.index[n:]
        live = set(np.unique(self.src).tolist())
        for s in [s for s in self.arrays if s not in live]:
            del self.arrays[s]


class StreamingLoader:
    """Batches streamed from the store, for sets larger than memory.

    Per epoch: the runs (``run_chunks`` consecutive chunks of one fold) are put in a seeded
    random order; the usable samples, taken run after run in that order, are cut into
    ``world_size`` contiguous equal spans (padded by wrapping, like DistributedSampler), one
    per rank, so a rank reads its own runs (only the two runs at its span's ends are split,
    by rows, with the neighbouring ranks). ``exact_shares``: no padding, every sample on
    exactly one rank (shares may differ by one sample): for a pass whose results are summed
    over the ranks, such as the input statistics; training needs the equal shares, as every
    rank must take the same number of steps. ``threads`` background threads read the rank's
    pieces sequentially from the store, at most ``prefetch`` pieces ahead, and the pieces are
    consumed in order so the result never depends on thread timing. A shuffle buffer of
    ``buffer_chunks`` chunks (at least two batches) mixes samples across runs: whenever it is
    full it is permuted and all but half of it goes out as batches.

    Where the time goes and what was done about it (docs/benchmarks.md, "Training input"):
    reader threads decode whole chunks straight into their arrays (``FoldReader.read``), the
    shuffle buffer moves integers, not rows (``_Pool``), and each batch row is copied and
    cast to float32 once, in the consuming thread.

    Each reading thread opens a fold's values on first use; the loader itself holds only
    plain values (no open arrays), so it can be pickled.
    """

    def __init__(self, foldset: FoldSet, batch_size: int, shuffle: bool = True, seed: int = 0,
                 buffer_chunks: int = 8, run_chunks: int = 4, threads: int = 2, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", drop_last: bool = False,
                 prefetch: int | None = None, exact_shares: bool = False):
        check_batching(batch_size, rank, world_size)
        if run_chunks < 1 or threads < 1 or buffer_chunks < 0:
            raise ValueError("run_chunks and threads must be >= 1, buffer_chunks >= 0")
        self.foldset = foldset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_chunks = buffer_chunks
        self.run_chunks = run_chunks
        self.threads = threads
        self.prefetch = prefetch or 2 * threads
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.drop_last = drop_last
        self.exact_shares = exact_shares
        self.epoch = 0

        fs = foldset.feature_store()
        manifest = fs.read_manifest(foldset.dataset, foldset.key)
        self.shape = tuple(int(s) for s in manifest["shape"])
        self.multilabel = bool(manifest.get("multilabel"))
        self.classes = list(manifest.get("classes", []))
        self.chunk_clips = manifest_chunk_clips(manifest)
        # The small arrays (ok, y, clip) are read here once; threads read only x.
        self._readers = [open_fold_reader(fs, foldset.dataset, foldset.key, fold, manifest) for fold in foldset.folds]
        self.runs: list[_Run] = []
        ys, self.clips, self.fold_of = [], [], []
        first = 0
        for f, (fold, reader) in enumerate(zip(foldset.folds, self._readers)):
            ok = reader.ok
            ys.append(reader.y[ok])
            self.clips += [str(c) for c in reader.clip[ok]]
            self.fold_of += [fold] * int(ok.sum())
            step = self.chunk_clips * run_chunks
            for a in range(0, len(ok), step):
                rows = a + np.flatnonzero(ok[a:a + step])
                if len(rows):
                    self.runs.append(_Run(f, rows, first))
                    first += len(rows)
        self.n = first
        self._y = np.ascontiguousarray(np.concatenate(ys) if ys else np.zeros(0),
                                      dtype=bool if self.multilabel else np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def labels(self) -> torch.Tensor:
        """Every usable clip's label in global index order, as ``load_in_memory`` gives them:
        int64 (N,), or bool (N, n_classes) for multi-label sets (batches carry them as float)."""
        return torch_labels(self._y, self.multilabel)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return self._span()[2]

    @property
    def buffer_capacity(self) -> int:
        return max(self.buffer_chunks * self.chunk_clips, 2 * self.batch_size)

    def _span(self) -> tuple[int, int, int]:
        return rank_span(self.rank, self.world_size, self.n, self.drop_last, self.exact_shares)

    # -- planning ----------------------------------------------------------------------------
    def plan(self, epoch: int) -> list[_Piece]:
        """The pieces this rank reads in an epoch, in order."""
        runs = self.runs
        if self.shuffle and runs:
            order = torch.randperm(len(runs), generator=seeded_generator(self.seed, epoch)).tolist()
            runs = [runs[i] for i in order]
        if not runs:
            return []
        starts = np.cumsum([0] + [len(r.rows) for r in runs]).tolist()  # usable offsets of runs
        start, stop, _ = self._span()
        pieces = []
        pos = start
        while pos < stop:  # positions past n wrap around to the start of the sequence
            q = pos % self.n
            length = min(stop - pos, self.n - q)
            seg_lo, seg_hi = q, q + length
            i = bisect_right(starts, seg_lo) - 1
            while seg_lo < seg_hi:
                run_lo = seg_lo - starts[i]
                run_hi = min(seg_hi, starts[i + 1]) - starts[i]
                pieces.append(_Piece(runs[i], run_lo, run_hi))
                seg_lo = starts[i] + run_hi
                i += 1
            pos += length
        return pieces

    # -- reading (background threads) --------------------------------------------------------
    def _reader(self, fold: int) -> FoldReader:
        return self._readers[fold]

    def _read(self, piece: _Piece) -> np.ndarray:
        return self._reader(piece.run.fold).read(*piece.read_range)

    def _pieces(self, pieces: list[_Piece], workers: ThreadPoolExecutor
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(x float16 rows read, usable rows among them, their global indices) per piece, in
        order, read at most ``prefetch`` pieces ahead by ``workers``."""
        pending: deque[tuple[_Piece, Future]] = deque()
        todo = iter(pieces)
        try:
            for p in todo:
                pending.append((p, workers.submit(self._read, p)))
                if len(pending) >= self.prefetch:
                    break
            while pending:
                p, fut = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt, workers.submit(self._read, nxt)))
                yield fut.result(), p.keep(), np.arange(p.run.first + p.lo, p.run.first + p.hi, dtype=np.int64)
        finally:
            for _, fut in pending:
                fut.cancel()

    # -- batches -----------------------------------------------------------------------------
    def _batch_rows(self, epoch: int, workers: ThreadPoolExecutor
                    ) -> Iterator[tuple[list[tuple[torch.Tensor, int]], np.ndarray]]:
        """Which rows make each batch of the epoch, in order: ((array, row) list, indices)."""
        bs = self.batch_size
        g = seeded_generator(self.seed, epoch, self.rank, 1)
        cap = self.buffer_capacity if self.shuffle else 0
        pool = _Pool()
        emitted = 0
        limit = len(self)
        for x, keep, idx in self._pieces(self.plan(epoch), workers):
            pool.add(x, keep, idx)
            if self.shuffle:
                if len(pool) < cap:
                    continue
                pool.permute(torch.randperm(len(pool), generator=g).numpy())
                n_out = (len(pool) - cap // 2) // bs * bs
            else:
                n_out = len(pool) // bs * bs
            for s in range(0, n_out, bs):
                yield pool.take(s, s + bs)
                emitted += 1
            pool.drop(n_out)
        if self.shuffle and len(pool):
            pool.permute(torch.randperm(len(pool), generator=g).numpy())
        for s in range(0, len(pool), bs):
            if emitted >= limit:  # drop_last: the short tail batch
                break
            yield pool.take(s, min(s + bs, len(pool)))
            emitted += 1

    def _assemble(self, rows: list[tuple[torch.Tensor, int]], index: np.ndarray) -> Batch:
        """A batch on the CPU (in a worker thread): each row copied once, float16 -> float32
        on the way (for CUDA: kept float16 in pinned memory, half the bytes over the bus)."""
        cuda = self.device.type == "cuda"
        x = torch.empty((len(rows),) + self.shape, dtype=torch.float16 if cuda else torch.float32, pin_memory=cuda)
        for j, (src, r) in enumerate(rows):
            x[j].copy_(src[r])
        return Batch(x, torch.from_numpy(self._y[index]), torch.from_numpy(index))

    def _to_device(self, b: Batch) -> Batch:
        if self.device.type != "cuda":
            return Batch(b.x, batch_labels(b.y), b.index)
        dev = self.device
        y, index = (t.pin_memory().to(dev, non_blocking=True) for t in (b.y, b.index))
        return Batch(b.x.to(dev, non_blocking=True).float(), batch_labels(y), index)

    def __iter__(self) -> Iterator[Batch]:
        # One thread pool reads pieces and assembles batches (copy + cast), at most
        # ``prefetch`` of each ahead; this thread only plans and hands batches out, so the
        # copies run in parallel with decoding and with whatever consumes the batches.
        epoch = self.epoch
        self.epoch += 1
        workers = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="audiofx-stream")
        plan = self._batch_rows(epoch, workers)
        ready: deque[Future] = deque()
        try:
            for rows, index in plan:
                ready.append(workers.submit(self._assemble, rows, index))
                if len(ready) > self.prefetch:
                    yield self._to_device(ready.popleft().result())
            while ready:
                yield self._to_device(ready.popleft().result())
        finally:
            plan.close()
            for fut in ready:
                fut.cancel()
            workers.shutdown(wait=True, cancel_futures=True)
