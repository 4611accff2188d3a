"""Every dataset adapter on a tiny copy of its official layout, indexed and extracted end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from audiofx.errors import DatasetError
from audiofx.pipeline.datasets import get_adapter
from audiofx.pipeline.extract import ExtractRequest, extract
from audiofx.pipeline.store import FeatureStore
from tests import official_layouts as L

# Short clips and few frames: the adapters and the store are under test here, not the math.
FAST = {"clip_seconds": 0.5, "frames": 20}


def run(dataset: str, root: Path, store: Path, **overrides):
    summary = extract(ExtractRequest(dataset=dataset, root=root, store=str(store), overrides={**FAST, **overrides},
                                     workers=1, progress=False), on_event=lambda m: None)
    return summary, FeatureStore(store).read_manifest(summary.dataset, summary.key)


def test_esc50_and_esc10(tmp_path):
    root = L.make_esc50(tmp_path / "esc50", classes=3)
    index = get_adapter("esc50").index(root, {})
    assert len(index.clips) == 15 and index.folds == ["1", "2", "3", "4", "5"]
    assert index.classes == ["class_00", "class_01", "class_02"]
    summary, manifest = run("esc50", root, tmp_path / "store")
    assert manifest["clips"] == 15 and all(f["ok"] == 3 for f in manifest["folds"].values())
    assert manifest["feature_config"]["sample_rate"] == 44100
    # ESC-10: targets 0 and 2 only, re-indexed to 0 and 1
    esc10 = get_adapter("esc10").index(root, {})
    assert esc10.classes == ["class_00", "class_02"]
    assert sorted({c.label for c in esc10.clips}) == [0, 1] and len(esc10.clips) == 10
    _, m10 = run("esc10", root, tmp_path / "store")
    x, y, clips = FeatureStore(tmp_path / "store").load_fold("esc10", m10["feature_key"], "1")
    assert sorted(y.tolist()) == [0, 1] and all(c.endswith("-2.wav") for c, l in zip(clips, y) if l == 1)


def test_urbansound8k_mixed_rates_depths_and_channels(tmp_path):
    root = L.make_urbansound8k(tmp_path / "us8k")
    summary, manifest = run("urbansound8k", root, tmp_path / "store")
    assert manifest["clips"] == 20 and len(manifest["folds"]) == 10 and not manifest["skipped"]
    x, y, clips = FeatureStore(tmp_path / "store").load_fold("urbansound8k", summary.key, "3")
    assert list(clips) == ["audio/fold3/1003-0-0-0.wav", "audio/fold3/1003-1-0-0.wav"] and y.tolist() == [0, 1]
    assert np.isfinite(x.astype(np.float32)).all()


@pytest.mark.parametrize("ext", [".au", ".wav"])
def test_gtzan_folds_and_the_unreadable_jazz_00054(tmp_path, ext):
    root = L.make_gtzan(tmp_path / "gtzan", ext=ext)
    index = get_adapter("gtzan").index(root, {"folds": 10, "seed": 0, "split": None})
    assert len(index.clips) == 31 and index.classes == L.GENRES and len(index.folds) == 10
    summary, manifest = run("gtzan", root, tmp_path / "store")
    assert manifest["clips"] == 30
    assert [s["clip"] for s in manifest["skipped"]] == [f"genres/jazz/jazz.00054{ext}"]
    assert manifest["feature_config"]["clip_seconds"] == 0.5  # overridden from 30 s


def test_gtzan_au_and_wav_copies_get_the_same_folds(tmp_path):
    au = get_adapter("gtzan").index(L.make_gtzan(tmp_path / "au", ext=".au"), {})
    wav = get_adapter("gtzan").index(L.make_gtzan(tmp_path / "wav", ext=".wav"), {})
    assert [(Path(c.path).stem, c.fold) for c in au.clips] == [(Path(c.path).stem, c.fold) for c in wav.clips]


def test_gtzan_published_split_file(tmp_path):
    root = L.make_gtzan(tmp_path / "gtzan", broken_jazz_00054=False)
    split = tmp_path / "split.csv"
    split.write_text("".join(f"genres/{g}/{g}.{i:05d}.au,{'train' if i < 7 else 'test'}\n"
                             for g in L.GENRES for i in range(10)))
    summary, manifest = run("gtzan", root, tmp_path / "store", split=str(split))
    assert manifest["folds"]["train"]["ok"] == 21 and manifest["folds"]["test"]["ok"] == 9
    default, _ = run("gtzan", root, tmp_path / "store")
    assert default.key != summary.key  # another split is another feature set, not an overwrite


def test_dcase2013_stereo_scenes(tmp_path):
    root = L.make_dcase2013(tmp_path / "dcase")
    index = get_adapter("dcase2013").index(root, {})
    assert index.classes == ["bus", "park", "quietstreet"] and len(index.clips) == 15
    summary, manifest = run("dcase2013", root, tmp_path / "store")
    assert manifest["clips"] == 15 and len(manifest["folds"]) == 5


@pytest.mark.parametrize("name", ["tut2018", "tau2019"])
def test_tut_tau_scenes_train_evaluate(tmp_path, name):
    root = L.make_tut(tmp_path / name)
    summary, manifest = run(name, root, tmp_path / "store")
    assert manifest["folds"]["train"]["ok"] == 6 and manifest["folds"]["evaluate"]["ok"] == 3
    assert manifest["classes"] == ["airport", "metro", "park"]


def test_tut_stereo_kept_for_zhou2019(tmp_path):
    root = L.make_tut(tmp_path / "tut")
    summary = extract(ExtractRequest(dataset="tut2018", root=root, store=str(tmp_path / "store"), preset="zhou2019",
                                     overrides={"clip_seconds": 0.4}, workers=1, progress=False),
                      on_event=lambda m: None)
    x, _, _ = FeatureStore(tmp_path / "store").load_fold("tut2018", summary.key, "train")
    assert x.shape[1:3] == (3, 128)
    assert not np.array_equal(x[:, 0], x[:, 1])  # left and right differ: stereo was kept


def test_fsd50k_multilabel(tmp_path):
    root = L.make_fsd50k(tmp_path / "fsd")
    summary, manifest = run("fsd50k", root, tmp_path / "store")
    assert manifest["multilabel"] and manifest["classes"] == ["Animal", "Bark", "Dog", "Guitar", "Music"]
    assert {f: v["ok"] for f, v in manifest["folds"].items()} == {"train": 3, "val": 1, "eval": 2}
    x, y, clips = FeatureStore(tmp_path / "store").load_fold("fsd50k", summary.key, "train")
    assert y.dtype == bool and y.shape == (3, 5)
    row = list(clips).index("FSD50K.dev_audio/101.wav")
    assert y[row].tolist() == [True, True, True, False, False]


def test_folder_any_format(tmp_path):
    root = L.make_mixed_folder(tmp_path / "mine")
    summary, manifest = run("folder", root, tmp_path / "store", folds=5)
    assert manifest["clips"] == 10 and manifest["classes"] == ["dog", "rain"] and not manifest["skipped"]


def test_demo_is_generated_once_and_synthetic(tmp_path):
    root = tmp_path / "demo"
    summary, manifest = run("demo", root, tmp_path / "store")
    assert manifest["clips"] == 200 and len(manifest["classes"]) == 5
    assert "synthetic" in get_adapter("demo").description.lower()
    assert "synthetic" in (root / "README.md").read_text().lower()
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.wav")}
    get_adapter("demo").index(root, {})
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.wav")} == before


def test_missing_esc50_files_are_counted(tmp_path):
    root = L.make_esc50(tmp_path / "esc50", classes=2)
    for name in ["1-1000-A-0.wav", "2-1000-A-0.wav"]:
        (root / "audio" / name).unlink()
    with pytest.raises(DatasetError, match=r"2 file\(s\) listed in the esc50 metadata are missing"):
        run("esc50", root, tmp_path / "store")
    summary = extract(ExtractRequest(dataset="esc50", root=root, store=str(tmp_path / "store"), overrides=FAST,
                                     workers=1, progress=False, allow_missing=True), on_event=lambda m: None)
    manifest = FeatureStore(tmp_path / "store").read_manifest("esc50", summary.key)
    assert manifest["clips"] == 8 and manifest["missing"] == ["audio/1-1000-A-0.wav", "audio/2-1000-A-0.wav"]
