"""The Zarr feature store: layout, creation, write units, manifest, listing and verification.

    <store>/<dataset>/<feature_key>/          Zarr v3 group; attrs describe what it holds
        fold-<k>/x      (n, C, bins, T) float16, chunks of chunk_clips(config) clips: one chunk = one write unit
        fold-<k>/y      (n,) int16 labels, or (n, n_classes) bool for multi-label sets
        fold-<k>/clip   (n,) source path relative to the dataset root
        fold-<k>/ok     (n,) bool, False for a clip that was skipped (its x rows are zeros); written at the end
        units/<k>-<i>.json   one record per finished write unit (checksum, skips), written by the worker
        manifest.json   written last and atomically: a group without it is incomplete

Concurrency rules (zarr 3 docs: partial-chunk writes from several processes lose data):
- the group and every array are created once, under an exclusive lock, with final shapes;
- a worker writes whole chunks only, each atomically (zarr's LocalStore writes a temp file
  and renames it), then its unit record;
- two runs may compute the same unit: the bytes are identical, so the last rename wins harmlessly;
- the manifest is written last, by whichever run sees every unit record first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from audiofx import __version__
from audiofx.config import FEATURE_CODE_VERSION, FeatureConfig, canonical_json
from audiofx.errors import StoreError

FORMAT = "audiofx-store/1"
CHUNK_BYTES = 1_500_000  # raw bytes a chunk should at least hold: long sequential reads
MAX_CHUNK_CLIPS = 16
MANIFEST = "manifest.json"
UNITS_DIR = "units"

# zstd level 1 with bit shuffle. On features of real-looking audio (an 8-clip 3x128x250 chunk):
# zstd-3 1.24x in 10.4 ms, zstd-1 1.22x in 6.6 ms, lz4 1.16x in 4.6 ms, none 4.4 ms. zstd-1
# keeps nearly all of the size saving (which is what a shared or S3 store pays for) at a write
# cost of <5% of the feature time; bit shuffle read back faster than byte shuffle.
X_CODEC = BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")


def fold_group(fold: str) -> str:
    return f"fold-{fold}"


@dataclass(frozen=True)
class Unit:
    """One write unit: a whole chunk of one fold's x array."""

    fold: str
    chunk: int
    start: int
    stop: int

    @property
    def id(self) -> str:
        return f"{self.fold}-{self.chunk}"


