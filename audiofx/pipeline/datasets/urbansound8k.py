"""UrbanSound8K (Salamon et al. 2014): 8732 urban sound slices of up to 4 s, 10 classes, 10 folds.

The files keep their original rates (8 to 192 kHz), channel counts and bit depths (8-bit
unsigned to float); decoding normalises them, the adapter only lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from audiofx.errors import DatasetError
from audiofx.pipeline.datasets.base import (
    Clip,
    DatasetAdapter,
    DatasetIndex,
    dense_labels,
    int_field,
    read_csv,
    register,
    require_root,
    safe_relpath,
)

META = "metadata/UrbanSound8K.csv"
FOLDS = [str(i) for i in range(1, 11)]


def index(root: Path, options: Mapping[str, Any]) -> DatasetIndex:
    root = Path(root)
    require_root(ADAPTER, root, [META])
    meta = root / META
    rows = read_csv(meta, required=["slice_file_name", "fold", "classID", "class"])

    names: dict[int, str] = {}
    items: list[tuple[str, int, str]] = []
    seen: set[str] = set()
    for row in rows:
        class_id = int_field(row["classID"], "classID", meta)
        fold = str(int_field(row["fold"], "fold", meta))
        if fold not in FOLDS:
            raise DatasetError(f"{meta}: fold {fold} is not one of 1..10", "is this the official metadata file?")
        if names.setdefault(class_id, row["class"]) != row["class"]:
            raise DatasetError(
                f"{meta}: classID {class_id} is both {names[class_id]!r} and {row['class']!r}",
                "is this the official metadata file?",
            )
        # The fold decides the folder; validate the bare name before joining so an absolute
        # name cannot hide behind the prefix.
        path = f"audio/fold{fold}/" + safe_relpath(root, row["slice_file_name"], meta)
        if path in seen:
            raise DatasetError(f"{meta}: {row['slice_file_name']} is listed twice", "is this the official metadata file?")
        seen.add(path)
        items.append((path, class_id, fold))

    rank, classes = dense_labels(names)
    return DatasetIndex(
        name=ADAPTER.name,
        root=root,
        clips=[Clip(path, rank[c], fold) for path, c, fold in items],
        classes=classes,
        folds=list(FOLDS),
        metadata_files=[meta],
        options={},
    )


ADAPTER = register(
    DatasetAdapter(
        name="urbansound8k",
        description="UrbanSound8K: 8732 urban sound slices (<= 4 s, mixed rates/depths), 10 classes, 10 official folds",
        layout="<root>/audio/fold1..fold10/*.wav and <root>/metadata/UrbanSound8K.csv",
        source="https://urbansounddataset.weebly.com/urbansound8k.html",
        defaults={"sample_rate": 22050, "clip_seconds": 4.0, "frames": 250},
        index=index,
    )
)
