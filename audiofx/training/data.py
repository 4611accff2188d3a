"""Store -> model: feature batches for training, without random per-clip Zarr reads.

Random per-clip reads from a Zarr store were measured ~60x slower than a raw memmap
(docs/benchmarks.md; 5-13x in the first measurements the issue quotes): each one
decompresses a whole chunk (8 clips for ESC-50) to use one clip. So training is never
fed that way. There are two paths, both reading the store in long sequential runs of whole
chunks:

- ``load_in_memory`` + ``InMemoryLoader``: read every chosen fold once, keep the float16
  values in RAM (or on the GPU), then draw shuffled batches by indexing a tensor. No
  DataLoader workers: indexing a resident tensor is faster than any worker could be.
- ``StreamingLoader``: for sets larger than memory. Background threads read runs of
  ``run_chunks`` consecutive chunks in a shuffled run order; a shuffle buffer of
  ``buffer_chunks`` chunks mixes samples across runs.

Both read whole chunks with ``_ChunkReader``: for the store's own layout it decodes the chunk
files itself, in reader threads, straight into the destination arrays: ~0.6 ms less CPU
per 1.5 MB chunk than zarr's general read path, 40% of the cost of reading a chunk with the
store's codec (docs/benchmarks.md, "Training input").

``choose_mode`` picks between them from the raw size in the manifest and a memory budget
(``make_loader`` builds the loader it picks); ``streaming_channel_stats`` gives a streamed
set the per-channel statistics an in-memory one gets from ``finetune.channel_stats``.

Sample identity: ``index`` is the global position of a usable clip over the loaded folds,
in fold order then row order, skipped clips (``ok`` False) left out: 0..N-1. Both loaders
number samples the same way, so their batches can be compared.

Shuffling is repeatable: every permutation comes from a ``torch.Generator`` seeded from
(seed, epoch[, rank]). With ``world_size`` > 1 each rank gets a disjoint share of equal
length, padded by wrapping around like ``torch.utils.data.DistributedSampler``, so every
rank runs the same number of batches.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from numcodecs import blosc

from audiofx.errors import StoreError
from audiofx.pipeline.store import FeatureStore, chunk_clips
from audiofx.training.distributed import Ranks

# How much raw data one read asks for when loading a fold into memory: many whole chunks,
# few enough bytes that the reading threads share the work evenly to the end and that the
# extra peak memory (one run per thread, when a run must be copied) stays small.
LOAD_RUN_BYTES = 16 * 2**20

MODE_MEMORY = "memory"
MODE_STREAMING = "streaming"


# -- what to load ----------------------------------------------------------------------------

@dataclass
class FoldSet:
    """Which folds of which feature set to load. Plain, picklable values only."""

    store: str
    dataset: str
    key: str
    folds: list[str]

    def feature_store(self) -> FeatureStore:
        return FeatureStore(self.store)

    def manifest(self) -> dict[str, Any]:
        return self.feature_store().read_manifest(self.dataset, self.key)

    def raw_bytes(self, manifest: dict[str, Any] | None = None) -> int:
        """Bytes of the folds' x values as stored (float16): clips * prod(shape) * itemsize."""
        m = manifest or self.manifest()
        itemsize = np.dtype(m.get("feature_config", {}).get("dtype", "float16")).itemsize
        clips = sum(int(m["folds"][f]["clips"]) for f in self.folds)
        return clips * int(np.prod(m["shape"])) * itemsize


def open_foldset(store: str, dataset: str, key: str, folds: list[str] | str | None = None) -> FoldSet:
    """A FoldSet whose store is complete (has a manifest) and whose folds exist.

    ``folds`` may be one name, a list, or None for every fold. Raises StoreError otherwise.
    """
    fs = FeatureStore(store)
    manifest = fs.read_manifest(dataset, key)  # StoreError when the extraction did not finish
    known = list(manifest["folds"])
    if folds is None:
        names = known
    else:
        names = [str(f) for f in ([folds] if isinstance(folds, (str, int)) else folds)]
    if not names:
        raise StoreError(f"no folds chosen from {dataset}/{key}", f"known folds: {', '.join(known)}")
    unknown = [f for f in names if f not in manifest["folds"]]
    if unknown:
        raise StoreError(f"{dataset}/{key} has no fold {', '.join(map(repr, unknown))}",
                         f"known folds: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise StoreError(f"fold listed twice in {names}", "list each fold once")
    return FoldSet(str(store), dataset, key, names)


def _manifest_chunk_clips(manifest: dict[str, Any]) -> int:
    if manifest.get("chunk_clips"):
        return int(manifest["chunk_clips"])
    from audiofx.config import FeatureConfig

    return chunk_clips(FeatureConfig.from_dict(manifest["feature_config"]))


def _torch_labels(y: np.ndarray, multilabel: bool) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(y, dtype=bool if multilabel else np.int64))


