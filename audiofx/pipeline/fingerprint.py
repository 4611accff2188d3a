"""Dataset fingerprint: what a store was built from, so a changed dataset is never served
silently from an old store.

It covers the relative path and size of every listed source file, the sha256 of every
metadata file, and the (path, label, fold) list itself. Modification times are left out on
purpose: a copy of the same dataset on another machine must match.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from audiofx.config import canonical_json
from audiofx.pipeline.datasets.base import DatasetIndex, file_sha256


@dataclass(frozen=True)
class Fingerprint:
    digest: str
    files: int
    bytes: int

    def to_dict(self) -> dict:
        return {"digest": self.digest, "files": self.files, "bytes": self.bytes}

    def describe(self) -> str:
        return f"{self.files} files, {self.bytes / 1e6:.1f} MB, digest {self.digest[:12]}"


def file_sizes(index: DatasetIndex) -> dict[str, int]:
    """Size of every listed file; -1 for a file that does not exist."""
    sizes = {}
    for clip in index.clips:
        try:
            sizes[clip.path] = (index.root / clip.path).stat().st_size
        except OSError:
            sizes[clip.path] = -1
    return sizes


def fingerprint(index: DatasetIndex, sizes: dict[str, int]) -> Fingerprint:
    h = hashlib.sha256()
    h.update(canonical_json(sorted(sizes.items())).encode())
    h.update(canonical_json([(c.path, c.label, c.fold) for c in index.clips]).encode())
    meta = {str(Path(m).relative_to(index.root)) if Path(m).is_relative_to(index.root) else Path(m).name: file_sha256(Path(m))
            for m in index.metadata_files}
    h.update(canonical_json(meta).encode())
    present = [s for s in sizes.values() if s >= 0]
    return Fingerprint(h.hexdigest(), len(present), sum(present))
