"""GTZAN genre collection (Tzanetakis & Cook 2002): 1000 thirty-second excerpts, 10 genres.

There is no metadata file and no official split: the genre is the folder, and folds are
either stratified k-fold (seeded), one stratified seeded train/val/test split
(``--set ratios=70/15/15``, Lin 2022's protocol), or read from a published split file
(path,fold CSV).
The original release is ``.au``; converted copies (``.wav`` and others) index the same way
and, because clips are ordered by genre and file stem, get the same folds.
"""

from __future__ import annotations

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
    read_split_file,
    register,
    require_root,
    stratified_index,
)


def _list_audio(genres_dir: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(relative path, genre) for every clip, and the duplicates left out."""
    found: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    for genre_dir in sorted(p for p in genres_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        # Hidden files include macOS "._blues.00000.au" resource forks, which are not audio.
        files = [
            p for p in genre_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in AUDIO_EXTENSIONS
        ]
        # A clip converted in place (blues.00000.au next to blues.00000.wav) must count once.
        by_stem: dict[str, list[Path]] = {}
        for p in files:
            by_stem.setdefault(p.stem, []).append(p)
        for stem in sorted(by_stem):
            copies = sorted(by_stem[stem], key=lambda p: (AUDIO_EXTENSIONS.index(p.suffix.lower()), p.name))
            keep = f"genres/{genre_dir.name}/{copies[0].name}"
            found.append((keep, genre_dir.name))
            skipped += [(f"genres/{genre_dir.name}/{p.name}", f"duplicate of {keep}") for p in copies[1:]]
    return found, skipped


def index(root: Path, options: Mapping[str, Any]) -> DatasetIndex:
    root = Path(root)
    require_root(ADAPTER, root, ["genres"])
    found, skipped = _list_audio(root / "genres")
    if not found:
        raise DatasetError(
            f"gtzan: no audio files in {root / 'genres'}/<genre>/; expected layout: {ADAPTER.layout}",
            f"get the data from {ADAPTER.source} and pass --root",
        )
    classes = sorted({genre for _, genre in found})
    label = {name: i for i, name in enumerate(classes)}
    split = options.get("split")
    if split and options.get("ratios") is not None:
        raise ConfigError("--split (a split file) and --set ratios=... both say where clips go", "give one of them")

    if split:
        split_path = Path(split).expanduser()
        folds_of = read_split_file(split_path, root, {path for path, _ in found})
        # Clips the split does not mention are left out, as in the published filtered splits.
        clips = [Clip(path, label[genre], folds_of[path]) for path, genre in found if path in folds_of]
        return DatasetIndex(
            name=ADAPTER.name,
            root=root,
            clips=clips,
            classes=classes,
            folds=fold_order(list(folds_of.values())),
            metadata_files=[split_path],
            options={"folds": None, "seed": None, "split": file_sha256(split_path)},
            skipped=skipped,
        )

    return stratified_index(ADAPTER.name, root, found, options, 10, {"split": None}, skipped)


ADAPTER = register(
    DatasetAdapter(
        name="gtzan",
        description="GTZAN: 1000 music excerpts (30 s), 10 genres; stratified k folds, ratios=70/15/15 or a split file",
        layout="<root>/genres/<genre>/<genre>.000NN.au (or .wav copies)",
        source="http://marsyas.info/downloads/datasets.html",
        defaults={"sample_rate": 22050, "clip_seconds": 30.0, "frames": 1500},
        index=index,
        options={"folds": 10, "seed": 0, "split": None, "ratios": None},
    )
)
