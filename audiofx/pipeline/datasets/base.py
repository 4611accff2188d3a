"""What every dataset adapter returns, the registry of adapters, and shared helpers.

An adapter reads a dataset's official layout and metadata and returns a DatasetIndex: the
list of clips as (relative path, label, fold), the class names and the dataset's default
audio settings. It never decodes audio and never writes anything (except ``demo``, which
generates its synthetic files on first use).
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from audiofx.errors import ConfigError, DatasetError


@dataclass(frozen=True)
class Clip:
    path: str  # POSIX path relative to the dataset root
    label: int | tuple[int, ...]  # class index; a tuple of indices for multi-label sets
    fold: str  # official fold name: "1".."10", "train", "val", "eval", ...


@dataclass
class DatasetIndex:
    name: str
    root: Path
    clips: list[Clip]
    classes: list[str]
    folds: list[str]  # in order
    multilabel: bool = False
    metadata_files: list[Path] = field(default_factory=list)  # hashed into the fingerprint
    options: dict[str, Any] = field(default_factory=dict)  # dataset options that shape the index
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) known before decoding


@dataclass(frozen=True)
class DatasetAdapter:
    """A registered dataset: how to find it, what it looks like, and how to index it."""

    name: str
    description: str
    layout: str  # the expected layout, shown when the root is missing
    source: str  # where to get the data
    defaults: Mapping[str, Any]  # FeatureConfig defaults: sample_rate, clip_seconds, frames
    index: Callable[[Path, Mapping[str, Any]], DatasetIndex]
    options: Mapping[str, Any] = field(default_factory=dict)  # dataset options and their defaults
    subset_of: str | None = None  # a dataset holding every clip of this one (ESC-10's are ESC-50's)


REGISTRY: dict[str, DatasetAdapter] = {}


def register(adapter: DatasetAdapter) -> DatasetAdapter:
    REGISTRY[adapter.name] = adapter
    return adapter


def require_root(adapter: DatasetAdapter, root: Path, must_exist: Sequence[str]) -> None:
    """Fail with the expected layout and the download source when the root looks wrong."""
    missing = [p for p in must_exist if not (root / p).exists()]
    if not root.is_dir() or missing:
        what = f"{root} does not exist" if not root.is_dir() else f"{root} has no {missing[0]}"
        raise DatasetError(
            f"{adapter.name}: {what}; expected layout: {adapter.layout}",
            f"get the data from {adapter.source} and pass --root",
        )


def metadata_text(path: Path) -> io.StringIO:
    """A metadata file's text, for csv readers (a BOM is dropped); a file that is not UTF-8 is a
    DatasetError naming it and the first byte that is not."""
    raw = path.read_bytes()
    try:
        return io.StringIO(raw.decode("utf-8-sig"), newline="")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})",
                           "save it as UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def printable_path(path: str) -> str:
    """A file name as it can be shown and recorded: bytes that are not UTF-8 as \\xNN."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def safe_relpath(root: Path, path: str, source: Path | str) -> str:
    """A metadata path as POSIX relative to root; rejects absolute paths, '..' escapes and NUL bytes."""
    if "\0" in path:
        raise DatasetError(f"{source}: path {printable_path(path)!r} holds a NUL byte", "no file name can: fix the row")
    p = PurePosixPath(path.replace("\\", "/"))
    if p.is_absolute() or path.startswith(("/", "\\")) or (len(path) > 1 and path[1] == ":"):
        raise DatasetError(f"{source}: path {path!r} is absolute", "metadata paths must be relative to the dataset root")
    if ".." in p.parts:
        raise DatasetError(f"{source}: path {path!r} escapes the dataset root", "remove '..' from metadata paths")
    return p.as_posix()


OFFICIAL_METADATA = "is this the official metadata file?"  # the hint when a metadata file is not as published


def read_csv(path: Path, delimiter: str = ",", required: Sequence[str] = ()) -> list[dict[str, str]]:
    """Read a metadata CSV; a missing file or column is a DatasetError naming the file."""
    if not path.is_file():
        raise DatasetError(f"metadata file {path} is missing", "check --root points at the dataset's top folder")
    reader = csv.DictReader(metadata_text(path), delimiter=delimiter)
    rows = list(reader)
    columns = reader.fieldnames or []
    absent = [c for c in required if c not in columns]
    if absent:
        raise DatasetError(
            f"{path}: column(s) {', '.join(absent)} missing (found: {', '.join(columns) or 'none'})",
            OFFICIAL_METADATA,
        )
    return rows