def _batch_labels(y: torch.Tensor) -> torch.Tensor:
    """Labels as a model wants them: int64 class indices, or float32 multi-hot."""
    return y.float() if y.dtype == torch.bool else y


def _mix_seed(*parts: int) -> int:
    """A 63-bit torch seed from several integers, well mixed (seed 0 epoch 1 != seed 1 epoch 0)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def _generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(_mix_seed(*parts))
    return g


def _rank_span(rank: int, world_size: int, n: int, drop_last: bool, exact: bool = False) -> tuple[int, int, int]:
    """(start, stop, per_rank) of a rank's share of n samples, DistributedSampler-style:
    per_rank = ceil(n / ws) (positions past n wrap around) or floor(n / ws) with drop_last.
    ``exact``: every sample on exactly one rank, shares differing by at most one."""
    if exact:
        start, stop = rank * n // world_size, (rank + 1) * n // world_size
        return start, stop, stop - start
    per_rank = n // world_size if drop_last else -(-n // world_size)
    return rank * per_rank, (rank + 1) * per_rank, per_rank


def _check_common(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


@dataclass
class Batch:
    """One batch: x float32 (B, C, bins, T) on the device; y int64 (B,) or float32 multi-hot
    (B, n_classes); index int64 (B,) global sample indices."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])


# -- reading chunks --------------------------------------------------------------------------

def _direct_layout(arr: zarr.Array) -> Path | None:
    """The directory of ``arr``'s chunk files when _ChunkReader can read them itself, else None.

    That is the layout the store writes: a local directory, zarr v3 without storage
    transformers, chunks that split the first axis only, and codecs ``bytes`` (native byte
    order) then at most one Blosc (which records its own codec in each chunk's header). No
    sharding, no transpose, no checksum codec: those go through zarr.
    """
    from zarr.codecs import BloscCodec, BytesCodec
    from zarr.core.chunk_grids import RegularChunkGrid
    from zarr.storage import LocalStore

    md = arr.metadata
    if getattr(md, "zarr_format", None) != 3 or md.storage_transformers or not isinstance(arr.store, LocalStore):
        return None
    codecs = list(md.codecs)
    if not codecs or not isinstance(codecs[0], BytesCodec) or np.dtype(arr.dtype).kind not in "fiub":
        return None
    endian = codecs[0].endian
    if endian is not None and endian.value != sys.byteorder and np.dtype(arr.dtype).itemsize > 1:
        return None
    if len(codecs) > 2 or (len(codecs) == 2 and not isinstance(codecs[1], BloscCodec)):
        return None
    grid = md.chunk_grid
    if not isinstance(grid, RegularChunkGrid) or tuple(grid.chunk_shape[1:]) != tuple(arr.shape[1:]):
        return None
    return Path(arr.store.root) / arr.path


