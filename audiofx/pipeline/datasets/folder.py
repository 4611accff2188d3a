"""Your own audio: one subfolder per class, or a split CSV of path,label,fold.

Without a split file the class is the top-level subfolder (files may sit deeper inside it)
and folds are stratified k-fold, seeded. With ``split=<csv>`` the CSV is the whole truth:
exactly its rows, its labels and its folds.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping

from audiofx.errors import ConfigError, DatasetError
from audiofx.pipeline.datasets.base import (
    AUDIO_EXTENSIONS,
    Clip,
    DatasetAdapter,
    DatasetIndex,
    file_sha256,
    fold_order,
    metadata_text,
    register,
    require_root,
    safe_relpath,
    stratified_index,
)

HINT = "put each class's audio in its own subfolder (<root>/<class>/*.wav) or pass --set split=<csv of path,label,fold>"


BROKEN_LINK = "a symbolic link that leads to no file (dangling, or a loop): left out; fix or remove the link"


def _audio_files(class_dir: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Audio files under class_dir as POSIX paths relative to its parent, sorted, and the
    audio-named symbolic links that lead nowhere, as (path, reason): said, never silently dropped."""
    out, broken = [], []
    for p in class_dir.rglob("*"):
        rel = p.relative_to(class_dir.parent)
        # Hidden entries include macOS "._x.wav" resource forks, which are not audio.
        if p.suffix.lower() not in AUDIO_EXTENSIONS or any(s.startswith(".") for s in rel.parts):
            continue
        if p.is_file():  # follows links: a link to an audio file is that file
            out.append(rel.as_posix())
        elif p.is_symlink() and not p.exists():  # exists() is False for a dangling link and for a loop
            broken.append((rel.as_posix(), BROKEN_LINK))
    return sorted(out), sorted(broken)


def _from_split(root: Path, split_path: Path) -> DatasetIndex:
    if not split_path.is_file():
        raise DatasetError(f"split file {split_path} is missing", "pass an existing CSV of path,label,fold")
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    with metadata_text(split_path) as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or (i == 0 and row[0].strip().lower() in ("path", "filename", "file")):
                continue
            if len(row) < 3 or not row[1].strip() or not row[2].strip():
                raise DatasetError(f"{split_path}: row {row!r} is not path,label,fold", "write one path,label,fold per line")
            path = safe_relpath(root, row[0].strip(), split_path)
            if path in seen:
                raise DatasetError(f"{split_path}: {path} is listed twice", "list every file once")
            seen.add(path)
            rows.append((path, row[1].strip(), row[2].strip()))
    if not rows:
        raise DatasetError(f"{split_path}: no rows", "write one path,label,fold per line")
    classes = sorted({label for _, label, _ in rows})
    index_of = {name: i for i, name in enumerate(classes)}
    return DatasetIndex(
        name=ADAPTER.name,
        root=root,
        clips=[Clip(path, index_of[label], fold) for path, label, fold in rows],
        classes=classes,
        folds=fold_order([fold for _, _, fold in rows]),
        metadata_files=[split_path],
        # With a split file, folds and seed play no part: only the file's content does.
        options={"folds": None, "seed": None, "split": file_sha256(split_path)},
    )


def index(root: Path, options: Mapping[str, Any]) -> DatasetIndex:
    root = Path(root)
    require_root(ADAPTER, root, [])
    split = options.get("split")
    if split and options.get("ratios") is not None:
        raise ConfigError("--split (a split file) and --set ratios=... both say where clips go", "give one of them")
    if split:
        return _from_split(root, Path(split).expanduser())

    found: list[tuple[str, str]] = []
    broken: list[tuple[str, str]] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        # Subfolders without audio (notes, a previous run's output) are not classes.
        files, links = _audio_files(class_dir)
        found += [(path, class_dir.name) for path in files]
        broken += links
    if not found:
        raise DatasetError(f"folder: {root} has no class subfolder with audio ({', '.join(AUDIO_EXTENSIONS)})", HINT)
    return stratified_index(ADAPTER.name, root, found, options, 5, {"split": None}, skipped=broken)


ADAPTER = register(
    DatasetAdapter(
        name="folder",
        description="Your own audio: one subfolder per class (stratified k folds) or a path,label,fold split CSV",
        layout="<root>/<class>/**/*.{wav,flac,ogg,...}, one subfolder per class (or --set split=<csv of path,label,fold>)",
        source="your own audio",
        defaults={"sample_rate": 22050, "clip_seconds": 5.0, "frames": 250},
        index=index,
        options={"folds": 5, "seed": 0, "split": None, "ratios": None},
    )
)
