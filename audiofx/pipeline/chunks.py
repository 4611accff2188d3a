"""Whole chunks of a fold's ``x`` array, decoded straight into the rows that want them, and
checked before anyone sees them.

This is the store's on-disk format seen from the reading side (the writing side is
store.py). Every chunk a reader decodes is checked against what the manifest recorded for
its write unit (a unit is one chunk): the CRC-32C of its values (stores written since it was
recorded), else their sha256. So a chunk with flipped bytes, one swapped for another, or one
deleted (which zarr would serve as zeros) stops the read with a ``StoreError`` naming the
chunk, instead of training on it. And nothing reaches the decompressor unchecked: a chunk
file whose size disagrees with its Blosc header (truncated, extended) is refused before
Blosc sees it, since Blosc trusts the sizes in the header.

For the layout the store writes, a chunk file (or, remotely, object) is read into a reused
buffer and Blosc decompresses it straight into the destination rows; anything else goes
through zarr, chunk by chunk, and is checked the same way. Why not ``zarr.Array.__getitem__``
for the store's own layout: zarr's read path cost ~0.55 ms of CPU per 1.5 MB chunk on top of
the file read and the decompression (every thread's call goes through zarr's one asyncio
event loop, each chunk takes a thread hop per codec, is decoded into a new buffer and copied
into the output): as much as decoding the chunk itself, on two cores that also run the
training (benchmarks/loader.py prints both; docs/benchmarks.md, "Training input"). Blosc
releases the GIL while it decompresses, so reading threads decode in parallel. Values are
identical either way (tests compare them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.storage import LocalStore

from audiofx.errors import StoreError
from audiofx.pipeline.checksums import checksum, crc32c

REPAIR = ("audiofx cache verify names every damaged chunk; extract again with --rebuild, or pull an intact copy "
          "(audiofx cache pull)")


def decodes_itself(arr: zarr.Array) -> bool:
    """Whether ChunkReader decodes ``arr``'s chunks itself: the layout the store writes, zarr v3
    without storage transformers, chunks that split the first axis only, and codecs ``bytes``
    (native byte order) then at most one Blosc (which records its own codec in each chunk's
    header). No sharding, no transpose, no other codec: those go through zarr."""
    md = arr.metadata
    if getattr(md, "zarr_format", None) != 3 or md.storage_transformers:
        return False
    codecs = list(md.codecs)
    if not codecs or not isinstance(codecs[0], BytesCodec) or np.dtype(arr.dtype).kind not in "fiub":
        return False
    endian = codecs[0].endian
    if endian is not None and endian.value != sys.byteorder and np.dtype(arr.dtype).itemsize > 1:
        return False
    if len(codecs) > 2 or (len(codecs) == 2 and not isinstance(codecs[1], BloscCodec)):
        return False
    grid = md.chunk_grid
    return isinstance(grid, RegularChunkGrid) and tuple(grid.chunk_shape[1:]) == tuple(arr.shape[1:])


def direct_layout(arr: zarr.Array) -> Path | None:
    """The directory of ``arr``'s chunk files when ChunkReader reads them from a local disk itself, else None."""
    if not decodes_itself(arr) or not isinstance(arr.store, LocalStore):
        return None
    return Path(arr.store.root) / arr.path


def expected_chunks(manifest: dict[str, Any], fold: str) -> dict[int, dict[str, Any]]:
    """What each chunk of a fold's x must hold, by chunk number: its write unit's manifest
    entry (``start``, ``stop``, ``checksum``, and ``crc32c`` for stores written since)."""
    return {int(uid.rsplit("-", 1)[1]): unit for uid, unit in manifest["units"].items() if unit["fold"] == fold}


class DamagedChunk(StoreError):
    """A chunk that cannot be decoded, or whose values are not the manifest's (``mismatch``)."""

    def __init__(self, where: str, why: str, mismatch: bool = False):
        super().__init__(f"damaged chunk {where}: {why}", REPAIR)
        self.why, self.mismatch = why, mismatch


