"""The local read-through cache for remote feature stores.

Training on a remote store (s3://..., gs://...) reads each fold through a local mirror: the
first use of a fold copies its objects here (transfer.copy_group: checked value by value
against the remote manifest's checksums, manifest last), every later epoch and every later
run reads the local copy at local-disk speed. A mirror is reused as long as the remote
manifest describes the same values; a re-extracted remote set replaces it.

    <cache dir>/<sha256(url)[:16]>/          one local feature store per remote store
        SOURCE                               the (redacted) URL it mirrors, for humans
        <dataset>/<key>/...                  the same layout as the remote, folds as used
        <dataset>/<key>/.last-used           touched on every use: least recently used goes first

The cache holds at most --cache-size bytes (default 50 GB): after a fetch the least recently
used feature sets of any mirror are removed until it fits. The set in use is never removed;
if it alone is larger than the limit, a warning says so.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import zarr

from audiofx.errors import ConfigError
from audiofx.pipeline.location import redact
from audiofx.pipeline.store import FeatureStore, fold_group, present_folds
from audiofx.pipeline.transfer import copy_group, same_content

DEFAULT_LIMIT = 50 * 10**9
LAST_USED = ".last-used"
_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
               "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'50GB', '500M', '2GiB' or a number of bytes."""
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("BKMGTI")
    unit = s[len(num):]
    try:
        if unit not in _SIZE_UNITS:
            raise ValueError
        return int(float(num) * _SIZE_UNITS[unit])
    except ValueError:
        raise ConfigError(f"cannot read the size {text!r}", "write it like 50GB, 500MB or 2GiB") from None


def default_dir() -> Path:
    if os.environ.get("AUDIOFX_CACHE_DIR"):
        return Path(os.environ["AUDIOFX_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "audiofx" / "features"


class ReadCache:
    def __init__(self, root: str | Path | None = None, limit: int | str | None = None):
        self.root = Path(root).expanduser() if root else default_dir()
        env_limit = os.environ.get("AUDIOFX_CACHE_SIZE")
        self.limit = parse_size(limit) if limit is not None else parse_size(env_limit) if env_limit else DEFAULT_LIMIT

    def mirror(self, remote: FeatureStore) -> FeatureStore:
        """The local store that mirrors a remote one."""
        name = hashlib.sha256(redact(remote.url).rstrip("/").encode()).hexdigest()[:16]
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        source = path / "SOURCE"
        if not source.exists():
            source.write_text(redact(remote.url) + "\n")
        return FeatureStore(path)

    def open_fold(self, remote: FeatureStore, dataset: str, key: str, fold: str, manifest: dict[str, Any]):
        """The zarr group of one fold, from the local mirror; fetched first if needed."""
        local = self.mirror(remote)
        if local.has_manifest(dataset, key):
            cached = local.read_manifest(dataset, key)
            if not same_content(cached, manifest):  # the remote set was re-extracted
                local.remove(dataset, key)
            elif fold in present_folds(cached):
                return self._open(local, dataset, key, fold)
        copy_group(remote, local, dataset, key, folds=[fold], progress=sys.stderr.isatty(), manifest=manifest)
        group = self._open(local, dataset, key, fold)
        self.evict(keep=local.root / dataset / key)
        return group

    @staticmethod
    def _open(local: FeatureStore, dataset: str, key: str, fold: str):
        (local.root / dataset / key / LAST_USED).touch()  # touch sets the mtime: the LRU order
        return zarr.open_group(local.zarr_store(dataset, key, fold_group(fold), read_only=True), mode="r")

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last used, bytes, path) of every cached feature set."""
        out = []
        for marker in self.root.glob(f"*/*/*/{LAST_USED}"):
            group = marker.parent
            size = FeatureStore(group.parent.parent).group_bytes(group.parent.name, group.name)
            out.append((marker.stat().st_mtime, size, group))
        return sorted(out)

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove least recently used sets until the cache fits its limit; never `keep`."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, group in entries:
            if total <= self.limit:
                break
            if group == keep:
                continue
            FeatureStore(group.parent.parent).remove(group.parent.name, group.name)
            total -= size
            removed.append(group)
        if total > self.limit:
            print(f"warning: the feature cache {self.root} holds {total / 1e9:.2f} GB, over its "
                  f"{self.limit / 1e9:.2f} GB limit, for the set in use (raise --cache-size)", file=sys.stderr)
        return removed


_default: ReadCache | None = None


def configure(root: str | Path | None = None, limit: int | str | None = None) -> ReadCache:
    """Set the cache that remote reads in this process use (the CLI's --cache-dir and
    --cache-size, each applied as it is parsed: what one call leaves out is kept)."""
    global _default
    current = _default or ReadCache()
    _default = ReadCache(root if root is not None else current.root, limit if limit is not None else current.limit)
    return _default


def default_cache() -> ReadCache:
    global _default
    if _default is None:
        _default = ReadCache()
    return _default