def stratified_folds(labels: Sequence[int], k: int, seed: int) -> list[int]:
    """Stratified k-fold assignment (1-based), deterministic for a seed.

    scikit-learn's StratifiedKFold is the reference implementation; this wrapper returns
    the fold number of every item instead of index arrays.
    """
    from sklearn.model_selection import StratifiedKFold

    if k < 2:
        raise ConfigError(f"folds must be at least 2, got {k}", "write --set folds=5")
    y = np.asarray(labels)
    counts = np.bincount(y)
    if counts[counts > 0].min() < k:
        raise DatasetError(
            f"a class has only {counts[counts > 0].min()} clips, fewer than the {k} folds asked for",
            "ask for fewer folds with --set folds=N",
        )
    fold = np.zeros(len(y), dtype=int)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y), start=1):
        fold[test] = i
    return fold.tolist()


def int_field(value: str, column: str, path: Path) -> int:
    """An integer cell of an official metadata CSV; anything else names the file and column."""
    try:
        return int(value.strip())
    except (ValueError, AttributeError):
        raise DatasetError(f"{path}: {column} {value!r} is not an integer", OFFICIAL_METADATA) from None


def official_folds_index(name: str, root: Path, meta: Path, rows: Sequence[Mapping[str, str]], *, file: str,
                         label: str, category: str, folds: Sequence[str],
                         path_of: Callable[[str, str], str]) -> DatasetIndex:
    """The clips of an official metadata CSV that gives each file its fold, integer label and
    class name (ESC-50, UrbanSound8K), checked: a fold outside ``folds``, one label under two
    names or a file listed twice is refused. ``path_of(fold, bare name)`` places the file; the
    bare name is validated first, since a prefix could hide an absolute one ("audio/" +
    "/etc/x" normalises to a harmless-looking path)."""
    names: dict[int, str] = {}
    items: list[tuple[str, int, str]] = []
    seen: set[str] = set()
    for row in rows:
        target = int_field(row[label], label, meta)
        fold = str(int_field(row["fold"], "fold", meta))
        if fold not in folds:
            raise DatasetError(f"{meta}: fold {fold} is not one of {folds[0]}..{folds[-1]}", OFFICIAL_METADATA)
        if names.setdefault(target, row[category]) != row[category]:
            raise DatasetError(f"{meta}: {label} {target} is both {names[target]!r} and {row[category]!r}",
                               OFFICIAL_METADATA)
        path = path_of(fold, safe_relpath(root, row[file], meta))
        if path in seen:
            raise DatasetError(f"{meta}: {row[file]} is listed twice", OFFICIAL_METADATA)
        seen.add(path)
        items.append((path, target, fold))
    rank, classes = dense_labels(names)  # labels may have gaps (ESC-10's targets)
    return DatasetIndex(name=name, root=root, clips=[Clip(path, rank[t], fold) for path, t, fold in items],
                        classes=classes, folds=list(folds), metadata_files=[meta], options={})


def int_option(options: Mapping[str, Any], key: str, default: int) -> int:
    """A dataset option that must be an integer (``--set folds=5``)."""
    value = options.get(key, default)
    try:
        if isinstance(value, bool):
            raise TypeError
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be an integer, got {value!r}", f"write --set {key}=<integer>") from None


def fold_order(names: list[str]) -> list[str]:
    """Numeric fold names sort as numbers ("2" before "10"); others keep their first appearance."""
    unique = list(dict.fromkeys(names))
    return sorted(unique, key=int) if all(n.isdigit() for n in unique) else unique


def parse_ratios(value: Any) -> tuple[int, int, int]:
    """``--set ratios=70/15/15`` (or 70,15,15): train/validation/test percentages, whole
    numbers that sum to 100, validation may be 0."""
    parts = value if isinstance(value, (tuple, list)) else str(value).replace(",", "/").split("/")
    try:
        numbers = tuple(int(str(p).strip()) for p in parts)
    except ValueError:
        numbers = ()
    if len(numbers) != 3 or sum(numbers) != 100 or min(numbers) < 0 or not numbers[0] or not numbers[2]:
        raise ConfigError(f"ratios {value!r} is not train/validation/test percentages that sum to 100",
                          "write --set ratios=70/15/15 (train and test above 0)")
    return numbers  # type: ignore[return-value]


