"""Dataset fingerprint: what a store was built from, so a changed dataset is never served
silently from an old store.

It covers the relative path and size of every listed source file, the sha256 of every
metadata file, and the (path, label, fold) list itself. Modification times are left out on
purpose: a copy of the same dataset on another machine must match. With ``content`` (extract
--fingerprint content) it also records a digest of every source file's sha256, for datasets
whose files are edited in place (a size that stays the same hides such an edit).
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
    content: str | None = None  # sha256 over every file's sha256 (--fingerprint content)

    def to_dict(self) -> dict:
        out = {"digest": self.digest, "files": self.files, "bytes": self.bytes}
        return {**out, "content": self.content} if self.content else out

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


def fingerprint(index: DatasetIndex, sizes: dict[str, int], content: bool = False) -> Fingerprint:
    h = hashlib.sha256()
    h.update(canonical_json(sorted(sizes.items())).encode())
    h.update(canonical_json([(c.path, c.label, c.fold) for c in index.clips]).encode())
    meta = {str(Path(m).relative_to(index.root)) if Path(m).is_relative_to(index.root) else Path(m).name: file_sha256(Path(m))
            for m in index.metadata_files}
    h.update(canonical_json(meta).encode())
    present = [s for s in sizes.values() if s >= 0]
    hashes = None
    if content:
        files = hashlib.sha256()
        for path in sorted(p for p, s in sizes.items() if s >= 0):
            files.update(canonical_json([path, file_sha256(index.root / path)]).encode())
        hashes = files.hexdigest()
    return Fingerprint(h.hexdigest(), len(present), sum(present), hashes)
