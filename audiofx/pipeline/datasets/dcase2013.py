"""DCASE 2013 acoustic scene classification (public set): 10 scenes x 10 recordings of 30 s,
44.1 kHz stereo, named ``<scene><NN>.wav`` (``bus01.wav``, ``quietstreet10.wav``).

There is no metadata file: the scene is the file name without its trailing digits. The
archive unpacks the files flat, but copies often keep them under ``audio/``; both work.
The challenge used 5-fold cross-validation, here stratified and seeded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from audiofx.errors import DatasetError
from audiofx.pipeline.datasets.base import (
    AUDIO_EXTENSIONS,
    DatasetAdapter,
    DatasetIndex,
    register,
    require_root,
    stratified_index,
)

NAME = re.compile(r"^(?P<scene>[A-Za-z_\-]+?)(?P<take>\d+)$")


def _scenes(folder: Path, prefix: str) -> list[tuple[str, str]]:
    """(relative path, scene) for every ``<scene><NN>`` audio file directly in folder."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        match = NAME.match(p.stem)
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in AUDIO_EXTENSIONS and match:
            out.append((prefix + p.name, match["scene"].lower()))
    return out


def index(root: Path, options: Mapping[str, Any]) -> DatasetIndex:
    root = Path(root)
    require_root(ADAPTER, root, [])
    flat, nested = _scenes(root, ""), _scenes(root / "audio", "audio/")
    if flat and nested:
        # Two copies would put every recording in two folds; refuse rather than guess.
        raise DatasetError(
            f"dcase2013: scene recordings found both in {root} and in {root / 'audio'}",
            "keep one copy of the recordings",
        )
    found = flat or nested
    if not found:
        raise DatasetError(
            f"dcase2013: no <scene><NN>.wav files in {root} or {root / 'audio'}; expected layout: {ADAPTER.layout}",
            f"get the data from {ADAPTER.source} and pass --root",
        )

    # Order by scene then take so the folds do not depend on directory listing order.
    found.sort(key=lambda item: (item[1], int(NAME.match(Path(item[0]).stem)["take"]), item[0]))
    return stratified_index(ADAPTER.name, root, found, options, 5, {"audio_dir": "audio" if nested else "."})


ADAPTER = register(
    DatasetAdapter(
        name="dcase2013",
        description="DCASE 2013 scene classification: 100 stereo recordings (30 s), 10 scenes, 5 stratified folds",
        layout="<root>/<scene><NN>.wav or <root>/audio/<scene><NN>.wav (e.g. bus01.wav, quietstreet10.wav)",
        source="https://archive.org/details/dcase2013_scene_classification",
        defaults={"sample_rate": 22050, "clip_seconds": 30.0, "frames": 1500},
        index=index,
        options={"folds": 5, "seed": 0},
    )
)