def _read_into(f: Any, view: memoryview) -> int:
    """Fill ``view`` from the file ``f``; the number of bytes read (less only at end of file)."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


class ChunkReader:
    """Rows [a, b) of one array, read whole chunk by whole chunk. One per reading thread and
    array: it keeps buffers of its own.

    ``expected``: ``expected_chunks`` of the array's fold; each decoded chunk is checked
    against it (None: not checked, for arrays no manifest describes). ``fetch``: for a remote
    store, the whole object of a chunk key (relative to the array; FileNotFoundError when
    absent), so that its chunks are checked before they are decoded here too."""

    def __init__(self, store: Any, path: str, expected: dict[int, dict[str, Any]] | None = None,
                 fetch: Callable[[str], bytes] | None = None):
        self.array = zarr.open_array(store, path=path, mode="r")
        self.length = int(self.array.shape[0])
        self.rows = int(self.array.chunks[0])
        self.row_shape = tuple(int(s) for s in self.array.shape[1:])
        self.dtype = np.dtype(self.array.dtype)
        self.chunk_bytes = self.rows * int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.expected = expected
        self.directory = direct_layout(self.array)
        self.fetch = fetch if fetch is not None and decodes_itself(self.array) else None
        self.compressed = len(self.array.metadata.codecs) == 2
        self._raw = bytearray()  # one compressed chunk, reused
        self._scratch: np.ndarray | None = None  # one decoded chunk, for chunks read in part

    def read(self, a: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [a, b), into ``out`` (C-contiguous, b - a rows) when given."""
        if out is not None and not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous: chunks are decoded into its memory")
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
        """Decode chunk ``c`` into ``dest`` (``rows`` contiguous rows) and check it."""
        valid = min(self.rows, self.length - c * self.rows)
        if self.directory is not None:
            self._decode_file(c, dest)
        elif self.fetch is not None:
            self._decode_object(c, dest)
        else:
            dest[:valid] = self.array[c * self.rows:c * self.rows + valid]
        self._check(c, dest[:valid])

    def _key(self, c: int) -> str:
        return self.array.metadata.encode_chunk_key((c,) + (0,) * len(self.row_shape))

    def _decode_file(self, c: int, dest: np.ndarray) -> None:
        path = self.directory / self._key(c)
        target = memoryview(dest.reshape(-1).view(np.uint8))
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if not self.compressed:
                    if size != self.chunk_bytes or _read_into(f, target) != size:
                        raise self._damaged(c, f"{size} bytes, expected {self.chunk_bytes}")
                    return
                if len(self._raw) < size:
                    self._raw = bytearray(size)
                raw = memoryview(self._raw)[:size]
                got = _read_into(f, raw)
        except FileNotFoundError:  # zarr writes no chunk that holds only the fill value: checked below
            dest[...] = self.array.fill_value
            return
        self._decompress(c, raw[:got], size, target)

    def _decode_object(self, c: int, dest: np.ndarray) -> None:
        try:
            raw = self.fetch(self._key(c))
        except FileNotFoundError:
            dest[...] = self.array.fill_value
            return
        target = memoryview(dest.reshape(-1).view(np.uint8))
        if not self.compressed:
            if len(raw) != self.chunk_bytes:
                raise self._damaged(c, f"{len(raw)} bytes, expected {self.chunk_bytes}")
            target[:] = raw
            return
        self._decompress(c, memoryview(raw), len(raw), target)

    def _decompress(self, c: int, raw: memoryview, size: int, target: memoryview) -> None:
        # Blosc 1 header: version, versionlz, flags, typesize (1 byte each), then nbytes,
        # blocksize, cbytes (uint32 little-endian). Blosc trusts cbytes, so check it here.
        got = len(raw)
        nbytes = int.from_bytes(raw[4:8], "little") if got >= 16 else -1
        cbytes = int.from_bytes(raw[12:16], "little") if got >= 16 else -1
        if got != size or nbytes != self.chunk_bytes or cbytes != size:
            raise self._damaged(c, f"Blosc header says {nbytes} bytes in {cbytes}, file holds {got}")
        try:
            blosc.decompress(raw, target)
        except RuntimeError as err:  # Blosc's own check of the blocks
            raise self._damaged(c, f"Blosc cannot decode it ({err})") from None

    def _check(self, c: int, values: np.ndarray) -> None:
        if self.expected is None:
            return
        unit = self.expected.get(c)
        if unit is None:
            raise self._damaged(c, "the manifest has no write unit for it")
        if "crc32c" in unit:
            intact = crc32c(values) == unit["crc32c"]
        else:  # a store written before units recorded a CRC: its sha256, ~13x slower
            intact = checksum(values) == unit["checksum"]
        if not intact:
            raise self._damaged(c, "its values are not the ones the manifest recorded for it", mismatch=True)

    def _damaged(self, c: int, why: str, mismatch: bool = False) -> DamagedChunk:
        where = self.directory / self._key(c) if self.directory is not None else f"{self.array.path}/{self._key(c)}"
        unit = (self.expected or {}).get(c)
        clips = f" (clips {unit['start']}-{unit['stop'] - 1})" if unit else ""
        return DamagedChunk(f"{where}", f"{why}{clips}", mismatch)
