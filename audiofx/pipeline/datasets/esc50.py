"""ESC-50 and its ESC-10 subset (Piczak 2015): 2000 five-second clips, 50 classes, 5 folds.

Layout: ``audio/*.wav`` and ``meta/esc50.csv`` (filename,fold,target,category,esc10,src_file,take).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from audiofx.pipeline.datasets.base import (DatasetAdapter, DatasetIndex, official_folds_index, read_csv, register,
                                           require_root)

META = "meta/esc50.csv"
FOLDS = ["1", "2", "3", "4", "5"]
DEFAULTS = {"sample_rate": 44100, "clip_seconds": 5.0, "frames": 250}
SOURCE = "https://github.com/karolpiczak/ESC-50"
LAYOUT = "<root>/audio/*.wav and <root>/meta/esc50.csv (filename,fold,target,category,esc10,...)"


def _index(adapter: DatasetAdapter, root: Path, esc10_only: bool) -> DatasetIndex:
    require_root(adapter, root, [META])
    meta = root / META
    rows = read_csv(meta, required=["filename", "fold", "target", "category", "esc10"])
    if esc10_only:
        rows = [r for r in rows if (r["esc10"] or "").strip().lower() in ("true", "1")]
    return official_folds_index(adapter.name, root, meta, rows, file="filename", label="target", category="category",
                                folds=FOLDS, path_of=lambda fold, name: f"audio/{name}")


def index_esc50(root: Path, options: Mapping[str, Any]) -> DatasetIndex:
    return _index(ESC50, Path(root), esc10_only=False)


def index_esc10(root: Path, options: Mapping[str, Any]) -> DatasetIndex:
    return _index(ESC10, Path(root), esc10_only=True)


index = index_esc50

ESC50 = register(
    DatasetAdapter(
        name="esc50",
        description="ESC-50: 2000 environmental sound clips (5 s), 50 classes, 5 official folds",
        layout=LAYOUT,
        source=SOURCE,
        defaults=DEFAULTS,
        index=index_esc50,
    )
)

ESC10 = register(
    DatasetAdapter(
        name="esc10",
        description="ESC-10: the 400-clip, 10-class subset of ESC-50 (esc10 column true), 5 official folds",
        layout=LAYOUT,
        source=SOURCE,
        defaults=DEFAULTS,
        index=index_esc10,
        subset_of="esc50",
    )
)
