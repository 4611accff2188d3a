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
import json
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
from audiofx.pipeline.checksums import checksum, crc32c
from audiofx.pipeline.chunks import ChunkReader, DamagedChunk, expected_chunks
from audiofx.pipeline.location import Location

FORMAT = "audiofx-store/1"
CHUNK_BYTES = 1_500_000  # raw bytes a chunk should at least hold: long sequential reads
MAX_CHUNK_CLIPS = 16
MANIFEST = "manifest.json"
UNITS_DIR = "units"

# Blosc zstd level 1, byte shuffle, 1 MiB blocks. Measured on one core (benchmarks/loader.py
# prints the table; docs/benchmarks.md) on 8-clip 3x128x250 chunks of real-looking features,
# ratio / encode / decode per chunk: this 1.24x / 2.5 ms / 0.71 ms; the codec before it,
# zstd-1 bit shuffle with Blosc's automatic 32 KB blocks, 1.19x / 3.3 / 1.87; zstd-1 bit
# shuffle 1 MiB 1.24x / 2.3 / 0.97; zstd-2 shuffle 1 MiB 1.28x / 5.6 / 0.82; lz4 bit shuffle
# 1.12x / 1.3 / 0.56; lz4 shuffle 1.07x / 1.1 / 0.29; lz4hc-5 shuffle 1.20x / 33 / 0.34.
# Large blocks are what make zstd fast here (every block restarts zstd). This codec is
# smaller, quicker to write and 2.6x quicker to read than the old one, so it wins on all
# three things a user pays for: store size (S3), extraction (encoding is ~2% of the ~17 ms of
# feature math per clip) and streaming. The lz4 family reads faster still but costs 10-16%
# more storage, or (lz4hc) 4 ms per clip to write, and even an uncompressed store only just
# reaches half a memmap's rate when streaming on two cores. The codec is recorded per array,
# so stores written with the old one are read as they are; it is not part of the feature key.
X_CODEC = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", blocksize=2**20)


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


def manifest_chunk_clips(manifest: dict[str, Any]) -> int:
    """Clips per chunk of a written set (stores written before the manifest recorded it:
    from its feature config)."""
    if manifest.get("chunk_clips"):
        return int(manifest["chunk_clips"])
    return chunk_clips(FeatureConfig.from_dict(manifest["feature_config"]))


