"""Dataset adapters on tiny copies of the official layouts (tests/layouts.py)."""

from __future__ import annotations

import collections
import csv
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audiofx.config import FEATURE_FIELDS, resolve_feature_config
from audiofx.errors import ConfigError, DatasetError
from audiofx.pipeline.datasets import REGISTRY, get_adapter
from audiofx.pipeline.datasets.base import file_sha256
from tests.layouts import (
    DCASE2013_SCENES,
    FSD50K_VOCABULARY,
    US8K_CLASSES,
    make_dcase2013,
    make_esc50,
    make_folder,
    make_fsd50k,
    make_gtzan,
    make_tut,
    make_urbansound8k,
    tone,
)

NAMES = ["esc50", "esc10", "urbansound8k", "gtzan", "dcase2013", "tut2018", "tau2019", "fsd50k", "folder", "demo"]


def index(name: str, root: Path, **overrides):
    """Index as the caller does: the adapter's option defaults merged with overrides."""
    adapter = get_adapter(name)
    return adapter.index(Path(root), {**adapter.options, **overrides})


def by_fold(idx):
    return collections.Counter(c.fold for c in idx.clips)


def rewrite_csv(path: Path, edit, delimiter: str = ","):
    """Apply edit(rows) to a CSV given as a list of lists (header first)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    rows = edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f, delimiter=delimiter, lineterminator="\n").writerows(rows)


# -- registry ------------------------------------------------------------------------------


def test_every_adapter_is_registered_and_described():
    assert set(NAMES) <= set(REGISTRY)
    for name in NAMES:
        a = get_adapter(name)
        assert a.name == name and a.description and a.source
        assert "\n" not in a.layout and a.layout.startswith("<root>")
        assert set(a.defaults) == {"sample_rate", "clip_seconds", "frames"} <= FEATURE_FIELDS
        resolve_feature_config(a.defaults)  # the defaults make a valid feature config


def test_demo_says_synthetic():
    a = get_adapter("demo")
    assert "synthetic" in a.description.lower()
    assert "synthetic" in a.source and "synthetic" in a.layout


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ConfigError) as e:
        get_adapter("esc-50")
    assert "esc-50" in e.value.message
    for name in NAMES:
        assert name in e.value.hint


# -- ESC-50 / ESC-10 ------------------------------------------------------------------------


def test_esc50(tmp_path):
    root = make_esc50(tmp_path / "esc50")
    idx = index("esc50", root)
    assert len(idx.clips) == 25
    # Targets 0, 1, 2, 10, 41 ranked to 0..4, names in target order.
    assert idx.classes == ["dog", "rooster", "pig", "rain", "chainsaw"]
    assert idx.folds == ["1", "2", "3", "4", "5"]
    assert by_fold(idx) == {f: 5 for f in idx.folds}
    assert not idx.multilabel
    assert idx.metadata_files == [root / "meta/esc50.csv"]
    clip = next(c for c in idx.clips if c.path.endswith("-A-41.wav"))
    assert clip.label == 4 and clip.path.startswith("audio/") and clip.fold == clip.path[6]
    for c in idx.clips:
        assert (root / c.path).is_file()


def test_esc50_full_targets_are_labels(tmp_path):
    cats = [(t, f"class{t}", t % 2 == 0) for t in range(4)]
    idx = index("esc50", make_esc50(tmp_path, per_class=5, categories=cats))
    for c in idx.clips:
        assert c.label == int(c.path.rsplit("-", 1)[1][:-4])
    assert idx.classes == ["class0", "class1", "class2", "class3"]


def test_esc10_reindexes_labels(tmp_path):
    root = make_esc50(tmp_path)
    idx = index("esc10", root)
    # pig (target 2) is not in ESC-10; rain (10) and chainsaw (41) become 2 and 3.
    assert idx.classes == ["dog", "rooster", "rain", "chainsaw"]
    assert len(idx.clips) == 20
    assert {c.label for c in idx.clips} == {0, 1, 2, 3}
    target_to_label = {int(c.path.rsplit("-", 1)[1][:-4]): c.label for c in idx.clips}
    assert target_to_label == {0: 0, 1: 1, 10: 2, 41: 3}
    assert idx.folds == ["1", "2", "3", "4", "5"]


def test_esc10_accepts_true_spellings(tmp_path):
    root = make_esc50(tmp_path)
    spellings = {"1-100000-A-0.wav": "TRUE", "2-100001-A-0.wav": "1", "3-100002-A-0.wav": "true",
                 "4-100003-A-0.wav": "False", "5-100004-A-0.wav": "0"}
    rewrite_csv(root / "meta/esc50.csv", lambda rows: [r[:4] + [spellings.get(r[0], r[4])] + r[5:] for r in rows])
    dogs = [c for c in index("esc10", root).clips if c.label == 0]
    assert sorted(c.path for c in dogs) == ["audio/1-100000-A-0.wav", "audio/2-100001-A-0.wav", "audio/3-100002-A-0.wav"]


@pytest.mark.parametrize("bad", ["../escape.wav", "/etc/passwd", "C:\\x.wav", "audio/../../x.wav"])
def test_esc50_rejects_unsafe_paths(tmp_path, bad):
    root = make_esc50(tmp_path)
    rewrite_csv(root / "meta/esc50.csv", lambda rows: rows[:1] + [[bad] + rows[1][1:]] + rows[2:])
    with pytest.raises(DatasetError, match="esc50.csv"):
        index("esc50", root)


def test_esc50_missing_column_names_the_file(tmp_path):
    root = make_esc50(tmp_path)
    rewrite_csv(root / "meta/esc50.csv", lambda rows: [[x for i, x in enumerate(r) if i != 2] for r in rows])
    with pytest.raises(DatasetError) as e:
        index("esc50", root)
    assert str(root / "meta/esc50.csv") in e.value.message and "target" in e.value.message


def test_esc50_does_not_check_audio(tmp_path):
    root = make_esc50(tmp_path)
    (root / "audio" / "1-100000-A-0.wav").unlink()
    assert len(index("esc50", root).clips) == 25  # the caller handles missing files


# -- UrbanSound8K ----------------------------------------------------------------------------


def test_urbansound8k(tmp_path):
    root = make_urbansound8k(tmp_path)
    idx = index("urbansound8k", root)
    assert len(idx.clips) == 20
    assert idx.classes == US8K_CLASSES
    assert idx.folds == [str(i) for i in range(1, 11)]
    assert by_fold(idx) == {str(i): 2 for i in range(1, 11)}
    for c in idx.clips:
        assert c.path.startswith(f"audio/fold{c.fold}/")
        assert c.label == int(c.path.split("/")[-1].split("-")[1])  # classID in the file name
        assert (root / c.path).is_file()
    assert idx.metadata_files == [root / "metadata/UrbanSound8K.csv"]


def test_urbansound8k_fixture_mixes_formats(tmp_path):
    root = make_urbansound8k(tmp_path)
    infos = [sf.info(str(p)) for p in sorted((root / "audio").rglob("*.wav"))]
    assert {i.samplerate for i in infos} >= {8000, 22050, 44100, 48000, 96000}
    assert {i.channels for i in infos} == {1, 2}
    assert {i.subtype for i in infos} >= {"PCM_U8", "PCM_16", "PCM_24", "FLOAT"}


def test_urbansound8k_missing_column(tmp_path):
    root = make_urbansound8k(tmp_path)
    rewrite_csv(root / "metadata/UrbanSound8K.csv", lambda rows: [r[:6] + r[7:] for r in rows])
    with pytest.raises(DatasetError, match="UrbanSound8K.csv.*classID"):
        index("urbansound8k", root)


@pytest.mark.parametrize("dataset, make, meta, columns", [
    ("esc50", make_esc50, "meta/esc50.csv", ("filename", "fold", "target", "category")),
    ("urbansound8k", make_urbansound8k, "metadata/UrbanSound8K.csv", ("slice_file_name", "fold", "classID", "class")),
])
@pytest.mark.parametrize("fault", ["fold", "two names", "twice"])
def test_official_metadata_faults_are_one_line_naming_the_file(tmp_path, dataset, make, meta, columns, fault):
    """A fold outside the official ones, one label under two class names, a file listed twice:
    refused with the metadata file and the offending value, not indexed into a wrong set."""
    root = make(tmp_path)
    file, fold, label, name = columns

    def damage(rows):
        header, first, second = rows[0], rows[1], rows[2]
        col = {c: header.index(c) for c in columns}
        if fault == "fold":
            first[col[fold]] = "11"
        elif fault == "two names":
            second[col[label]], second[col[name]] = first[col[label]], first[col[name]] + "-other"
        else:
            second[col[file]], second[col[fold]] = first[col[file]], first[col[fold]]
        return rows

    rewrite_csv(root / meta, damage)
    needle = {"fold": "fold 11 is not one of 1..", "two names": f"{label} .* is both",
              "twice": r"\S+\.wav is listed twice"}[fault]
    with pytest.raises(DatasetError, match=f"{re.escape(str(root / meta))}: {needle}"):
        index(dataset, root)


# -- GTZAN -------------------------------------------------------------------------------


def test_gtzan_stratified_folds(tmp_path):
    root = make_gtzan(tmp_path)
    idx = index("gtzan", root)
    assert idx.classes == ["blues", "classical", "jazz"]
    assert len(idx.clips) == 30
    assert idx.folds == [str(i) for i in range(1, 11)]
    # 10 clips per genre over 10 folds: every fold holds exactly one clip of every genre.
    per = collections.Counter((c.fold, c.label) for c in idx.clips)
    assert set(per.values()) == {1} and len(per) == 30
    assert idx.options == {"folds": 10, "seed": 0, "split": None}
    assert all(c.path.startswith(f"genres/{idx.classes[c.label]}/") and c.path.endswith(".au") for c in idx.clips)
    assert index("gtzan", root).clips == idx.clips  # deterministic
    other = index("gtzan", root, seed=1)
    assert other.clips != idx.clips and other.options["seed"] == 1


def test_gtzan_fewer_folds(tmp_path):
    idx = index("gtzan", make_gtzan(tmp_path, per_genre=5), folds=5)
    assert idx.folds == ["1", "2", "3", "4", "5"] and idx.options["folds"] == 5
    assert set(collections.Counter((c.fold, c.label) for c in idx.clips).values()) == {1}
    with pytest.raises(DatasetError, match="fewer than the 10 folds"):
        index("gtzan", tmp_path)


def test_gtzan_wav_copies_get_the_same_folds(tmp_path):
    au = index("gtzan", make_gtzan(tmp_path / "au"))
    wav = index("gtzan", make_gtzan(tmp_path / "wav", ext=".wav"))
    assert [c.path.replace(".au", ".wav") for c in au.clips] == [c.path for c in wav.clips]
    assert [(c.label, c.fold) for c in au.clips] == [(c.label, c.fold) for c in wav.clips]


def test_gtzan_lists_the_unreadable_file_and_ignores_junk(tmp_path):
    root = make_gtzan(tmp_path, broken=True)
    (root / "genres/jazz/._jazz.00001.au").write_bytes(b"\x00\x05\x16\x07")
    (root / "genres/jazz/notes.txt").write_text("x")
    (root / "genres/blues/blues.00000.wav").write_bytes((root / "genres/blues/blues.00000.au").read_bytes())
    idx = index("gtzan", root)
    paths = [c.path for c in idx.clips]
    assert "genres/jazz/jazz.00054.au" in paths  # decoding, not indexing, records it as a skip
    assert len(paths) == 31 and not any("._" in p or p.endswith(".txt") for p in paths)
    # A clip converted in place counts once; the other copy is reported.
    assert sum(p.startswith("genres/blues/blues.00000.") for p in paths) == 1
    assert len(idx.skipped) == 1 and "duplicate" in idx.skipped[0][1]


def test_gtzan_split_file(tmp_path):
    root = make_gtzan(tmp_path / "gtzan")
    split = tmp_path / "split.csv"
    lines = ["path,fold"]
    for g in ("blues", "classical", "jazz"):
        lines += [f"genres/{g}/{g}.{i:05d}.au,{'train' if i < 6 else 'valid' if i < 8 else 'test'}" for i in range(9)]
    split.write_text("\n".join(lines) + "\n")
    idx = index("gtzan", root, split=str(split))
    assert len(idx.clips) == 27  # the .00009 clips are not in the split
    assert idx.folds == ["train", "valid", "test"]
    assert by_fold(idx) == {"train": 18, "valid": 6, "test": 3}
    assert idx.options == {"folds": None, "seed": None, "split": file_sha256(split)}
    assert split in idx.metadata_files
    split.write_text("genres/blues/blues.00000.au,1\ngenres/blues/blues.00001.au,2\n")  # headerless, numeric
    assert index("gtzan", root, split=str(split)).folds == ["1", "2"]
    split.write_text("genres/../x.au,1\n")
    with pytest.raises(DatasetError, match="escapes"):
        index("gtzan", root, split=str(split))
    split.write_text("genres/blues/nope.au,1\n")
    with pytest.raises(DatasetError, match="not in the dataset"):
        index("gtzan", root, split=str(split))


def test_gtzan_70_15_15_split_is_stratified_seeded_and_recorded(tmp_path):
    root = make_gtzan(tmp_path, per_genre=20)  # 60 clips: 42 / 9 / 9, 3 of each genre in val and test
    idx = index("gtzan", root, ratios="70/15/15")
    assert idx.folds == ["train", "val", "test"]
    assert by_fold(idx) == {"train": 42, "val": 9, "test": 9}
    per = collections.Counter((c.fold, c.label) for c in idx.clips)
    assert {per[(part, g)] for part in ("val", "test") for g in range(3)} == {3}
    assert idx.options == {"folds": None, "seed": 0, "ratios": "70/15/15", "split": None}
    assert index("gtzan", root, ratios=(70, 15, 15)).clips == idx.clips  # --set ratios=70,15,15: the same split
    other = index("gtzan", root, ratios="70/15/15", seed=3)
    assert other.clips != idx.clips and by_fold(other) == by_fold(idx)
    assert by_fold(index("gtzan", root, ratios="80/0/20")) == {"train": 48, "test": 12}
    for bad in ("70/15", "70/20/20", "x/y/z", "100/0/0"):
        with pytest.raises(ConfigError, match="ratios"):
            index("gtzan", root, ratios=bad)
    split = tmp_path / "split.csv"
    split.write_text("genres/blues/blues.00000.au,1\n")
    with pytest.raises(ConfigError, match="both say where clips go"):
        index("gtzan", root, ratios="70/15/15", split=str(split))


def test_gtzan_empty_genres(tmp_path):
    (tmp_path / "genres" / "blues").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no audio"):
        index("gtzan", tmp_path)


def test_gtzan_bad_option(tmp_path):
    with pytest.raises(ConfigError, match="folds"):
        index("gtzan", make_gtzan(tmp_path), folds="many")


# -- DCASE 2013 ---------------------------------------------------------------------------


@pytest.mark.parametrize("subdir", ["", "audio"])
def test_dcase2013(tmp_path, subdir):
    root = make_dcase2013(tmp_path, subdir=subdir)
    idx = index("dcase2013", root)
    assert idx.classes == sorted(DCASE2013_SCENES)
    assert len(idx.clips) == 100
    assert idx.folds == ["1", "2", "3", "4", "5"]
    assert set(collections.Counter((c.fold, c.label) for c in idx.clips).values()) == {2}
    assert idx.options == {"folds": 5, "seed": 0, "audio_dir": subdir or "."}
    quiet10 = next(c for c in idx.clips if c.path.endswith("quietstreet10.wav"))
    assert idx.classes[quiet10.label] == "quietstreet"
    assert all(c.path.startswith("audio/") == bool(subdir) for c in idx.clips)
    info = sf.info(str(root / idx.clips[0].path))
    assert (info.samplerate, info.channels) == (44100, 2)


def test_dcase2013_folds_do_not_depend_on_location(tmp_path):
    flat = index("dcase2013", make_dcase2013(tmp_path / "a"))
    nested = index("dcase2013", make_dcase2013(tmp_path / "b", subdir="audio"))
    assert [(c.label, c.fold) for c in flat.clips] == [(c.label, c.fold) for c in nested.clips]


def test_dcase2013_official_two_folds_are_development_and_evaluation(tmp_path):
    root = make_dcase2013(tmp_path, subdir="audio")
    make_dcase2013(tmp_path, subdir="test", per_scene=10)  # the evaluation set: the same names, another folder
    idx = index("dcase2013", root, folds=2)
    assert idx.folds == ["1", "2"] and len(idx.clips) == 200
    assert {c.fold for c in idx.clips if c.path.startswith("audio/")} == {"1"}
    assert {c.fold for c in idx.clips if c.path.startswith("test/")} == {"2"}
    assert set(collections.Counter((c.fold, c.label) for c in idx.clips).values()) == {10}
    assert idx.options == {"folds": 2, "seed": None, "audio_dir": "audio", "test_dir": "test"}
    # The default protocol stays the development set's 5 stratified folds, the evaluation set unread.
    five = index("dcase2013", root)
    assert len(five.clips) == 100 and five.options == {"folds": 5, "seed": 0, "audio_dir": "audio"}
    assert five.clips == index("dcase2013", make_dcase2013(tmp_path / "dev-only", subdir="audio")).clips


def test_dcase2013_two_folds_need_the_evaluation_set(tmp_path):
    root = make_dcase2013(tmp_path, per_scene=3)
    with pytest.raises(DatasetError, match=r"folds=2 .*needs the evaluation set") as refused:
        index("dcase2013", root, folds=2)
    assert "scenes_stereo_testset.zip" in refused.value.hint and str(root / "test") in refused.value.hint
    make_dcase2013(tmp_path, per_scene=3, scenes=["bus", "library"], subdir="test")
    with pytest.raises(DatasetError, match="scenes the development set has not: library"):
        index("dcase2013", root, folds=2)


def test_dcase2013_both_locations_or_none(tmp_path):
    root = make_dcase2013(tmp_path, per_scene=5, scenes=["bus", "park"])
    make_dcase2013(tmp_path, per_scene=5, scenes=["bus", "park"], subdir="audio")
    with pytest.raises(DatasetError, match="both"):
        index("dcase2013", root)
    with pytest.raises(DatasetError, match="expected layout"):
        index("dcase2013", make_folder(tmp_path / "other"))


# -- TUT 2018 / TAU 2019 ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tut2018", "tau2019"])
@pytest.mark.parametrize("evaluate_header", ["full", "filename", "none"])
def test_tut(tmp_path, name, evaluate_header):
    root = make_tut(tmp_path, evaluate_header=evaluate_header)
    idx = index(name, root)
    assert idx.classes == ["airport", "metro_station", "park"]
    assert idx.folds == ["train", "evaluate"]
    assert by_fold(idx) == {"train": 6, "evaluate": 6}
    # lyon segments are in meta.csv but in neither setup file.
    assert not any("lyon" in c.path for c in idx.clips)
    assert all(("barcelona" in c.path) == (c.fold == "train") for c in idx.clips)
    for c in idx.clips:
        assert c.path.startswith(f"audio/{idx.classes[c.label]}-")
    assert idx.metadata_files == [
        root / "meta.csv",
        root / "evaluation_setup/fold1_train.csv",
        root / "evaluation_setup/fold1_evaluate.csv",
    ]
    info = sf.info(str(root / idx.clips[0].path))
    assert (info.samplerate, info.channels, info.subtype) == (48000, 2, "PCM_24")


def test_tut_overlapping_setup_and_bad_paths(tmp_path):
    root = make_tut(tmp_path)
    train = root / "evaluation_setup/fold1_train.csv"
    evaluate = root / "evaluation_setup/fold1_evaluate.csv"
    evaluate.write_text(evaluate.read_text() + train.read_text().splitlines()[1] + "\n")
    with pytest.raises(DatasetError, match="both"):
        index("tut2018", root)
    root = make_tut(tmp_path / "b")
    rewrite_csv(root / "meta.csv", lambda rows: rows[:1] + [["../../x.wav"] + rows[1][1:]] + rows[2:], "\t")
    with pytest.raises(DatasetError, match="meta.csv"):
        index("tut2018", root)


def test_tut_missing_column(tmp_path):
    root = make_tut(tmp_path)
    rewrite_csv(root / "meta.csv", lambda rows: [r[:1] + r[2:] for r in rows], "\t")
    with pytest.raises(DatasetError) as e:
        index("tau2019", root)
    assert str(root / "meta.csv") in e.value.message and "scene_label" in e.value.message


# -- FSD50K ------------------------------------------------------------------------------


def test_fsd50k_multilabel(tmp_path):
    root = make_fsd50k(tmp_path)
    idx = index("fsd50k", root)
    assert idx.multilabel
    assert idx.classes == ["Animal", "Bark", "Dog", "Electric_guitar", "Guitar", "Music"]
    assert idx.folds == ["train", "val", "eval"]
    assert by_fold(idx) == {"train": 3, "val": 2, "eval": 2}
    clips = {c.path: c for c in idx.clips}
    assert clips["FSD50K.dev_audio/64760.wav"].label == (3, 4, 5)
    assert clips["FSD50K.dev_audio/382455.wav"].label == (5,)
    assert clips["FSD50K.eval_audio/175151.wav"].label == (0, 2)
    assert clips["FSD50K.eval_audio/175151.wav"].fold == "eval"
    assert all(isinstance(c.label, tuple) for c in idx.clips)
    assert all((root / c.path).is_file() for c in idx.clips)


def test_fsd50k_vocabulary_order(tmp_path):
    root = make_fsd50k(tmp_path, vocabulary=True)
    idx = index("fsd50k", root)
    assert idx.classes == [n for n, _ in FSD50K_VOCABULARY]
    clip = next(c for c in idx.clips if c.path.endswith("/64760.wav"))
    assert clip.label == (0, 1, 2)  # Music, Guitar, Electric_guitar in vocabulary order
    assert root / "FSD50K.ground_truth/vocabulary.csv" in idx.metadata_files


def test_fsd50k_missing_split_column(tmp_path):
    root = make_fsd50k(tmp_path)
    rewrite_csv(root / "FSD50K.ground_truth/dev.csv", lambda rows: [r[:3] for r in rows])
    with pytest.raises(DatasetError, match="dev.csv.*split"):
        index("fsd50k", root)


# -- folder ------------------------------------------------------------------------------


def test_folder(tmp_path):
    root = make_folder(tmp_path)
    idx = index("folder", root)
    assert idx.classes == ["bird", "cat", "dog"]  # "empty" has no audio, stray.wav is no class
    assert len(idx.clips) == 15
    exts = {Path(c.path).suffix for c in idx.clips}
    assert exts == {".wav", ".flac", ".ogg", ".WAV"}
    assert "cat/more/cat_04.wav" in {c.path for c in idx.clips}
    assert not any("._" in c.path or c.path.endswith(".txt") for c in idx.clips)
    assert set(collections.Counter((c.fold, c.label) for c in idx.clips).values()) == {1}
    assert idx.options == {"folds": 5, "seed": 0, "split": None}
    for c in idx.clips:
        assert c.path.split("/")[0] == idx.classes[c.label]
        sf.info(str(root / c.path))  # every format the fixture wrote is readable


@pytest.mark.parametrize("header", [True, False])
def test_folder_split_csv(tmp_path, header):
    root = make_folder(tmp_path / "data")
    split = tmp_path / "split.csv"
    rows = ["cat/cat_00.wav,kitty,train", "dog/dog_01.flac,doggo,train", "bird/bird_02.ogg,birdie,test", "stray.wav,kitty,test"]
    split.write_text(("path,label,fold\n" if header else "") + "\n".join(rows) + "\n")
    idx = index("folder", root, split=str(split))
    assert idx.classes == ["birdie", "doggo", "kitty"]
    assert [(c.path, c.label, c.fold) for c in idx.clips] == [
        ("cat/cat_00.wav", 2, "train"),
        ("dog/dog_01.flac", 1, "train"),
        ("bird/bird_02.ogg", 0, "test"),
        ("stray.wav", 2, "test"),
    ]
    assert idx.folds == ["train", "test"]
    assert idx.options == {"folds": None, "seed": None, "split": file_sha256(split)}
    assert idx.metadata_files == [split]


@pytest.mark.parametrize("bad", ["../outside.wav", "/abs/x.wav"])
def test_folder_split_rejects_unsafe_paths(tmp_path, bad):
    split = tmp_path / "split.csv"
    split.write_text(f"{bad},a,1\n")
    with pytest.raises(DatasetError, match="split.csv"):
        index("folder", make_folder(tmp_path / "data"), split=str(split))


def test_folder_without_audio(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "readme.txt").write_text("x")
    sf.write(tmp_path / "loose.wav", tone(8000, 0.1, 440), 8000)
    with pytest.raises(DatasetError) as e:
        index("folder", tmp_path)
    assert "no class subfolder" in e.value.message and "subfolder" in e.value.hint


# -- errors common to all ------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in NAMES if n != "demo"])
def test_missing_root_shows_layout_and_source(tmp_path, name):
    adapter = get_adapter(name)
    with pytest.raises(DatasetError) as e:
        adapter.index(tmp_path / "nowhere", dict(adapter.options))
    assert adapter.layout in e.value.message
    assert adapter.source in e.value.hint


@pytest.mark.parametrize("name", ["esc50", "urbansound8k", "gtzan", "tut2018", "fsd50k"])
def test_empty_root_shows_layout(tmp_path, name):
    with pytest.raises(DatasetError) as e:
        index(name, tmp_path)
    assert get_adapter(name).layout in e.value.message


# -- demo --------------------------------------------------------------------------------


def test_demo_generates_once(tmp_path):
    root = tmp_path / "demo"
    idx = index("demo", root)
    wavs = sorted((root / "audio").iterdir())
    assert len(wavs) == 200 and all(p.suffix == ".wav" and "synthetic" in p.name for p in wavs)
    assert len(idx.clips) == 200 and {c.path for c in idx.clips} == {f"audio/{p.name}" for p in wavs}
    assert idx.classes == ["sine-tone", "chirp", "noise-burst", "click-train", "am-tone"]
    assert idx.folds == ["1", "2", "3", "4", "5"]
    assert set(collections.Counter((c.fold, c.label) for c in idx.clips).values()) == {8}
    assert "synthetic" in (root / "README.md").read_text().lower()
    info = sf.info(str(wavs[0]))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (22050, 1, "PCM_16", 44100)

    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    again = index("demo", root)
    assert again.clips == idx.clips
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps  # nothing rewritten


def test_demo_is_deterministic(tmp_path):
    index("demo", tmp_path / "a")
    index("demo", tmp_path / "b")
    assert (tmp_path / "a/meta.csv").read_bytes() == (tmp_path / "b/meta.csv").read_bytes()
    for name in ("synthetic-chirp-07.wav", "synthetic-noise-burst-31.wav"):
        a, b = (tmp_path / "a/audio" / name).read_bytes(), (tmp_path / "b/audio" / name).read_bytes()
        assert a == b
    digest = lambda d: hashlib.sha256(b"".join(p.read_bytes() for p in sorted((d / "audio").iterdir()))).hexdigest()
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_demo_regenerates_after_an_interrupted_run(tmp_path):
    root = tmp_path / "demo"
    index("demo", root)
    reference = (root / "audio/synthetic-am-tone-00.wav").read_bytes()
    (root / "meta.csv").unlink()  # as if killed before the last step
    (root / "audio/synthetic-am-tone-00.wav").write_bytes(reference[:100])
    os.remove(root / "audio/synthetic-chirp-39.wav")
    idx = index("demo", root)
    assert len(idx.clips) == 200
    assert (root / "audio/synthetic-am-tone-00.wav").read_bytes() == reference
    assert (root / "audio/synthetic-chirp-39.wav").is_file()
    assert not [p for p in root.rglob("*") if "tmp" in p.name]


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "my-music.flac").write_bytes(b"x")
    with pytest.raises(DatasetError, match="refusing"):
        index("demo", tmp_path)
    assert not (tmp_path / "audio").exists()


def _descriptors(x: np.ndarray) -> list[float]:
    """Spectral flatness, rise of the peak frequency, loudness variation, active fraction."""
    frames = np.lib.stride_tricks.sliding_window_view(x, 512)[::256] * np.hanning(512)
    p = np.abs(np.fft.rfft(frames, axis=1)) ** 2 + 1e-12
    energy = p.sum(1)
    active = energy > energy.max() * 0.01
    pa, ea = p[active], energy[active]
    flatness = np.mean(np.exp(np.log(pa).mean(1)) / pa.mean(1))
    peak = np.log(pa.argmax(1) + 1)
    q = max(len(peak) // 4, 1)
    return [np.log(flatness), peak[-q:].mean() - peak[:q].mean(), ea.std() / ea.mean(), active.mean()]


def test_demo_classes_are_easy_to_tell_apart(tmp_path):
    root = tmp_path / "demo"
    idx = index("demo", root)
    X = np.array([_descriptors(sf.read(root / c.path, dtype="float32")[0]) for c in idx.clips])
    y = np.array([c.label for c in idx.clips])
    fold = np.array([c.fold for c in idx.clips])
    # Nearest class centroid, cross-validated over the demo's own folds.
    for k in idx.folds:
        train, test = fold != k, fold == k
        mu, sd = X[train].mean(0), X[train].std(0)
        Z = (X - mu) / sd
        centroids = np.array([Z[train & (y == c)].mean(0) for c in range(len(idx.classes))])
        pred = ((Z[test][:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
        assert (pred == y[test]).mean() >= 0.95
