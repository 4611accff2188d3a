"""Whole chunks of a fold's ``x`` array, decoded straight into the rows that want them.

This is the store's on-disk format seen from the reading side (the writing side is
store.py): for the layout the store writes, a chunk file is read into a reused buffer and
Blosc decompresses it straight into the destination rows; anything else goes through zarr.

Why not ``zarr.Array.__getitem__``: zarr's read path cost ~0.55 ms of CPU per 1.5 MB chunk on
top of the file read and the decompression (every thread's call goes through zarr's one
asyncio event loop, each chunk takes a thread hop per codec, is decoded into a new buffer
and copied into the output): as much as decoding the chunk itself with the store's codec,
on two cores that also run the training (benchmarks/loader.py prints both; docs/benchmarks.md,
"Training input"). Blosc releases the GIL while it decompresses, so reading threads decode in
parallel. Values are identical either way (tests compare them).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.storage import LocalStore

from audiofx.errors import StoreError


def direct_layout(arr: zarr.Array) -> Path | None:
    """The directory of ``arr``'s chunk files when ChunkReader can read them itself, else None.

    That is the layout the store writes: a local directory, zarr v3 without storage
    transformers, chunks that split the first axis only, and codecs ``bytes`` (native byte
    order) then at most one Blosc (which records its own codec in each chunk's header). No
    sharding, no transpose, no checksum codec: those go through zarr.
    """
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


class ChunkReader:
    """Rows [a, b) of one array, read whole chunk by whole chunk. One per reading thread and
    array: it keeps buffers of its own."""

    def __init__(self, store: Any, path: str):
        self.array = zarr.open_array(store, path=path, mode="r")
        self.length = int(self.array.shape[0])
        self.rows = int(self.array.chunks[0])
        self.row_shape = tuple(int(s) for s in self.array.shape[1:])
        self.dtype = np.dtype(self.array.dtype)
        self.chunk_bytes = self.rows * int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.directory = direct_layout(self.array)
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
