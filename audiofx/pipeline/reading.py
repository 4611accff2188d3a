"""Reading a complete feature set: the one way in for everything that consumes a store.

- ``open_fold``: the zarr group of one fold. A local store's is opened where it is; a remote
  store's is served from the local read-through cache (readcache.py), fetched and checked on
  first use. Only a set with a manifest is read.
- ``load_fold``: (x, y, clip) of a fold's usable clips, in one sequential pass.
- ``open_fold_reader``: a ``FoldReader``, what training reads a fold through: the small arrays
  in memory, x in row ranges decoded whole chunk by whole chunk (chunks.py) by any thread,
  every array and every chunk checked against the manifest as it is read.

Nothing outside pipeline/ needs to know how a fold is laid out on disk.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr

from audiofx.errors import StoreError
from audiofx.pipeline.checksums import checksum
from audiofx.pipeline.chunks import REPAIR, ChunkReader, expected_chunks
from audiofx.pipeline.readcache import default_cache
from audiofx.pipeline.store import FeatureStore, check_fold_present, fold_group


def open_fold(store: FeatureStore, dataset: str, key: str, fold: str, manifest: dict[str, Any] | None = None):
    """The zarr group of one fold of a complete feature set. `manifest`: this store's
    manifest when the caller has just read it (saves a GET on a remote store)."""
    if manifest is None:
        manifest = store.read_manifest(dataset, key)  # only a store with a manifest is trusted
    check_fold_present(store, dataset, key, fold, manifest)
    if store.remote:
        return default_cache().open_fold(store, dataset, key, fold, manifest)
    return zarr.open_group(store.zarr_store(dataset, key, fold_group(fold), read_only=True), mode="r")


def load_fold(store: FeatureStore, dataset: str, key: str, fold: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, clip) of the usable clips of one fold, read in one sequential pass."""
    g = open_fold(store, dataset, key, fold)
    ok = g["ok"][:]
    return g["x"][:][ok], g["y"][:][ok], g["clip"][:][ok]


class FoldReader:
    """One fold as training reads it: ``ok`` (usable rows), ``y`` (labels) and ``clip`` (source
    paths) read once and checked against the manifest; ``x`` read by ``read(a, b)``, whole
    chunk by whole chunk, each chunk checked, in any thread (each thread gets a ChunkReader of
    its own, opened on first use). A damaged array or chunk is a ``StoreError`` naming it.

    Pickles as plain values (where x lives, the small arrays): open arrays never cross a
    process boundary. A remote store's x lives in the local read-through cache that
    ``open_fold`` has just filled, so no reading thread goes back to the remote."""

    def __init__(self, group: Any, manifest: dict[str, Any], fold: str, where: str = ""):
        arrays = f"{where}/{fold_group(fold)}"  # how messages name the fold's arrays
        self.where = f"{arrays}/x"
        with unreadable(self.where):
            x = group["x"]
            self.chunk_rows = int(x.chunks[0])
            self.dtype = np.dtype(x.dtype)
        self.source = (group.store, f"{group.path}/x".lstrip("/"))
        self.expected = expected_chunks(manifest, fold)
        small = {}
        for name in ("ok", "y", "clip"):
            with unreadable(f"{arrays}/{name}"):
                values = np.asarray(group[name][:])
            want = manifest.get("arrays", {}).get(f"{fold_group(fold)}/{name}")
            if want is not None and checksum(values) != want:
                raise StoreError(f"damaged array {arrays}/{name}: its values are not the ones the manifest recorded",
                                 REPAIR)
            small[name] = values
        self.ok, self.y, self.clip = small["ok"].astype(bool), small["y"], small["clip"]
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _reader(self) -> ChunkReader:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            with unreadable(self.where):
                reader = self._local.reader = ChunkReader(*self.source, expected=self.expected)
        return reader

    @property
    def directory(self):
        """Where this thread's reader decodes chunk files itself (None: it reads through zarr)."""
        return self._reader().directory

    def read(self, a: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [a, b) of x, into ``out`` (C-contiguous, b - a rows) when given."""
        return self._reader().read(a, b, out)

    def read_through_zarr(self, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of x by zarr's own read path: what ``read`` avoids (benchmarks/loader.py compares them)."""
        return np.asarray(self._reader().array[a:b])


def open_fold_reader(store: FeatureStore, dataset: str, key: str, fold: str,
                     manifest: dict[str, Any] | None = None) -> FoldReader:
    manifest = manifest if manifest is not None else store.read_manifest(dataset, key)
    with unreadable(f"{store}/{dataset}/{key}/{fold_group(fold)}"):
        group = open_fold(store, dataset, key, fold, manifest)
    return FoldReader(group, manifest, fold, f"{store}/{dataset}/{key}")


@contextlib.contextmanager
def unreadable(where: str) -> Iterator[None]:
    """An array or group whose metadata or small chunks do not decode (cut, rotated or
    zeroed bytes: zarr's JSON, zstd's or Blosc's own errors) is a damaged store: one line
    naming it and the command that repairs it, as a damaged chunk of x is."""
    try:
        yield
    except StoreError:
        raise
    except (KeyError, ValueError, RuntimeError, TypeError, OSError) as err:  # zarr, JSON, codecs
        raise StoreError(f"damaged array {where}: unreadable ({type(err).__name__}: {str(err)[:100]})", REPAIR) \
            from None
