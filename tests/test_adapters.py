"""Every dataset adapter extracted end to end from a tiny copy of its official layout
(tests/layouts.py): what reaches the store is what the adapter indexed, plus the special
cases of each dataset. Index-level details of the adapters are in tests/test_datasets.py."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from audiofx.errors import DatasetError
from audiofx.pipeline.datasets import get_adapter
from audiofx.pipeline.extract import ExtractRequest, extract
from audiofx.pipeline.reading import load_fold, open_fold
from audiofx.pipeline.store import FeatureStore
from tests import layouts as L

# Short clips and few frames: the adapters and the store are under test here, not the math.
FAST = {"clip_seconds": 0.5, "frames": 20}


def run(dataset: str, root: Path, store: Path, preset: str = "shin2021", allow_missing: bool = False, **overrides):
    summary = extract(ExtractRequest(dataset=dataset, root=root, store=str(store), preset=preset,
                                     overrides={**FAST, **overrides}, workers=1, progress=False,
                                     allow_missing=allow_missing), on_event=lambda m: None)
    return summary, FeatureStore(store).read_manifest(summary.dataset, summary.key)


def assert_store_matches_index(dataset: str, root: Path, store: Path, manifest: dict, options: dict | None = None):
    adapter = get_adapter(dataset)
    index = adapter.index(root, {**adapter.options, **(options or {})})
    assert manifest["classes"] == index.classes
    for fold in index.folds:
        expected = [c for c in index.clips if c.fold == fold]
        g = open_fold(FeatureStore(store), dataset, manifest["feature_key"], fold)
        assert [str(p) for p in g["clip"][:]] == [c.path for c in expected]
        if not manifest["multilabel"]:
            assert g["y"][:].tolist() == [c.label for c in expected]


def test_esc50_and_esc10(tmp_path):
    root = L.make_esc50(tmp_path / "esc50")
    _, manifest = run("esc50", root, tmp_path / "store")
    assert manifest["clips"] == 25 and all(f["ok"] == 5 for f in manifest["folds"].values())
    assert manifest["classes"] == ["dog", "rooster", "pig", "rain", "chainsaw"]  # target order 0, 1, 2, 10, 41
    assert_store_matches_index("esc50", root, tmp_path / "store", manifest)
    summary, m10 = run("esc10", root, tmp_path / "store")
    assert m10["classes"] == ["dog", "rooster", "rain", "chainsaw"] and m10["clips"] == 20
    _, y, clips = load_fold(FeatureStore(tmp_path / "store"), "esc10", summary.key, "1")
    assert sorted(y.tolist()) == [0, 1, 2, 3] and not any(c.endswith("-2.wav") for c in clips)  # pig is not ESC-10


def test_urbansound8k_mixed_rates_depths_and_channels(tmp_path):
    root = L.make_urbansound8k(tmp_path / "us8k")
    summary, manifest = run("urbansound8k", root, tmp_path / "store")
    assert manifest["clips"] == 20 and len(manifest["folds"]) == 10 and not manifest["skipped"]
    assert_store_matches_index("urbansound8k", root, tmp_path / "store", manifest)
    for fold in manifest["folds"]:
        x, _, _ = load_fold(FeatureStore(tmp_path / "store"), "urbansound8k", summary.key, fold)
        assert np.isfinite(x.astype(np.float32)).all() and (x.astype(np.float32) > np.log(1e-6) + 1).any()


@pytest.mark.parametrize("ext", [".au", ".wav"])
def test_gtzan_and_the_unreadable_jazz_00054(tmp_path, ext):
    root = L.make_gtzan(tmp_path / "gtzan", ext=ext, broken=True)
    _, manifest = run("gtzan", root, tmp_path / "store")
    assert manifest["clips"] == 30 and len(manifest["folds"]) == 10
    assert [s["clip"] for s in manifest["skipped"]] == [f"genres/jazz/jazz.00054{ext}"]
    assert manifest["feature_config"]["clip_seconds"] == 0.5  # overridden from 30 s
    assert_store_matches_index("gtzan", root, tmp_path / "store", manifest)


def test_gtzan_second_copy_of_a_clip_is_recorded_not_extracted(tmp_path):
    root = L.make_gtzan(tmp_path / "gtzan")
    (root / "genres/blues/blues.00003.wav").write_bytes((root / "genres/blues/blues.00003.au").read_bytes())
    _, manifest = run("gtzan", root, tmp_path / "store")
    assert manifest["clips"] == 30
    (skip,) = manifest["skipped"]
    assert skip["clip"].startswith("genres/blues/blues.00003.") and "duplicate" in skip["reason"]


def test_gtzan_published_split_is_another_feature_set(tmp_path):
    root = L.make_gtzan(tmp_path / "gtzan")
    split = tmp_path / "split.csv"
    split.write_text("".join(f"genres/{g}/{g}.{i:05d}.au,{'train' if i < 7 else 'test'}\n"
                             for g in ("blues", "classical", "jazz") for i in range(10)))
    summary, manifest = run("gtzan", root, tmp_path / "store", split=str(split))
    assert manifest["folds"]["train"]["ok"] == 21 and manifest["folds"]["test"]["ok"] == 9
    default, _ = run("gtzan", root, tmp_path / "store")
    assert default.key != summary.key  # another split is another key, never an overwrite


def test_gtzan_70_15_15_is_another_set_chosen_by_the_same_set_option(tmp_path):
    from audiofx.errors import ConfigError, StoreError
    from audiofx.training.data.featuresets import resolve_featureset

    root = L.make_gtzan(tmp_path / "gtzan", per_genre=20)
    store = tmp_path / "store"
    folds, _ = run("gtzan", root, store)
    holdout, manifest = run("gtzan", root, store, ratios="70/15/15")  # the newer set
    assert holdout.key != folds.key
    assert {f: v["ok"] for f, v in manifest["folds"].items()} == {"train": 42, "val": 9, "test": 9}
    assert manifest["dataset_options"]["ratios"] == "70/15/15"
    assert_store_matches_index("gtzan", root, store, manifest, {"ratios": "70/15/15"})
    # Without --set the dataset's default protocol is taken, though the split is newer.
    assert resolve_featureset(str(store), "gtzan", overrides=FAST)[0] == folds.key
    assert resolve_featureset(str(store), "gtzan", overrides={**FAST, "ratios": (70, 15, 15)})[0] == holdout.key
    assert resolve_featureset(str(store), "gtzan", overrides={**FAST, "folds": 10})[0] == folds.key
    with pytest.raises(StoreError, match=r"--set folds=5 .*sets there: ") as refused:
        resolve_featureset(str(store), "gtzan", overrides={**FAST, "folds": 5})
    assert f"{folds.key} (folds=10, seed=0)" in str(refused.value)
    assert f"{holdout.key} (seed=0, ratios=70/15/15)" in str(refused.value)
    with pytest.raises(ConfigError, match="unknown option 'nope'"):
        resolve_featureset(str(store), "gtzan", overrides={"nope": 1})


def test_dcase2013_stereo_scenes(tmp_path):
    root = L.make_dcase2013(tmp_path / "dcase", per_scene=5, subdir="audio")
    _, manifest = run("dcase2013", root, tmp_path / "store")
    assert manifest["clips"] == 50 and len(manifest["folds"]) == 5 and len(manifest["classes"]) == 10
    assert_store_matches_index("dcase2013", root, tmp_path / "store", manifest)
    # The official two folds (development, evaluation) are another set beside the five.
    L.make_dcase2013(tmp_path / "dcase", per_scene=3, subdir="test")
    two, official = run("dcase2013", root, tmp_path / "store", folds=2)
    assert two.key != manifest["feature_key"]
    assert {f: v["ok"] for f, v in official["folds"].items()} == {"1": 50, "2": 30}
    assert_store_matches_index("dcase2013", root, tmp_path / "store", official, {"folds": 2})


@pytest.mark.parametrize("name", ["tut2018", "tau2019"])
def test_tut_tau_train_evaluate(tmp_path, name):
    root = L.make_tut(tmp_path / name)
    _, manifest = run(name, root, tmp_path / "store")
    assert {f: v["ok"] for f, v in manifest["folds"].items()} == {"train": 6, "evaluate": 6}  # lyon left out
    assert manifest["classes"] == ["airport", "metro_station", "park"]


def test_tut_stereo_kept_for_zhou2019(tmp_path):
    root = L.make_tut(tmp_path / "tut")
    summary, manifest = run("tut2018", root, tmp_path / "store", preset="zhou2019", clip_seconds=0.3, frames=0)
    x, _, _ = load_fold(FeatureStore(tmp_path / "store"), "tut2018", summary.key, "train")
    assert x.shape[1:3] == (3, 128) and manifest["feature_config"]["sources"] == ["left", "right", "mid"]
    assert not np.array_equal(x[:, 0], x[:, 1])  # left and right differ: the stereo channels were kept


def test_fsd50k_multilabel_matrix(tmp_path):
    root = L.make_fsd50k(tmp_path / "fsd", vocabulary=True)
    summary, manifest = run("fsd50k", root, tmp_path / "store")
    assert manifest["multilabel"] and manifest["classes"] == [name for name, _ in L.FSD50K_VOCABULARY]
    assert {f: v["ok"] for f, v in manifest["folds"].items()} == {"train": 3, "val": 2, "eval": 2}
    x, y, clips = load_fold(FeatureStore(tmp_path / "store"), "fsd50k", summary.key, "train")
    assert y.dtype == bool and y.shape == (3, 6)
    row = list(clips).index("FSD50K.dev_audio/64760.wav")  # Electric_guitar, Guitar, Music
    assert y[row].tolist() == [True, True, True, False, False, False]


def test_folder_of_mixed_formats(tmp_path):
    root = L.make_folder(tmp_path / "mine")
    _, manifest = run("folder", root, tmp_path / "store", folds=5)
    assert manifest["clips"] == 15 and manifest["classes"] == ["bird", "cat", "dog"] and not manifest["skipped"]
    assert_store_matches_index("folder", root, tmp_path / "store", manifest, {"folds": 5})


def test_demo_is_generated_once_and_synthetic(tmp_path):
    root = tmp_path / "demo"
    _, manifest = run("demo", root, tmp_path / "store")
    assert manifest["clips"] == 200 and len(manifest["classes"]) == 5
    assert "synthetic" in get_adapter("demo").description.lower()
    assert "synthetic" in (root / "README.md").read_text().lower()
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.wav")}
    get_adapter("demo").index(root, {})
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.wav")} == before


def test_missing_esc50_files_error_or_allowed(tmp_path):
    root = L.make_esc50(tmp_path / "esc50")
    with open(root / "meta" / "esc50.csv") as f:
        gone = sorted(f"audio/{row['filename']}" for row in csv.DictReader(f))[:2]
    for path in gone:
        (root / path).unlink()
    with pytest.raises(DatasetError, match=r"2 file\(s\) listed in the esc50 metadata are missing"):
        run("esc50", root, tmp_path / "store")
    _, manifest = run("esc50", root, tmp_path / "store", allow_missing=True)
    assert manifest["clips"] == 23 and manifest["missing"] == gone


def test_fit_resize_stretches_each_clip_to_the_frames_instead_of_padding(tmp_path):
    """Shin et al. on UrbanSound8K: "we fixed their length to 4 s by resizing"."""
    import soundfile as sf

    from audiofx.config import feature_key, resolve_feature_config
    from audiofx.features.reference import librosa_features
    from audiofx.pipeline.decode import decode_clip
    from tests.conftest import make_class_folder, real_signal

    pad = resolve_feature_config({"sample_rate": 22050, "clip_seconds": 2.0, "frames": 40})
    assert "fit" not in pad.to_dict()  # keys of stores made before the option stay as they were
    resize = resolve_feature_config({"sample_rate": 22050, "clip_seconds": 2.0, "frames": 40}, overrides={"fit": "resize"})
    assert resize.to_dict()["fit"] == "resize" and feature_key(resize) != feature_key(pad)
    root = make_class_folder(tmp_path / "raw", classes=2, per_class=5, seconds=1.0)
    for c in range(2):  # one second and three seconds of audio in one write unit
        sf.write(root / f"class{c}" / f"class{c}-009.wav", real_signal(22050, 3.0, seed=90 + c), 22050)
    summary, manifest = run("folder", root, tmp_path / "store", clip_seconds=2.0, frames=40, fit="resize",
                            sample_rate=22050, folds=2)
    assert manifest["feature_config"]["fit"] == "resize" and not manifest["skipped"]
    for fold in manifest["folds"]:
        x, _, clips = load_fold(FeatureStore(tmp_path / "store"), "folder", summary.key, fold)
        for row, clip in zip(x, clips):
            audio = decode_clip(root / clip, resize)
            assert audio.shape[-1] == (44100 if clip.endswith("-009.wav") else 22050)  # cropped at 2 s, never padded
            assert np.abs(row.astype(np.float32) - librosa_features(audio, resize)).max() < 0.05, clip  # float16
    padded = decode_clip(root / "class0" / "class0-000.wav", pad)
    assert padded.shape[-1] == 44100 and not padded[0, 22050:].any()
    with pytest.raises(Exception, match="frames must be above 0"):
        resolve_feature_config({"sample_rate": 22050, "clip_seconds": 2.0, "frames": 0}, overrides={"fit": "resize"})


def test_augmented_copies_are_stored_after_each_clip_seeded_by_its_path(tmp_path):
    """Lin 2022: "augment it through random flipping, padding, cropping, and pitch shifting",
    made once at extraction: copy k of a clip in channels [3k, 3k + 3)."""
    import torch

    from audiofx.config import FeatureConfig, resolve_feature_config
    from audiofx.features.melspec import compute_features
    from audiofx.pipeline.decode import decode_clip
    from audiofx.pipeline.waveaugment import augmented_copy, clip_generator, with_copies
    from tests.conftest import make_class_folder, stored_as_computed

    # The augmentation by hand: with no pitch shift, a flip and a zero-filled offset
    wave = np.arange(1, 11, dtype=np.float32)[None]
    cfg = FeatureConfig(augment_copies=1, augment_flip=1.0, augment_shift=0.3, augment_pitch=0.0)
    rng = np.random.default_rng(0)
    rng.random()
    offset = int(round(rng.uniform(-0.3, 0.3) * 10))
    out = augmented_copy(wave, cfg, np.random.default_rng(0))
    expected = np.zeros(10, dtype=np.float32)
    flipped = wave[0, ::-1]
    if offset >= 0:
        expected[offset:] = flipped[:10 - offset]
    else:
        expected[:10 + offset] = flipped[-offset:]
    assert np.array_equal(out[0], expected) and offset != 0

    root = make_class_folder(tmp_path / "raw", classes=2, per_class=4, seconds=0.5)
    plain, _ = run("folder", root, tmp_path / "store", folds=2)
    messages = []
    summary = extract(ExtractRequest(dataset="folder", root=root, store=str(tmp_path / "store"),
                                     overrides={**FAST, "folds": 2, "augment_copies": 2}, workers=1, progress=False),
                      on_event=messages.append)
    manifest = FeatureStore(tmp_path / "store").read_manifest("folder", summary.key)
    assert summary.key != plain.key and manifest["shape"] == [9, 128, 20]
    assert any("the clip and 2 augmented copies of it (3x)" in m and "GB before compression" in m for m in messages)
    config = resolve_feature_config({"sample_rate": 22050, "clip_seconds": 0.5, "frames": 20},
                                    overrides={"augment_copies": 2})
    x, _, clips = load_fold(FeatureStore(tmp_path / "store"), "folder", summary.key, "1")
    base, _, _ = load_fold(FeatureStore(tmp_path / "store"), "folder", plain.key, "1")
    assert stored_as_computed(x[:, :3], base)  # copy 0 is the clip itself (batched with its copies)
    for row, clip in zip(x, clips):
        copies = with_copies(decode_clip(root / clip, config), config, clip)
        assert len(copies) == 3 and not np.allclose(copies[1], copies[0]) and not np.allclose(copies[2], copies[1])
        for k, wave in enumerate(copies):
            feats = compute_features(torch.from_numpy(wave[None]), config)[0].numpy()
            assert stored_as_computed(row[3 * k:3 * k + 3], feats), (clip, k)
    # Seeded by the clip's path: two clips draw other copies; another extraction the same ones.
    assert clip_generator(config, clips[0]).random() != clip_generator(config, clips[1]).random()
    again = extract(ExtractRequest(dataset="folder", root=root, store=str(tmp_path / "again"),
                                   overrides={**FAST, "folds": 2, "augment_copies": 2}, workers=2, progress=False),
                    on_event=lambda m: None)
    assert np.array_equal(load_fold(FeatureStore(tmp_path / "again"), "folder", again.key, "1")[0], x)
