"""TUT Urban Acoustic Scenes 2018 and TAU Urban Acoustic Scenes 2019 (development sets):
10-second 48 kHz stereo segments, 10 scenes, one official train/evaluate setup.

``meta.csv`` (tab-separated: filename, scene_label, identifier, source_label) lists every
segment; ``evaluation_setup/fold1_train.csv`` and ``fold1_evaluate.csv`` pick the two folds.
Segments in neither file (TAU 2019 leaves some out to keep recording locations apart) are
not part of the setup and are left out of the index.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping

from audiofx.errors import DatasetError
from audiofx.pipeline.datasets.base import (
    Clip,
    DatasetAdapter,
    DatasetIndex,
    metadata_text,
    read_csv,
    register,
    require_root,
    safe_relpath,
)

META = "meta.csv"
SPLITS = {"train": "evaluation_setup/fold1_train.csv", "evaluate": "evaluation_setup/fold1_evaluate.csv"}
DEFAULTS = {"sample_rate": 48000, "clip_seconds": 10.0, "frames": 500}
LAYOUT = (
    "<root>/audio/*.wav, <root>/meta.csv (tab-separated) and "
    "<root>/evaluation_setup/fold1_train.csv, fold1_evaluate.csv"
)


def _split_files(root: Path, path: Path) -> list[str]:
    """File names in a setup file: first column, with or without a header row.

    Releases differ: the evaluate file has ``filename\\tscene_label`` in some and only
    ``filename`` (or no header at all) in others; the scene always comes from meta.csv.
    """
    out = []
    with metadata_text(path) as f:
        for i, row in enumerate(csv.reader(f, delimiter="\t")):
            if not row or not row[0].strip() or (i == 0 and row[0].strip().lower() == "filename"):
                continue
            out.append(safe_relpath(root, row[0].strip(), path))
    return out


def _index(adapter: DatasetAdapter, root: Path) -> DatasetIndex:
    root = Path(root)
    require_root(adapter, root, [META, *SPLITS.values()])
    meta = root / META
    scene: dict[str, str] = {}
    for row in read_csv(meta, delimiter="\t", required=["filename", "scene_label"]):
        path = safe_relpath(root, row["filename"].strip(), meta)
        if path in scene:
            raise DatasetError(f"{meta}: {path} is listed twice", "is this the official meta.csv?")
        scene[path] = row["scene_label"].strip()

    fold_of: dict[str, str] = {}
    for fold, rel in SPLITS.items():
        for path in _split_files(root, root / rel):
            if path not in scene:
                raise DatasetError(f"{root / rel}: {path} is not in {meta}", "is meta.csv from the same release?")
            if fold_of.setdefault(path, fold) != fold:
                raise DatasetError(
                    f"{root / rel}: {path} is in both the train and the evaluate setup",
                    "the two setup files must not overlap",
                )

    # meta.csv order, so the index does not depend on which setup file lists a clip first.
    kept = [path for path in scene if path in fold_of]
    classes = sorted({scene[p] for p in kept})
    label = {name: i for i, name in enumerate(classes)}
    return DatasetIndex(
        name=adapter.name,
        root=root,
        clips=[Clip(p, label[scene[p]], fold_of[p]) for p in kept],
        classes=classes,
        folds=list(SPLITS),
        metadata_files=[meta, *(root / rel for rel in SPLITS.values())],
        options={},
    )


def index_tut2018(root: Path, options: Mapping[str, Any]) -> DatasetIndex:
    return _index(TUT2018, root)


def index_tau2019(root: Path, options: Mapping[str, Any]) -> DatasetIndex:
    return _index(TAU2019, root)


index = index_tut2018

TUT2018 = register(
    DatasetAdapter(
        name="tut2018",
        description="TUT Urban Acoustic Scenes 2018 (development): 10 s stereo segments, 10 scenes, train/evaluate",
        layout=LAYOUT,
        source="https://zenodo.org/record/1228142",
        defaults=DEFAULTS,
        index=index_tut2018,
    )
)

TAU2019 = register(
    DatasetAdapter(
        name="tau2019",
        description="TAU Urban Acoustic Scenes 2019 (development): 10 s stereo segments, 10 scenes, train/evaluate",
        layout=LAYOUT,
        source="https://zenodo.org/record/2589280",
        defaults=DEFAULTS,
        index=index_tau2019,
    )
)
