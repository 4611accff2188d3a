"""DCASE 2013 acoustic scene classification: 10 scenes x 10 recordings of 30 s, 44.1 kHz
stereo, named ``<scene><NN>.wav`` (``bus01.wav``, ``quietstreet10.wav``), in a development
set and an evaluation (test) set of the same form.

There is no metadata file: the scene is the file name without its trailing digits. The
development archive unpacks its files flat, but copies often keep them under ``audio/``;
both work. The evaluation set (``scenes_stereo_testset.zip``, released after the challenge)
goes in ``<root>/test/`` (or ``<root>/scenes_stereo_testset/``).

Two protocols:
- ``folds=5`` (the default; any k): the challenge's cross-validation, stratified seeded k
  folds of the development set (100 clips).
- ``folds=2``: the official two folds of the papers, the development set as fold 1 and the
  evaluation set as fold 2 (200 clips): Hornauer et al. ("DCASE 2013 ... 200 ... 1 of 2")
  and Lin 2022 ("200 total samples ... divided into 2 different folds").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from audiofx.errors import DatasetError
from audiofx.pipeline.datasets.base import (
    AUDIO_EXTENSIONS,
    Clip,
    DatasetAdapter,
    DatasetIndex,
    int_option,
    register,
    require_root,
    stratified_index,
)

NAME = re.compile(r"^(?P<scene>[A-Za-z_\-]+?)(?P<take>\d+)$")
TEST_DIRS = ("test", "scenes_stereo_testset")
OFFICIAL_FOLDS = 2


def _scenes(folder: Path, prefix: str) -> list[tuple[str, str]]:
    """(relative path, scene) for every ``<scene><NN>`` audio file directly in folder."""
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        match = NAME.match(p.stem)
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in AUDIO_EXTENSIONS and match:
            out.append((prefix + p.name, match["scene"].lower()))
    # By scene then take, so that folds do not depend on the directory listing's order.
    return sorted(out, key=lambda item: (item[1], int(NAME.match(Path(item[0]).stem)["take"]), item[0]))


def _development(root: Path) -> tuple[list[tuple[str, str]], str]:
    flat, nested = _scenes(root, ""), _scenes(root / "audio", "audio/")
    if flat and nested:
        # Two copies would put every recording in two folds; refuse rather than guess.
        raise DatasetError(f"dcase2013: scene recordings found both in {root} and in {root / 'audio'}",
                           "keep one copy of the recordings")
    found = flat or nested
    if not found:
        raise DatasetError(
            f"dcase2013: no <scene><NN>.wav files in {root} or {root / 'audio'}; expected layout: {ADAPTER.layout}",
            f"get the data from {ADAPTER.source} and pass --root",
        )
    return found, "audio" if nested else "."


def _evaluation(root: Path) -> tuple[list[tuple[str, str]], str]:
    sets = [(d, _scenes(root / d, f"{d}/")) for d in TEST_DIRS]
    sets = [(d, found) for d, found in sets if found]
    if len(sets) > 1:
        raise DatasetError(f"dcase2013: evaluation recordings found in both {root / sets[0][0]} and "
                           f"{root / sets[1][0]}", "keep one copy of the evaluation set")
    if not sets:
        raise DatasetError(
            f"dcase2013: --set folds=2 (the official development/evaluation folds) needs the evaluation set, but "
            f"{' and '.join(str(root / d) for d in TEST_DIRS)} hold no <scene><NN>.wav files",
            f"unpack scenes_stereo_testset.zip ({TEST_SOURCE}) into {root / 'test'}, or use --set folds=5")
    return sets[0][1], sets[0][0]


def index(root: Path, options: Mapping[str, Any]) -> DatasetIndex:
    root = Path(root)
    require_root(ADAPTER, root, [])
    development, audio_dir = _development(root)
    if int_option(options, "folds", 5) != OFFICIAL_FOLDS:
        return stratified_index(ADAPTER.name, root, development, options, 5, {"audio_dir": audio_dir})
    evaluation, test_dir = _evaluation(root)
    classes = sorted({scene for _, scene in development})
    unknown = sorted({scene for _, scene in evaluation} - set(classes))
    if unknown:
        raise DatasetError(f"dcase2013: the evaluation set in {root / test_dir} has scenes the development set has "
                           f"not: {', '.join(unknown)}", "check that both folders hold the DCASE 2013 scenes")
    label = {scene: i for i, scene in enumerate(classes)}
    clips = [Clip(path, label[scene], fold) for fold, found in (("1", development), ("2", evaluation))
             for path, scene in found]
    return DatasetIndex(name=ADAPTER.name, root=root, clips=clips, classes=classes, folds=["1", "2"],
                        options={"folds": OFFICIAL_FOLDS, "seed": None, "audio_dir": audio_dir, "test_dir": test_dir})


TEST_SOURCE = "https://archive.org/details/dcase2013_scene_classification_testset"

ADAPTER = register(
    DatasetAdapter(
        name="dcase2013",
        description="DCASE 2013 scene classification: 100 stereo recordings (30 s), 10 scenes, 5 stratified folds; "
                    "folds=2: development and evaluation sets (200)",
        layout="<root>/<scene><NN>.wav or <root>/audio/<scene><NN>.wav (e.g. bus01.wav, quietstreet10.wav); "
               "for folds=2 the evaluation set in <root>/test/<scene><NN>.wav",
        source="https://archive.org/details/dcase2013_scene_classification (evaluation set: "
               f"{TEST_SOURCE})",
        defaults={"sample_rate": 22050, "clip_seconds": 30.0, "frames": 1500},
        index=index,
        options={"folds": 5, "seed": 0},
    )
)
