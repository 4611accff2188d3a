"""FSD50K (Fonseca et al. 2022): 51k Freesound clips of 0.3-30 s, 200 AudioSet classes, multi-label.

``dev.csv`` (fname,labels,mids,split) gives the train/val folds and ``eval.csv``
(fname,labels,mids) the eval fold; ``labels`` is a comma-separated list of class names.
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

GT = "FSD50K.ground_truth"
DEV, EVAL, VOCAB = f"{GT}/dev.csv", f"{GT}/eval.csv", f"{GT}/vocabulary.csv"
FOLDS = ["train", "val", "eval"]


def _vocabulary(path: Path) -> list[str]:
    """Class names in the order of vocabulary.csv (headerless rows: index,label,mid)."""
    entries: list[tuple[int, str]] = []
    with metadata_text(path) as f:
        for row in csv.reader(f):
            if not row:
                continue
            try:
                entries.append((int(row[0]), row[1].strip()))
            except (ValueError, IndexError):
                raise DatasetError(f"{path}: row {row!r} is not index,label,mid", "is this the official vocabulary?")
    return [name for _, name in sorted(entries)]


def index(root: Path, options: Mapping[str, Any]) -> DatasetIndex:
    root = Path(root)
    require_root(ADAPTER, root, [DEV, EVAL])
    items: list[tuple[str, list[str], str]] = []
    seen: set[str] = set()
    for rel, audio_dir in ((DEV, "FSD50K.dev_audio"), (EVAL, "FSD50K.eval_audio")):
        meta = root / rel
        required = ["fname", "labels", "split"] if rel == DEV else ["fname", "labels"]
        for row in read_csv(meta, required=required):
            fold = row["split"].strip() if rel == DEV else "eval"
            if fold not in ("train", "val", "eval"):
                raise DatasetError(f"{meta}: split {fold!r} for {row['fname']} is not train or val", "is this the official dev.csv?")
            path = f"{audio_dir}/" + safe_relpath(root, row["fname"].strip() + ".wav", meta)
            if path in seen:
                raise DatasetError(f"{meta}: {row['fname']} is listed twice", "is this the official ground truth?")
            seen.add(path)
            names = [n.strip() for n in row["labels"].split(",") if n.strip()]
            if not names:
                raise DatasetError(f"{meta}: {row['fname']} has no labels", "is this the official ground truth?")
            items.append((path, names, fold))

    used = {n for _, names, _ in items for n in names}
    metadata = [root / DEV, root / EVAL]
    if (root / VOCAB).is_file():
        # The official vocabulary fixes the class order, so label indices match other FSD50K tools.
        classes = _vocabulary(root / VOCAB)
        metadata.append(root / VOCAB)
        unknown = sorted(used - set(classes))
        if unknown:
            raise DatasetError(f"{root / VOCAB}: label {unknown[0]!r} used in the ground truth is missing", "is the vocabulary from the same release?")
    else:
        classes = sorted(used)
    label = {name: i for i, name in enumerate(classes)}
    return DatasetIndex(
        name=ADAPTER.name,
        root=root,
        clips=[Clip(path, tuple(sorted({label[n] for n in names})), fold) for path, names, fold in items],
        classes=classes,
        folds=list(FOLDS),
        multilabel=True,
        metadata_files=metadata,
        options={},
    )


ADAPTER = register(
    DatasetAdapter(
        name="fsd50k",
        description="FSD50K: 51k Freesound clips (0.3-30 s), 200 classes, multi-label, train/val/eval",
        layout=(
            "<root>/FSD50K.dev_audio/*.wav, <root>/FSD50K.eval_audio/*.wav and "
            "<root>/FSD50K.ground_truth/dev.csv, eval.csv"
        ),
        source="https://zenodo.org/record/4060432",
        defaults={"sample_rate": 22050, "clip_seconds": 10.0, "frames": 500},
        index=index,
    )
)