def _read_into(f: Any, view: memoryview) -> int:
    """Fill ``view`` from the file ``f``; the number of bytes read (less only at end of file)."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class _ChunkReader:
    """Rows [a, b) of one fold's x array, read whole chunk by whole chunk. One per reading
    thread and fold (it keeps buffers of its own).

    Why not ``zarr.Array.__getitem__``: here zarr's read path cost ~0.55 ms of CPU per 1.5 MB
    chunk on top of the file read and the decompression (every thread's call goes through
    zarr's one asyncio event loop, each chunk takes a thread hop per codec, is decoded into a
    new buffer and copied into the output): as much as decoding the chunk itself with the
    store's codec, on two cores that also run the training (benchmarks/loader.py prints both).
    For the layout the store writes (see ``_direct_layout``) this reader opens each chunk
    file, reads it into a reused buffer and lets numcodecs' Blosc decompress it straight into
    the destination rows (Blosc releases the GIL there, so reading threads decode in
    parallel). Anything else is read through zarr. Values are identical either way (tests
    compare them).
    """

    def __init__(self, store: Any, path: str):
        self.array = zarr.open_array(store, path=path, mode="r")
        self.length = int(self.array.shape[0])
        self.rows = int(self.array.chunks[0])
        self.row_shape = tuple(int(s) for s in self.array.shape[1:])
        self.dtype = np.dtype(self.array.dtype)
        self.chunk_bytes = self.rows * int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.directory = _direct_layout(self.array)
        self.compressed = len(self.array.metadata.codecs) == 2 if self.directory is not None else False
        self._raw = bytearray()  # one compressed chunk, reused
        self._scratch: np.ndarray | None = None  # one decoded chunk, for chunks read in part

    def read(self, a: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [a, b), into ``out`` (C-contiguous, b - a rows) when given."""
        if out is not None and not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous: chunks are decoded into its memory")
        if self.directory is None:
            block = np.asarray(self.array[a:b])
            if out is None:
                return block
            out[...] = block
            return out
        if out is None:
            out = np.empty((b - a,) + self.row_shape, self.dtype)
        m = self.rows
        for c in range(a // m, (b - 1) // m + 1):
            lo = c * m
            s, e = max(lo, a), min(lo + m, b, self.length)
            if s == lo and e == lo + m:  # the whole chunk is wanted: decode it in place
                self._chunk(c, out[s - a:e - a])
            else:  # part of it (a piece split between ranks, or a fold's short last chunk)
                if self._scratch is None:
                    self._scratch = np.empty((m,) + self.row_shape, self.dtype)
                self._chunk(c, self._scratch)
                out[s - a:e - a] = self._scratch[s - lo:e - lo]
        return out

    def _chunk(self, c: int, dest: np.ndarray) -> None:
        """Decode chunk ``c`` into ``dest`` (``rows`` contiguous rows)."""
        key = self.array.metadata.encode_chunk_key((c,) + (0,) * len(self.row_shape))
        path = self.directory / key
        target = memoryview(dest.reshape(-1).view(np.uint8))
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if not self.compressed:
                    if size != self.chunk_bytes or _read_into(f, target) != size:
                        raise self._damaged(path, f"{size} bytes, expected {self.chunk_bytes}")
                    return
                if len(self._raw) < size:
                    self._raw = bytearray(size)
                raw = memoryview(self._raw)[:size]
                got = _read_into(f, raw)
        except FileNotFoundError:  # zarr writes no chunk that holds only the fill value
            dest[...] = self.array.fill_value
            return
        # Blosc 1 header: version, versionlz, flags, typesize (1 byte each), then nbytes,
        # blocksize, cbytes (uint32 little-endian). Blosc trusts cbytes, so check it here.
        nbytes = int.from_bytes(raw[4:8], "little") if got >= 16 else -1
        cbytes = int.from_bytes(raw[12:16], "little") if got >= 16 else -1
        if got != size or nbytes != self.chunk_bytes or cbytes != size:
            raise self._damaged(path, f"Blosc header says {nbytes} bytes in {cbytes}, file holds {got}")
        blosc.decompress(raw, target)

    def _damaged(self, path: Path, why: str) -> StoreError:
        return StoreError(f"damaged chunk {path}: {why}", "run audiofx cache verify, then re-extract")


class _Readers:
    """One _ChunkReader per thread and fold, opened on first use. Holds only the (store,
    path) of each fold's x when pickled: open arrays never cross a process boundary."""

    def __init__(self, sources: list[tuple[Any, str]]):
        self.sources = sources
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {"sources": self.sources}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.sources = state["sources"]
        self._local = threading.local()

    def get(self, fold: int) -> _ChunkReader:
        readers = self._local.__dict__.setdefault("readers", {})
        if fold not in readers:
            readers[fold] = _ChunkReader(*self.sources[fold])
        return readers[fold]


def _x_source(group: zarr.Group) -> tuple[Any, str]:
    """Where reading threads open a fold group's x: for a remote store, the local read-through
    cache that open_fold has just filled, so no thread goes back to the remote."""
    return group.store, f"{group.path}/x".lstrip("/")


# -- in memory -------------------------------------------------------------------------------

@dataclass
class InMemoryData:
    """The usable clips of a FoldSet, resident on one device."""

    x: torch.Tensor  # (N, C, bins, T) float16
    y: torch.Tensor  # (N,) int64, or (N, n_classes) bool for multi-label sets
    index: torch.Tensor  # (N,) int64: 0..N-1
    clips: list[str]
    fold_of: list[str]
    classes: list[str] = field(default_factory=list)
    multilabel: bool = False
    foldset: FoldSet | None = None
    seconds: float = 0.0  # time load_in_memory took

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def load_in_memory(foldset: FoldSet, device: str | torch.device = "cpu", run_bytes: int = LOAD_RUN_BYTES,
                   threads: int | None = None) -> InMemoryData:
    """Read every fold of ``foldset`` once, in runs of whole chunks of about ``run_bytes``
    decoded by ``threads`` threads (default: one per core, at most 4), drop skipped rows, and
    keep the values (float16) on ``device``.

    The destination tensor is allocated on the device at its final size. On the CPU, a run
    whose rows are all usable is decoded straight into it (``_ChunkReader``: no second copy);
    otherwise (skipped rows, or a GPU) a run is read and then copied, so the peak extra memory
    is one run per thread, never a second copy of the set. Measured with the benchmark's
    3000-clip store: 0.4 s where reading through zarr took 0.7-1.3 s.
    """
    started = time.perf_counter()
    fs = foldset.feature_store()
    manifest = fs.read_manifest(foldset.dataset, foldset.key)
    shape = tuple(int(s) for s in manifest["shape"])
    folds = []
    for fold in foldset.folds:
        g = fs.open_fold(foldset.dataset, foldset.key, fold, manifest)
        ok = np.asarray(g["ok"][:], dtype=bool)
        folds.append((fold, g, ok))
    n = sum(int(ok.sum()) for _, _, ok in folds)
    dtype = np.dtype(folds[0][1]["x"].dtype) if folds else np.dtype(np.float16)
    x = torch.empty((n,) + shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype, device=device)
    host = x.numpy() if x.device.type == "cpu" else None  # numpy copies: no OpenMP region
    # Runs of whole chunks: a multiple of the chunk length, aligned to chunk boundaries.
    jobs = []  # (fold position, first row, stop row, usable mask, destination row)
    clips: list[str] = []
    fold_of: list[str] = []
    ys = []
    pos = 0
    for f, (fold, g, ok) in enumerate(folds):
        chunk = int(g["x"].chunks[0])
        step = max(1, run_bytes // (chunk * int(np.prod(shape)) * dtype.itemsize)) * chunk
        for a in range(0, len(ok), step):
            b = min(a + step, len(ok))
            keep = ok[a:b]
            if keep.any():
                jobs.append((f, a, b, keep, pos))
                pos += int(keep.sum())
        ys.append(np.asarray(g["y"][:])[ok])
        clips += [str(c) for c in np.asarray(g["clip"][:])[ok]]
        fold_of += [fold] * int(ok.sum())
    assert pos == n, (pos, n)
    readers = _Readers([_x_source(g) for _, g, _ in folds])

    def load(job: tuple[int, int, int, np.ndarray, int]) -> None:
        f, a, b, keep, at = job
        k = int(keep.sum())
        if host is not None and k == b - a:
            readers.get(f).read(a, b, out=host[at:at + k])
            return
        block = readers.get(f).read(a, b)
        rows = block if k == b - a else block[keep]
        if host is not None:
            host[at:at + k] = rows
        else:
            x[at:at + k].copy_(torch.from_numpy(np.ascontiguousarray(rows)))

    with ThreadPoolExecutor(max_workers=threads or min(4, os.cpu_count() or 1),
                            thread_name_prefix="audiofx-load") as pool:
        for _ in pool.map(load, jobs):  # in order, so the first error is raised here
            pass
    multilabel = bool(manifest.get("multilabel"))
    y = _torch_labels(np.concatenate(ys) if ys else np.zeros(0), multilabel).to(device)
    return InMemoryData(
        x=x, y=y, index=torch.arange(n, dtype=torch.int64, device=device), clips=clips, fold_of=fold_of,
        classes=list(manifest.get("classes", [])), multilabel=multilabel, foldset=foldset,
        seconds=time.perf_counter() - started,
    )


class InMemoryLoader:
    """Shuffled batches from resident data. Each ``iter()`` is one epoch; the epoch number
    starts at 0 and advances by one per ``iter()`` unless ``set_epoch`` sets it.

    The order is ``torch.randperm`` from a generator seeded by (seed, epoch): the same seed
    and epoch give the same batches on every run and every rank. With ``world_size`` > 1,
    rank r takes positions r, r + ws, ... of the permutation, padded by wrapping to
    ceil(N / ws) samples (``drop_last``: cut to floor(N / ws), and the last short batch is
    dropped too).
    """

    def __init__(self, data: InMemoryData, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        _check_common(batch_size, rank, world_size)
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return _rank_span(self.rank, self.world_size, len(self.data), self.drop_last)[2]

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's sample positions for an epoch (CPU int64)."""
        n = len(self.data)
        perm = torch.randperm(n, generator=_generator(self.seed, epoch)) if self.shuffle else torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:  # pad by wrapping around, as DistributedSampler does
            perm = torch.cat([perm] * math.ceil(total / n))[:total] if n else perm
        else:
            perm = perm[:total]
        return perm[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        self.epoch += 1
        d = self.data
        order = self.order(epoch)
        bs = self.batch_size
        if d.device.type == "cpu":
            # Gather and cast in one pass per row, straight into the float32 batch: measured
            # ~30% faster (one torch thread) than gathering the float16 rows first and casting
            # the copy, which writes and reads the batch once more.
            ys, ixs, idx = d.y.numpy(), d.index.numpy(), order.numpy()
            for i in range(len(self)):
                sel = idx[i * bs:(i + 1) * bs]
                x = torch.empty((len(sel),) + tuple(d.x.shape[1:]), dtype=torch.float32)
                for j, k in enumerate(sel.tolist()):
                    x[j].copy_(d.x[k])
                yield Batch(x, _batch_labels(torch.from_numpy(ys[sel])), torch.from_numpy(ixs[sel]))
            return
        order = order.to(d.device)
        for i in range(len(self)):
            sel = order[i * bs:(i + 1) * bs]
            yield Batch(d.x.index_select(0, sel).float(), _batch_labels(d.y.index_select(0, sel)),
                        d.index.index_select(0, sel))


# -- streaming -------------------------------------------------------------------------------

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
    pieces sequentially from Zarr, at most ``prefetch`` pieces ahead, and the pieces are
    consumed in order so the result never depends on thread timing. A shuffle buffer of
    ``buffer_chunks`` chunks (at least two batches) mixes samples across runs: whenever it is
    full it is permuted and all but half of it goes out as batches.

    Where the time goes and what was done about it (docs/benchmarks.md, "Training input"):
    reader threads decode chunk files straight into their arrays (``_ChunkReader``), the
    shuffle buffer moves integers, not rows (``_Pool``), and each batch row is copied and
    cast to float32 once, in the consuming thread.

    Zarr arrays are opened lazily, once per reading thread and fold; the loader itself holds
    only plain values (no open arrays), so it can be pickled.
    """

    def __init__(self, foldset: FoldSet, batch_size: int, shuffle: bool = True, seed: int = 0,
                 buffer_chunks: int = 8, run_chunks: int = 4, threads: int = 2, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", drop_last: bool = False,
                 prefetch: int | None = None, exact_shares: bool = False):
        _check_common(batch_size, rank, world_size)
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
        self.chunk_clips = _manifest_chunk_clips(manifest)
        # The small arrays (ok, y, clip) are read here once; threads read only x.
        self.runs: list[_Run] = []
        sources: list[tuple[Any, str]] = []
        ys, self.clips, self.fold_of = [], [], []
        first = 0
        for f, fold in enumerate(foldset.folds):
            g = fs.open_fold(foldset.dataset, foldset.key, fold, manifest)
            sources.append(_x_source(g))
            ok = np.asarray(g["ok"][:], dtype=bool)
            ys.append(np.asarray(g["y"][:])[ok])
            self.clips += [str(c) for c in np.asarray(g["clip"][:])[ok]]
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
        self._readers = _Readers(sources)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def labels(self) -> torch.Tensor:
        """Every usable clip's label in global index order, as ``load_in_memory`` gives them:
        int64 (N,), or bool (N, n_classes) for multi-label sets (batches carry them as float)."""
        return _torch_labels(self._y, self.multilabel)

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
        return _rank_span(self.rank, self.world_size, self.n, self.drop_last, self.exact_shares)

    # -- planning ----------------------------------------------------------------------------
    def plan(self, epoch: int) -> list[_Piece]:
        """The pieces this rank reads in an epoch, in order."""
        runs = self.runs
        if self.shuffle and runs:
            order = torch.randperm(len(runs), generator=_generator(self.seed, epoch)).tolist()
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
    def _reader(self, fold: int) -> _ChunkReader:
        return self._readers.get(fold)

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
        g = _generator(self.seed, epoch, self.rank, 1)
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
            return Batch(b.x, _batch_labels(b.y), b.index)
        dev = self.device
        y, index = (t.pin_memory().to(dev, non_blocking=True) for t in (b.y, b.index))
        return Batch(b.x.to(dev, non_blocking=True).float(), _batch_labels(y), index)

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


# -- choosing --------------------------------------------------------------------------------

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


_STREAM_ONLY = ("buffer_chunks", "run_chunks", "threads", "prefetch")


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
    return None if gb is None else int(gb * 1e9)


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
        import torch.distributed as dist

        smallest = torch.tensor([budget], dtype=torch.int64, device=device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        budget = int(smallest.item())
    if not given and recorded is not None:
        return DataMode(recorded.get("data_mode", MODE_MEMORY), size, budget, kept=True)
    return DataMode(MODE_MEMORY if size <= budget else MODE_STREAMING, size, budget)


class ChannelMoments:
    """Per-channel sums of x and x^2 of (B, C, F, T) batches, in float64, batch by batch; the
    mean and std of everything added. ``finetune.channel_stats`` (resident tensors, in chunks)
    and ``streaming_channel_stats`` (one sequential pass) both use it, so that the same rows
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
        import torch.distributed as dist

        packed = torch.cat([self.total, self.sq, self.total.new_tensor([float(self.count)])])
        dist.all_reduce(packed)
        c = self.total.numel()
        self.total, self.sq, self.count = packed[:c], packed[c:2 * c], int(packed[-1].item())

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), float32 (1, C, 1, 1); std from E[x^2] - mean^2, at least 1e-6."""
        mean = self.total / self.count
        std = (self.sq / self.count - mean * mean).clamp_min(1e-12).sqrt()
        return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


STATS_BATCH = 256  # rows per piece of the statistics, in memory and streaming alike


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


def make_loader(foldset: FoldSet, batch_size: int, memory_budget_bytes: int | None = None,
                device: str | torch.device = "cpu", **kw: Any) -> tuple[InMemoryLoader | StreamingLoader, str]:
    """An in-memory loader when the folds' raw size (manifest: clips * prod(shape) * 2 bytes)
    fits the budget, else a streaming one (``choose_mode``). Returns (loader, "memory" | "streaming").

    ``kw``: shuffle, seed, drop_last, rank, world_size for both; buffer_chunks, run_chunks,
    threads, prefetch for streaming only (ignored in memory).
    """
    if not choose_mode(foldset.raw_bytes(foldset.manifest()), memory_budget_bytes, device).streaming:
        common = {k: v for k, v in kw.items() if k not in _STREAM_ONLY}
        return InMemoryLoader(load_in_memory(foldset, device=device), batch_size, **common), MODE_MEMORY
    return StreamingLoader(foldset, batch_size, device=device, **kw), MODE_STREAMING