def chunk_clips(config: FeatureConfig) -> int:
    """Clips per chunk (= per write unit): the fewest that make >= 1.5 MB, at most 16.

    8 clips for 3x128x250 (1.5 MB), 2 for GTZAN's 3x128x1500 (2.3 MB). Small units keep the
    workers evenly busy to the end of a run (a 16-clip GTZAN unit is ~2 s of work, and the
    last one ran alone) and lose less work to a kill; >= 1.5 MB keeps reads sequential.
    """
    clip_bytes = int(np.prod(config.shape)) * np.dtype(config.dtype).itemsize
    return max(1, min(MAX_CHUNK_CLIPS, -(-CHUNK_BYTES // clip_bytes)))


def plan_units(fold_sizes: dict[str, int], chunk_clips: int) -> list[Unit]:
    units = []
    for fold, n in fold_sizes.items():
        for i, start in enumerate(range(0, n, chunk_clips)):
            units.append(Unit(fold, i, start, min(start + chunk_clips, n)))
    return units


def checksum(array: np.ndarray) -> str:
    """sha256 of the values in C order: independent of codec and chunk layout. Strings are
    hashed as NUL-joined UTF-8 so fixed-width and variable-width string arrays agree."""
    a = np.asarray(array)
    if a.dtype.kind in "OUT":
        return hashlib.sha256("\0".join(str(v) for v in a.ravel()).encode()).hexdigest()
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@dataclass
class GroupPlan:
    """Everything the coordinator needs to create a group before any audio is decoded."""

    dataset: str
    key: str
    config: FeatureConfig
    fingerprint: dict[str, Any]
    classes: list[str]
    multilabel: bool
    folds: dict[str, list[tuple[str, Any]]]  # fold -> [(relative path, label)] in order
    dataset_options: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # listed in metadata, absent, allowed
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) dropped by the adapter

    def attrs(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "audiofx_version": __version__,
            "feature_code_version": FEATURE_CODE_VERSION,
            "dataset": self.dataset,
            "feature_key": self.key,
            "feature_config": self.config.to_dict(),
            "dataset_options": self.dataset_options,
            "fingerprint": self.fingerprint,
            "classes": self.classes,
            "multilabel": self.multilabel,
            "folds": {f: len(c) for f, c in self.folds.items()},
            "chunk_clips": chunk_clips(self.config),
        }


class FeatureStore:
    """A feature store rooted at a local directory (remote URLs come with the sharing issue)."""

    def __init__(self, root: str | Path):
        text = str(root)
        if "://" in text and not text.startswith("file://"):
            raise StoreError(f"remote store {text} is not supported yet", "use a local path or a shared mount")
        self.root = Path(text.removeprefix("file://")).expanduser()

    # -- paths -----------------------------------------------------------------------------
    def group_path(self, dataset: str, key: str) -> Path:
        return self.root / dataset / key

    def manifest_path(self, dataset: str, key: str) -> Path:
        return self.group_path(dataset, key) / MANIFEST

    @contextlib.contextmanager
    def lock(self, dataset: str, key: str) -> Iterator[None]:
        """Exclusive lock for creating or finalizing a group. flock is released by the kernel
        when its holder dies, so a kill -9 never leaves a stale lock behind."""
        path = self.root / dataset / f".{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- creation --------------------------------------------------------------------------
    def prepare(self, plan: GroupPlan, rebuild: bool = False) -> str:
        """Create the group with every array at its final shape, or check an existing one.

        Returns "complete" (manifest present and matching), "resume" (group exists, not
        finished) or "created". Raises StoreError when the group was built from a different
        copy of the dataset, unless rebuild is set.
        """
        path = self.group_path(plan.dataset, plan.key)
        with self.lock(plan.dataset, plan.key):
            if rebuild and path.exists():
                shutil.rmtree(path)
            attrs = self._ready_attrs(path)
            if attrs is not None:
                if attrs.get("fingerprint", {}).get("digest") != plan.fingerprint["digest"]:
                    old = attrs.get("fingerprint", {})
                    raise StoreError(
                        f"store {path} was built from a different copy of {plan.dataset} "
                        f"({old.get('files')} files, {old.get('bytes')} bytes then; "
                        f"{plan.fingerprint['files']} files, {plan.fingerprint['bytes']} bytes now)",
                        "pass --rebuild to replace it, or --store to write elsewhere",
                    )
                if canonical_json(attrs.get("feature_config")) != canonical_json(plan.config.to_dict()):
                    raise StoreError(f"store {path} holds features of another config under the same key",
                                     "pass --rebuild to replace it")
                return "complete" if (path / MANIFEST).exists() else "resume"
            if path.exists():  # a creation that was killed half-way: start it again
                shutil.rmtree(path)
            self._create(path, plan)
            return "created"

    def _ready_attrs(self, path: Path) -> dict[str, Any] | None:
        """The group's attrs if it was fully created (attrs are written last), else None."""
        if not (path / "zarr.json").exists():
            return None
        try:
            attrs = dict(zarr.open_group(str(path), mode="r").attrs)
        except Exception:  # a half-written zarr.json from a killed creation
            return None
        return attrs if attrs.get("format") == FORMAT else None

    def _create(self, path: Path, plan: GroupPlan) -> None:
        group = zarr.open_group(str(path), mode="w")
        c, bins, frames = plan.config.shape
        dtype = plan.config.dtype
        for fold, clips in plan.folds.items():
            n = len(clips)
            fg = group.create_group(fold_group(fold))
            fg.create_array("x", shape=(n, c, bins, frames), chunks=(chunk_clips(plan.config), c, bins, frames),
                            dtype=dtype, compressors=X_CODEC, fill_value=0)
            if plan.multilabel:
                y = np.zeros((n, len(plan.classes)), dtype=bool)
                for i, (_, label) in enumerate(clips):
                    y[i, list(label)] = True
            else:
                y = np.array([label for _, label in clips], dtype=np.int16)
            fg.create_array("y", data=y, chunks=y.shape or (1,))
            names = np.array([p for p, _ in clips], dtype=str) if n else np.array([], dtype=str)
            fg.create_array("clip", shape=(n,), dtype=str, chunks=(max(n, 1),))[:] = names
        (path / UNITS_DIR).mkdir(exist_ok=True)
        # Attributes last: their presence marks a fully created layout.
        group.attrs.update(plan.attrs())

    # -- units -----------------------------------------------------------------------------
    def unit_record_path(self, dataset: str, key: str, unit_id: str) -> Path:
        return self.group_path(dataset, key) / UNITS_DIR / f"{unit_id}.json"

    def unit_records(self, dataset: str, key: str) -> dict[str, dict[str, Any]]:
        records = {}
        for p in (self.group_path(dataset, key) / UNITS_DIR).glob("*.json"):
            try:
                record = json.loads(p.read_text())
            except (OSError, ValueError):
                continue  # unreadable record: the unit is simply done again
            records[p.stem] = record
        return records

    def write_unit(self, dataset: str, key: str, unit: Unit, x: np.ndarray, skipped: list[tuple[str, str]],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write one whole chunk, then its record. Called in worker processes."""
        arr = zarr.open_array(str(self.group_path(dataset, key) / fold_group(unit.fold) / "x"), mode="r+")
        arr[unit.start:unit.stop] = x
        record = {"unit": unit.id, "fold": unit.fold, "start": unit.start, "stop": unit.stop,
                  "checksum": checksum(x), "skipped": [list(s) for s in skipped], **(extra or {})}
        _atomic_write_text(self.unit_record_path(dataset, key, unit.id), json.dumps(record))
        return record

    # -- finalize --------------------------------------------------------------------------
    def finalize(self, plan: GroupPlan, units: list[Unit], extraction: dict[str, Any]) -> dict[str, Any]:
        """Write the ok masks and, last, the manifest. Every unit must have its record."""
        path = self.group_path(plan.dataset, plan.key)
        with self.lock(plan.dataset, plan.key):
            if (path / MANIFEST).exists():
                return self.read_manifest(plan.dataset, plan.key)
            records = self.unit_records(plan.dataset, plan.key)
            absent = [u.id for u in units if u.id not in records]
            if absent:
                raise StoreError(f"{len(absent)} write units of {path} are not finished (e.g. {absent[0]})",
                                 "rerun the same extract command to finish them")
            group = zarr.open_group(str(path), mode="r+")
            skipped = dict(plan.left_out)  # e.g. a second copy of a GTZAN clip, never in the arrays
            for r in records.values():
                for clip, reason in r["skipped"]:
                    skipped[clip] = reason
            folds: dict[str, Any] = {}
            array_sums: dict[str, str] = {}
            for fold, clips in plan.folds.items():
                ok = np.array([p not in skipped for p, _ in clips], dtype=bool)
                fg = group[fold_group(fold)]
                fg.create_array("ok", data=ok, chunks=(max(len(ok), 1),), overwrite=True)
                for name in ("y", "clip", "ok"):
                    values = fg[name][:]
                    array_sums[f"{fold_group(fold)}/{name}"] = checksum(values)
                folds[fold] = {"clips": len(clips), "ok": int(ok.sum()), "skipped": int((~ok).sum()),
                               "chunks": sum(1 for u in units if u.fold == fold)}
            raw = sum(f["clips"] for f in folds.values()) * int(np.prod(plan.config.shape)) * np.dtype(plan.config.dtype).itemsize
            stored = dir_bytes(path)
            manifest = {
                **plan.attrs(),
                "folds": folds,
                "clips": sum(f["ok"] for f in folds.values()),
                "shape": list(plan.config.shape),
                "units": {u.id: {"fold": u.fold, "start": u.start, "stop": u.stop, "checksum": records[u.id]["checksum"]}
                          for u in units},
                "arrays": array_sums,
                "skipped": [{"clip": c, "reason": r} for c, r in sorted(skipped.items())],
                "missing": plan.missing,
                "sizes": {"raw_bytes": int(raw), "stored_bytes": int(stored)},
                "extraction": extraction,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            _atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1))
            return manifest

    # -- reading ---------------------------------------------------------------------------
    def read_manifest(self, dataset: str, key: str) -> dict[str, Any]:
        path = self.manifest_path(dataset, key)
        if not path.exists():
            raise StoreError(f"{self.group_path(dataset, key)} has no manifest: the extraction did not finish",
                             "rerun the extract command to complete it")
        try:
            return json.loads(path.read_text())
        except ValueError:
            raise StoreError(f"{path} is not valid JSON", "run audiofx cache verify, then re-extract") from None

    def groups(self) -> list[tuple[str, str, Path]]:
        """(dataset, key, path) of every group in the store, complete or not."""
        out = []
        if not self.root.is_dir():
            return out
        for ds in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for grp in sorted(p for p in ds.iterdir() if p.is_dir() and (p / "zarr.json").exists()):
                out.append((ds.name, grp.name, grp))
        return out

    def find(self, key: str) -> tuple[str, str]:
        """(dataset, key) of the group whose key starts with the given prefix."""
        hits = [(d, k) for d, k, _ in self.groups() if k.startswith(key) or f"{d}/{k}".startswith(key)]
        if not hits:
            raise StoreError(f"no feature set {key!r} in store {self.root}", "list them with audiofx cache ls")
        if len(hits) > 1:
            raise StoreError(f"{key!r} matches {len(hits)} feature sets in {self.root}", "give more characters of the key")
        return hits[0]

    def open_fold(self, dataset: str, key: str, fold: str):
        """The zarr group of one fold of a complete feature set."""
        self.read_manifest(dataset, key)  # only a store with a manifest is trusted
        return zarr.open_group(str(self.group_path(dataset, key) / fold_group(fold)), mode="r")

    def load_fold(self, dataset: str, key: str, fold: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, clip) of the usable clips of one fold, read in one sequential pass."""
        g = self.open_fold(dataset, key, fold)
        ok = g["ok"][:]
        return g["x"][:][ok], g["y"][:][ok], g["clip"][:][ok]

    # -- verification ----------------------------------------------------------------------
    def verify(self, dataset: str, key: str) -> list[str]:
        """Recompute every checksum; return one line per damaged unit or array (empty: intact)."""
        path = self.group_path(dataset, key)
        try:
            manifest = self.read_manifest(dataset, key)
        except StoreError as err:
            return [err.message]
        problems = []
        for uid, unit in manifest["units"].items():
            where = f"{dataset}/{key}/{fold_group(unit['fold'])}/x chunk {uid.rsplit('-', 1)[1]} (clips {unit['start']}-{unit['stop'] - 1})"
            try:
                arr = zarr.open_array(str(path / fold_group(unit["fold"]) / "x"), mode="r")
                values = arr[unit["start"]:unit["stop"]]
            except Exception as err:  # noqa: BLE001 - any decode failure is damage to report
                problems.append(f"{where}: unreadable ({type(err).__name__}: {str(err)[:80]})")
                continue
            if checksum(values) != unit["checksum"]:
                problems.append(f"{where}: checksum mismatch")
        for name, expected in manifest.get("arrays", {}).items():
            try:
                values = zarr.open_array(str(path / name), mode="r")[:]
                got = checksum(values)
            except Exception as err:  # noqa: BLE001
                problems.append(f"{dataset}/{key}/{name}: unreadable ({type(err).__name__})")
                continue
            if got != expected:
                problems.append(f"{dataset}/{key}/{name}: checksum mismatch")
        return problems