def stratified_holdout(labels: Sequence[int], ratios: tuple[int, int, int], seed: int) -> list[str]:
    """train / val / test of every item, stratified by label and deterministic for a seed:
    the test share is drawn first, then the validation share of the rest (scikit-learn's
    train_test_split, given the counts: each share of n rounded to the nearest clip). Every
    part must hold every class once at least (a stratified split needs it)."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(labels)
    n = len(y)
    n_test = round(n * ratios[2] / 100)
    n_val = round(n * ratios[1] / 100)
    counts = np.bincount(y)
    classes = int((counts > 0).sum())
    parts = [n_test, n - n_test - n_val] + ([n_val] if n_val else [])
    if counts[counts > 0].min() < len(parts) or min(parts) < classes:
        raise DatasetError(f"{n} clips cannot be split {'/'.join(map(str, ratios))} with every class in each part",
                           "use k folds instead (--set folds=N) or other ratios")
    split = np.full(n, "train", dtype=object)
    rest, test = train_test_split(np.arange(n), test_size=n_test, stratify=y, random_state=seed)
    split[test] = "test"
    if n_val:
        _, val = train_test_split(rest, test_size=n_val, stratify=y[rest], random_state=seed)
        split[val] = "val"
    return split.tolist()


def stratified_index(name: str, root: Path, found: list[tuple[str, str]], options: Mapping[str, Any],
                     default_folds: int, extra_options: Mapping[str, Any] | None = None,
                     skipped: list[tuple[str, str]] | None = None) -> DatasetIndex:
    """Index of (path, class name) pairs with seeded stratified k folds (``folds``, ``seed``),
    or with one seeded stratified train/val/test split when ``ratios`` is given (Lin 2022's
    GTZAN: 70/15/15).

    For datasets without official folds (GTZAN, DCASE 2013, a folder of your own): classes
    are the sorted names, labels their positions. ``found`` must already be in a stable order
    so the folds do not depend on directory listing order.
    """
    classes = sorted({cls for _, cls in found})
    label = {cls: i for i, cls in enumerate(classes)}
    seed = int_option(options, "seed", 0)
    labels = [label[cls] for _, cls in found]
    if options.get("ratios") is not None:
        ratios = parse_ratios(options["ratios"])
        split = stratified_holdout(labels, ratios, seed)
        # Recorded as given, and only when given: the key of every k-fold store stays as it was.
        return DatasetIndex(
            name=name,
            root=root,
            clips=[Clip(path, y, part) for (path, _), y, part in zip(found, labels, split)],
            classes=classes,
            folds=["train", "val", "test"] if ratios[1] else ["train", "test"],
            options={"folds": None, "seed": seed, "ratios": "/".join(map(str, ratios)), **(extra_options or {})},
            skipped=list(skipped or []),
        )
    k = int_option(options, "folds", default_folds)
    fold = stratified_folds(labels, k, seed)
    return DatasetIndex(
        name=name,
        root=root,
        clips=[Clip(path, y, str(f)) for (path, _), y, f in zip(found, labels, fold)],
        classes=classes,
        folds=[str(i) for i in range(1, k + 1)],
        options={"folds": k, "seed": seed, **(extra_options or {})},
        skipped=list(skipped or []),
    )


def dense_labels(names: Mapping[int, str]) -> tuple[dict[int, int], list[str]]:
    """Official class ids -> labels 0..C-1 in id order, and the class names in label order.

    On a full official CSV the id is the label already; a trimmed CSV (or ESC-10) has gaps
    that would otherwise leave classes without names.
    """
    order = sorted(names)
    return {cid: i for i, cid in enumerate(order)}, [names[cid] for cid in order]


def read_split_file(path: Path, root: Path, known: set[str]) -> dict[str, str]:
    """A published split as CSV rows of path,fold (a header row is optional)."""
    if not path.is_file():
        raise DatasetError(f"split file {path} is missing", "pass an existing CSV of path,fold")
    out: dict[str, str] = {}
    for row in csv.reader(metadata_text(path)):
        if not row or row[0].strip().lower() in ("path", "filename", "file"):
            continue
        if len(row) < 2:
            raise DatasetError(f"{path}: row {row!r} is not path,fold", "write one path,fold per line")
        rel = safe_relpath(root, row[0].strip(), path)
        out[rel] = row[1].strip()
    unknown = [p for p in out if p not in known]
    if unknown:
        raise DatasetError(
            f"{path}: {len(unknown)} path(s) are not in the dataset, e.g. {unknown[0]}",
            "paths must be relative to the dataset root",
        )
    return out


def default_root(dataset: str) -> Path:
    """Where a dataset lives unless --root says otherwise: extract reads it there and
    download writes it there, so `download X` then `extract --dataset X` just works."""
    return Path("data/raw") / dataset


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MB blocks (hashlib.file_digest needs Python 3.11)."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    return file_digest(path, "sha256")


AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".au", ".aiff", ".aif", ".mp3", ".snd")
