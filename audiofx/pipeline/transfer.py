"""Copy one feature set between stores: `cache push`, `cache pull` and the read-through
cache's fetch all use this.

Only a complete set (one with a manifest) is copied. Objects are copied whole, several at a
time; an object already at the destination with the same size is not copied again, which is
what makes an interrupted copy resume. Every copied fold is then checked value by value
against the source manifest's checksums (a same-size object that differs is copied again),
and the manifest goes last: a destination without it, or without a fold in its
`partial_folds`, is never read. A pull of some folds writes a manifest whose
`partial_folds` lists the folds present; pulling the rest completes it.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from audiofx.errors import StoreError
from audiofx.pipeline.store import MANIFEST, UNITS_DIR, FeatureStore, present_folds

# Object stores reward several requests in flight; local disks do not mind.
COPY_THREADS = int(os.environ.get("AUDIOFX_COPY_THREADS", "8"))


@dataclass
class CopyResult:
    dataset: str
    key: str
    folds: list[str] = field(default_factory=list)  # folds copied by this call
    objects_copied: int = 0
    objects_skipped: int = 0  # already at the destination (a resumed copy)
    bytes_copied: int = 0
    up_to_date: bool = False


def same_content(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two manifests describe the same values (a re-extraction with other results does not)."""
    return a.get("feature_key") == b.get("feature_key") and a.get("units") == b.get("units") \
        and a.get("arrays") == b.get("arrays")


def _fold_of_object(rel: str) -> str | None:
    """The fold an object belongs to, None for the group's own metadata."""
    head = rel.split("/", 1)[0]
    if head.startswith("fold-"):
        return head.removeprefix("fold-")
    if head == UNITS_DIR:
        return rel.split("/", 1)[1].rsplit("-", 1)[0]
    return None


def copy_group(src: FeatureStore, dst: FeatureStore, dataset: str, key: str, folds: list[str] | None = None,
               progress: bool = False, manifest: dict[str, Any] | None = None) -> CopyResult:
    """`manifest`: the source's, when the caller has just read it."""
    if manifest is None:
        manifest = src.read_manifest(dataset, key)  # StoreError for an incomplete source
    have_src = present_folds(manifest)
    wanted = [str(f) for f in folds] if folds else have_src
    unknown = [f for f in wanted if f not in manifest["folds"]]
    if unknown:
        raise StoreError(f"{dataset}/{key} has no fold {unknown[0]}", f"folds are {', '.join(manifest['folds'])}")
    absent = [f for f in wanted if f not in have_src]
    if absent:
        raise StoreError(f"fold {absent[0]} of {dataset}/{key} is not in {src} (a partial copy)",
                         "copy from the store that holds every fold")
    result = CopyResult(dataset, key)
    dst.loc.require_bucket()
    with dst.lock(dataset, key):
        have: list[str] = []
        if dst.has_manifest(dataset, key):
            existing = dst.read_manifest(dataset, key)
            if not same_content(existing, manifest):
                raise StoreError(f"{dst.group_path(dataset, key)} holds another extraction under the same key",
                                 f"remove it first: audiofx cache rm {key[:12]} --store {dst} --yes")
            have = present_folds(existing)
        todo = [f for f in wanted if f not in have]
        if not todo:
            result.up_to_date = True
            return result
        rel = FeatureStore.rel(dataset, key)
        src_files = src.loc.files(rel)
        selected = {p: n for p, n in src_files.items()
                    if p != MANIFEST and not p.rsplit("/", 1)[-1].startswith(".") and _fold_of_object(p) in (None, *todo)}
        dst_files = dst.loc.files(rel)
        pending = [p for p, n in selected.items() if dst_files.get(p) != n]
        result.objects_skipped = len(selected) - len(pending)
        _copy_objects(src, dst, rel, pending, selected, result, progress)
        problems = dst.verify(dataset, key, manifest=manifest, folds=todo)
        if problems:  # a same-size object that differs (e.g. left by another extraction): copy all again
            _copy_objects(src, dst, rel, sorted(selected), selected, result, progress)
            problems = dst.verify(dataset, key, manifest=manifest, folds=todo)
        if problems:
            raise StoreError(f"the copy of {dataset}/{key} in {dst} does not match the source's checksums: {problems[0]}",
                             f"check the source with: audiofx cache verify {key[:12]} --store {src}")
        present = [f for f in manifest["folds"] if f in set(have) | set(todo)]
        out = {k: v for k, v in manifest.items() if k != "partial_folds"}
        if len(present) < len(manifest["folds"]):
            out["partial_folds"] = present
        dst.write_manifest(dataset, key, out)  # last: the copy is now visible
    result.folds = todo
    return result


def _copy_objects(src: FeatureStore, dst: FeatureStore, rel: str, names: list[str], sizes: dict[str, int],
                  result: CopyResult, progress: bool) -> None:
    from tqdm import tqdm

    # Metadata (zarr.json) after the chunks of each array would not matter for readers (the
    # manifest gates them), so the order is simply the listing's.
    bar = tqdm(total=sum(sizes[n] for n in names), unit="B", unit_scale=True, desc=f"copy {rel}",
               disable=not progress or not names, file=sys.stderr, mininterval=0.5, dynamic_ncols=True)

    def one(name: str) -> int:
        data = src.loc.read_bytes(f"{rel}/{name}")
        dst.loc.write_bytes(f"{rel}/{name}", data)
        return len(data)

    try:
        with ThreadPoolExecutor(max_workers=COPY_THREADS) as pool:
            for n in pool.map(one, names):
                result.objects_copied += 1
                result.bytes_copied += n
                bar.update(n)
    finally:
        bar.close()