def plan_units(fold_sizes: dict[str, int], chunk_clips: int) -> list[Unit]:
    units = []
    for fold, n in fold_sizes.items():
        for i, start in enumerate(range(0, n, chunk_clips)):
            units.append(Unit(fold, i, start, min(start + chunk_clips, n)))
    return units


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
    """A feature store rooted at a local directory or an fsspec URL (s3://bucket/prefix, ...).

    Local stores serialise creation and finalisation with flock. Remote stores have no lock:
    creating a group writes the same metadata objects whatever run does it, never deletes
    anything (but for --rebuild), and writes only whole objects, so two runs on two machines
    interleave harmlessly. Training reads of a remote store go through the local read-through
    cache (reading.py, readcache.py); `verify` and the cache commands read the store itself.
    """

    def __init__(self, root: str | Path):
        self.loc = Location(root)
        self.url = self.loc.url  # what workers are given to open the same store
        self.remote = self.loc.remote
        self.root = self.loc.path  # the local directory; None for a remote store

    def __str__(self) -> str:
        return str(self.loc)

    # -- paths -----------------------------------------------------------------------------
    @staticmethod
    def rel(dataset: str, key: str, *parts: str) -> str:
        return "/".join((dataset, key, *parts))

    def group_path(self, dataset: str, key: str) -> Path | str:
        """Where a group is, as the user would type it: a Path locally, a URL remotely."""
        return Path(self.loc.full(self.rel(dataset, key))) if not self.remote else self.loc.show(self.rel(dataset, key))

    def zarr_store(self, dataset: str, key: str, *parts: str, read_only: bool = False):
        return self.loc.zarr_store(self.rel(dataset, key, *parts), read_only=read_only)

    @contextlib.contextmanager
    def lock(self, dataset: str, key: str) -> Iterator[None]:
        """Exclusive lock for creating or finalizing a local group. flock is released by the
        kernel when its holder dies, so a kill -9 never leaves a stale lock behind. Remote
        stores need none (see the class docstring)."""
        if self.remote:
            yield
            return
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
        rel = self.rel(plan.dataset, plan.key)
        where = self.group_path(plan.dataset, plan.key)
        self.loc.require_bucket()
        with self.lock(plan.dataset, plan.key):
            if rebuild:
                self.loc.remove(rel)
            attrs = self._ready_attrs(plan.dataset, plan.key)
            if attrs is not None:
                if attrs.get("fingerprint", {}).get("digest") != plan.fingerprint["digest"]:
                    old = attrs.get("fingerprint", {})
                    raise StoreError(
                        f"store {where} was built from a different copy of {plan.dataset} "
                        f"({old.get('files')} files, {old.get('bytes')} bytes then; "
                        f"{plan.fingerprint['files']} files, {plan.fingerprint['bytes']} bytes now)",
                        "pass --rebuild to replace it, or --store to write elsewhere",
                    )
                recorded, now = attrs.get("fingerprint", {}).get("content"), plan.fingerprint.get("content")
                if recorded and now and recorded != now:
                    raise StoreError(f"store {where} was built from {plan.dataset} files whose content has changed "
                                     "since (the same names and sizes, other bytes: --fingerprint content)",
                                     "pass --rebuild to extract them again, or --store to write elsewhere")
                if canonical_json(attrs.get("feature_config")) != canonical_json(plan.config.to_dict()):
                    raise StoreError(f"store {where} holds features of another config under the same key",
                                     "pass --rebuild to replace it")
                return "complete" if self.loc.exists(f"{rel}/{MANIFEST}") else "resume"
            if not self.remote and self.loc.exists(rel):
                # A local creation that was killed half-way: start it again (we hold the lock).
                self.loc.remove(rel)
            self._create(plan)
            return "created"

    def recorded_fingerprint(self, dataset: str, key: str) -> dict[str, Any]:
        """The dataset fingerprint a group was created with ({} before it exists)."""
        return (self._ready_attrs(dataset, key) or {}).get("fingerprint", {})

    def _ready_attrs(self, dataset: str, key: str) -> dict[str, Any] | None:
        """The group's attrs if it was fully created (attrs are written last), else None."""
        try:
            meta = json.loads(self.loc.read_bytes(self.rel(dataset, key, "zarr.json")))
        except (FileNotFoundError, ValueError):  # absent, or half-written by a killed creation
            return None
        attrs = meta.get("attributes") or {}
        return attrs if attrs.get("format") == FORMAT else None

    def _create(self, plan: GroupPlan) -> None:
        """Create every array; safe to run twice at once (remote) or after a killed creation:
        each metadata object and each small array is written whole with the same content."""
        from zarr.errors import ContainsGroupError

        store = self.zarr_store(plan.dataset, plan.key)
        try:
            group = zarr.open_group(store, mode="a")
        except ContainsGroupError:  # created by a concurrent run between zarr's check and its write
            group = zarr.open_group(store, mode="r+")
        c, bins, frames = plan.config.shape
        for fold, clips in plan.folds.items():
            n = len(clips)
            try:
                fg = group.require_group(fold_group(fold))
            except ContainsGroupError:  # the same race, one level down
                fg = group[fold_group(fold)]
            _put_array(fg, "x", shape=(n, c, bins, frames), chunks=(chunk_clips(plan.config), c, bins, frames),
                       dtype=plan.config.dtype, compressors=X_CODEC, fill_value=0)
            if plan.multilabel:
                y = np.zeros((n, len(plan.classes)), dtype=bool)
                for i, (_, label) in enumerate(clips):
                    y[i, list(label)] = True
            else:
                y = np.array([label for _, label in clips], dtype=np.int16)
            _put_array(fg, "y", data=y)
            names = np.array([p for p, _ in clips], dtype=str) if n else np.array([], dtype=str)
            _put_array(fg, "clip", data=names, dtype=str)
        if not self.remote:
            (self.root / self.rel(plan.dataset, plan.key, UNITS_DIR)).mkdir(exist_ok=True)
        # Attributes last: their presence marks a fully created layout.
        group.attrs.update(plan.attrs())

    # -- units -----------------------------------------------------------------------------
    def unit_done(self, dataset: str, key: str, unit_id: str) -> bool:
        return self.loc.exists(self.rel(dataset, key, UNITS_DIR, f"{unit_id}.json"))

    def unit_records(self, dataset: str, key: str) -> dict[str, dict[str, Any]]:
        names = [n for n in self.loc.files(self.rel(dataset, key, UNITS_DIR)) if n.endswith(".json") and "/" not in n]
        blobs = self.loc.read_many([self.rel(dataset, key, UNITS_DIR, n) for n in names])
        records = {}
        for name in names:
            try:
                records[name.removesuffix(".json")] = json.loads(blobs[self.rel(dataset, key, UNITS_DIR, name)])
            except (KeyError, ValueError):
                continue  # unreadable record: the unit is simply done again
        return records

    def write_unit(self, dataset: str, key: str, unit: Unit, x: np.ndarray, skipped: list[tuple[str, str]],
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write one whole chunk, then its record. Called in worker processes."""
        arr = zarr.open_array(self.zarr_store(dataset, key, fold_group(unit.fold), "x"), mode="r+")
        arr[unit.start:unit.stop] = x
        record = {"unit": unit.id, "fold": unit.fold, "start": unit.start, "stop": unit.stop,
                  "checksum": checksum(x), "crc32c": crc32c(x), "skipped": [list(s) for s in skipped],
                  **(extra or {})}
        self.loc.write_bytes(self.rel(dataset, key, UNITS_DIR, f"{unit.id}.json"), json.dumps(record).encode())
        return record

    # -- finalize --------------------------------------------------------------------------
    def finalize(self, plan: GroupPlan, units: list[Unit], extraction: dict[str, Any]) -> dict[str, Any]:
        """Write the ok masks and, last, the manifest. Every unit must have its record."""
        rel = self.rel(plan.dataset, plan.key)
        with self.lock(plan.dataset, plan.key):
            if self.loc.exists(f"{rel}/{MANIFEST}"):
                return self.read_manifest(plan.dataset, plan.key)
            records = self.unit_records(plan.dataset, plan.key)
            absent = [u.id for u in units if u.id not in records]
            if absent:
                raise StoreError(f"{len(absent)} write units of {self.group_path(plan.dataset, plan.key)} are not "
                                 f"finished (e.g. {absent[0]})", "rerun the same extract command to finish them")
            group = zarr.open_group(self.zarr_store(plan.dataset, plan.key), mode="r+")
            skipped = dict(plan.left_out)  # e.g. a second copy of a GTZAN clip, never in the arrays
            for r in records.values():
                for clip, reason in r["skipped"]:
                    skipped[clip] = reason
            folds: dict[str, Any] = {}
            array_sums: dict[str, str] = {}
            for fold, clips in plan.folds.items():
                ok = np.array([p not in skipped for p, _ in clips], dtype=bool)
                fg = group[fold_group(fold)]
                _put_array(fg, "ok", data=ok)
                for name in ("y", "clip", "ok"):
                    values = fg[name][:]
                    array_sums[f"{fold_group(fold)}/{name}"] = checksum(values)
                folds[fold] = {"clips": len(clips), "ok": int(ok.sum()), "skipped": int((~ok).sum()),
                               "chunks": sum(1 for u in units if u.fold == fold)}
            raw = sum(f["clips"] for f in folds.values()) * int(np.prod(plan.config.shape)) * np.dtype(plan.config.dtype).itemsize
            stored = sum(self.loc.files(rel).values())
            manifest = {
                **plan.attrs(),
                "folds": folds,
                "clips": sum(f["ok"] for f in folds.values()),
                "shape": list(plan.config.shape),
                "units": {u.id: {"fold": u.fold, "start": u.start, "stop": u.stop, "checksum": records[u.id]["checksum"],
                                 **({"crc32c": records[u.id]["crc32c"]} if "crc32c" in records[u.id] else {})}
                          for u in units},
                "arrays": array_sums,
                "skipped": [{"clip": c, "reason": r} for c, r in sorted(skipped.items())],
                "missing": plan.missing,
                "sizes": {"raw_bytes": int(raw), "stored_bytes": int(stored)},
                "extraction": extraction,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            self.write_manifest(plan.dataset, plan.key, manifest)
            return manifest

    def write_manifest(self, dataset: str, key: str, manifest: dict[str, Any]) -> None:
        self.loc.write_bytes(self.rel(dataset, key, MANIFEST), json.dumps(manifest, indent=1).encode())

    # -- reading ---------------------------------------------------------------------------
    def read_manifest(self, dataset: str, key: str) -> dict[str, Any]:
        try:
            text = self.loc.read_bytes(self.rel(dataset, key, MANIFEST))
        except FileNotFoundError:
            raise StoreError(f"{self.group_path(dataset, key)} has no manifest: the extraction did not finish",
                             "rerun the extract command to complete it") from None
        try:
            return json.loads(text)
        except ValueError:
            raise StoreError(f"{self.loc.show(self.rel(dataset, key, MANIFEST))} is not valid JSON",
                             "run audiofx cache verify, then re-extract") from None

    def has_manifest(self, dataset: str, key: str) -> bool:
        return self.loc.exists(self.rel(dataset, key, MANIFEST))

    def groups(self) -> list[tuple[str, str, Path | str]]:
        """(dataset, key, where) of every group in the store, complete or not."""
        out = []
        for ds, is_dir in self.loc.listdir():
            if not is_dir:
                continue
            for key, key_is_dir in self.loc.listdir(ds):
                if key_is_dir and self.loc.exists(self.rel(ds, key, "zarr.json")):
                    out.append((ds, key, self.group_path(ds, key)))
        return out

    def group_bytes(self, dataset: str, key: str) -> int:
        return sum(self.loc.files(self.rel(dataset, key)).values())

    def find(self, key: str) -> tuple[str, str]:
        """(dataset, key) of the group whose key starts with the given prefix."""
        hits = [(d, k) for d, k, _ in self.groups() if k.startswith(key) or f"{d}/{k}".startswith(key)]
        if not hits:
            raise StoreError(f"no feature set {key!r} in store {self}", "list them with audiofx cache ls")
        if len(hits) > 1:
            raise StoreError(f"{key!r} matches {len(hits)} feature sets in {self}", "give more characters of the key")
        return hits[0]

    def remove(self, dataset: str, key: str) -> None:
        """Delete a group, manifest first: a reader never sees a manifest without its data."""
        self.loc.remove(self.rel(dataset, key, MANIFEST))
        self.loc.remove(self.rel(dataset, key))
        if not self.remote:
            self.loc.remove(f"{dataset}/.{key}.lock")

    # -- verification ----------------------------------------------------------------------
    def verify(self, dataset: str, key: str, manifest: dict[str, Any] | None = None,
               folds: list[str] | None = None) -> list[str]:
        """Recompute every checksum; return one line per damaged unit or array (empty: intact).
        Reads the store itself (never the read-through cache). `manifest` and `folds` let a
        copy be checked against its source's manifest before its own manifest is written."""
        if manifest is None:
            try:
                manifest = self.read_manifest(dataset, key)
            except StoreError as err:
                return [err.message]
        present = set(folds if folds is not None else present_folds(manifest))
        problems = []
        readers: dict[str, ChunkReader | Exception] = {}
        for uid, unit in manifest["units"].items():
            fold = unit["fold"]
            if fold not in present:
                continue
            where = f"{dataset}/{key}/{fold_group(fold)}/x chunk {uid.rsplit('-', 1)[1]} (clips {unit['start']}-{unit['stop'] - 1})"
            if fold not in readers:
                readers[fold] = self._chunk_reader(dataset, key, fold, manifest)
            reader = readers[fold]
            try:
                if isinstance(reader, Exception):
                    raise reader
                reader.read(unit["start"], unit["stop"])  # decoded only after its bytes are checked, then checked
            except DamagedChunk as err:
                problems.append(f"{where}: checksum mismatch" if err.mismatch else f"{where}: unreadable ({err.why})")
            except Exception as err:  # noqa: BLE001 - any decode failure is damage to report
                problems.append(f"{where}: unreadable ({type(err).__name__}: {str(err)[:80]})")
        for name, expected in manifest.get("arrays", {}).items():
            if name.split("/")[0].removeprefix("fold-") not in present:
                continue
            try:
                values = zarr.open_array(self.zarr_store(dataset, key, name, read_only=True), mode="r")[:]
                got = checksum(values)
            except Exception as err:  # noqa: BLE001
                problems.append(f"{dataset}/{key}/{name}: unreadable ({type(err).__name__})")
                continue
            if got != expected:
                problems.append(f"{dataset}/{key}/{name}: checksum mismatch")
        return problems

    def _chunk_reader(self, dataset: str, key: str, fold: str, manifest: dict[str, Any]) -> ChunkReader | Exception:
        """A checked reader of the store's own copy of one fold's x (a remote one fetches each
        chunk's object whole, so that it too is checked before it is decoded); the error when
        the array itself cannot be opened."""
        x = self.rel(dataset, key, fold_group(fold), "x")
        fetch = (lambda chunk: self.loc.read_bytes(f"{x}/{chunk}")) if self.remote else None
        try:
            return ChunkReader(self.zarr_store(dataset, key, fold_group(fold), read_only=True), "x",
                               expected_chunks(manifest, fold), fetch=fetch)
        except Exception as err:  # noqa: BLE001 - reported per unit
            return err


def present_folds(manifest: dict[str, Any]) -> list[str]:
    """The folds whose data a store holds: all of them, or those a partial pull copied."""
    partial = manifest.get("partial_folds")
    return list(partial) if partial is not None else list(manifest["folds"])


def check_fold_present(store: FeatureStore, dataset: str, key: str, fold: str, manifest: dict[str, Any]) -> None:
    if fold in manifest["folds"] and fold not in present_folds(manifest):
        raise StoreError(f"fold {fold} of {dataset}/{key} was not pulled into {store}",
                         f"pull it: audiofx cache pull {key[:12]} --from URL --fold {fold} --store {store}")


def _put_array(group, name: str, data: np.ndarray | None = None, **spec) -> None:
    """Create an array, or reuse one of the same shape and type that a concurrent or killed
    run created, and (with data) write its values in place. Never deletes: deleting and
    re-creating would open a window in which a concurrent run's chunks are lost."""
    from zarr.errors import ContainsArrayError

    if data is not None:
        spec = {"shape": data.shape, "dtype": data.dtype, "chunks": (max(len(data), 1),) + data.shape[1:], **spec}
    try:
        arr = group.create_array(name, **spec)
    except ContainsArrayError:
        arr = group[name]
        kinds = {arr.dtype.kind, np.dtype(spec["dtype"]).kind}
        if tuple(arr.shape) != tuple(spec["shape"]) or (len(kinds) > 1 and not kinds <= set("OUT")):
            raise StoreError(f"array {name} of {group.store} exists with another shape ({arr.shape} vs {spec['shape']})",
                             "pass --rebuild to replace the group") from None
    if data is not None and data.size:
        arr[...] = data
