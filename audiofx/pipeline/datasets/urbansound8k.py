"""UrbanSound8K (Salamon et al. 2014): 8732 urban sound slices of up to 4 s, 10 classes, 10 folds.

The files keep their original rates (8 to 192 kHz), channel counts and bit depths (8-bit
unsigned to float); decoding normalises them, the adapter only lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from audiofx.pipeline.datasets.base import (DatasetAdapter, DatasetIndex, official_folds_index, read_csv, register,
                                           require_root)

META = "metadata/UrbanSound8K.csv"
FOLDS = [str(i) for i in range(1, 11)]


def index(root: Path, options: Mapping[str, Any]) -> DatasetIndex:
    root = Path(root)
    require_root(ADAPTER, root, [META])
    meta = root / META
    rows = read_csv(meta, required=["slice_file_name", "fold", "classID", "class"])
    return official_folds_index(ADAPTER.name, root, meta, rows, file="slice_file_name", label="classID",
                                category="class", folds=FOLDS, path_of=lambda fold, name: f"audio/fold{fold}/{name}")


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
