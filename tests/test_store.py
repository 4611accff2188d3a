"""The feature store: round trip, manifest, keys, fingerprints, verification of damage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import zarr

from audiofx.config import FeatureConfig
from audiofx.errors import StoreError
from audiofx.features.melspec import compute_features
from audiofx.pipeline.decode import decode_clip
from audiofx.pipeline.extract import ExtractRequest, extract
from audiofx.pipeline.reading import load_fold
from audiofx.pipeline.store import FeatureStore, chunk_clips
from tests.conftest import make_class_folder, real_signal, stored_as_computed

SMALL = {"sample_rate": 22050, "clip_seconds": 1.0, "frames": 50, "folds": 3}


def run(root: Path, store: Path | str, **kw) -> "ExtractSummary":  # noqa: F821
    overrides = {**SMALL, **kw.pop("overrides", {})}
    return extract(ExtractRequest(dataset="folder", root=root, store=str(store), overrides=overrides, workers=1,
                                  progress=False, **kw), on_event=lambda msg: None)


def test_round_trip_values_labels_and_paths(small_folder, store_url):
    from numcodecs import blosc

    threads = torch.get_num_threads()
    blosc.set_nthreads(2)
    summary = run(small_folder, store_url)
    # one worker runs in this process, on one thread, and gives the threads back after:
    # a notebook that extracts and then trains would otherwise train on one thread
    assert torch.get_num_threads() == threads and blosc.set_nthreads(2) == 2
    assert summary.status == "written" and summary.clips_total == 30 and not summary.skipped
    fs = FeatureStore(store_url)
    manifest = fs.read_manifest("folder", summary.key)
    assert manifest["clips"] == 30 and sorted(manifest["folds"]) == ["1", "2", "3"]
    assert manifest["classes"] == ["class0", "class1", "class2"]
    cfg = FeatureConfig.from_dict(manifest["feature_config"])
    seen = 0
    for fold in manifest["folds"]:
        x, y, clips = load_fold(fs, "folder", summary.key, fold)
        assert x.dtype == np.float16 and x.shape[1:] == (3, 128, 50)
        for xi, yi, path in zip(x, y, clips):
            assert path.startswith(f"class{yi}/")
            audio = decode_clip(small_folder / path, cfg)
            assert stored_as_computed(xi, compute_features(torch.from_numpy(audio)[None], cfg)[0].numpy())
            seen += 1
    assert seen == 30
    # stratified: every fold has every class
    for fold in manifest["folds"]:
        assert sorted(set(load_fold(fs, "folder", summary.key, fold)[1].tolist())) == [0, 1, 2]


def test_layout_chunks_are_write_units(tmp_path):
    root = make_class_folder(tmp_path / "raw", classes=2, per_class=20, seconds=0.5)
    summary = run(root, tmp_path / "store", overrides={"folds": 2})
    manifest = FeatureStore(tmp_path / "store").read_manifest("folder", summary.key)
    x = zarr.open_array(str(summary.path / "fold-1" / "x"), mode="r")
    assert x.shape == (20, 3, 128, 50) and x.chunks == (16, 3, 128, 50)  # 16 x 38 kB: the cap
    assert sorted(manifest["units"]) == ["1-0", "1-1", "2-0", "2-1"]
    assert manifest["sizes"]["stored_bytes"] > 0 and manifest["sizes"]["raw_bytes"] == 40 * 3 * 128 * 50 * 2


def test_chunks_hold_at_least_1_5_mb():
    from audiofx.config import resolve_feature_config

    assert chunk_clips(resolve_feature_config({"frames": 250})) == 8  # ESC-50: 8 x 192 kB
    assert chunk_clips(resolve_feature_config({"frames": 1500})) == 2  # GTZAN: 2 x 1.15 MB
    assert chunk_clips(resolve_feature_config({"frames": 50})) == 16


def test_second_run_does_nothing(small_folder, store_url):
    first = run(small_folder, store_url)
    fs = FeatureStore(store_url)
    manifest = fs.rel("folder", first.key, "manifest.json")
    before = fs.loc.read_bytes(manifest)
    second = run(small_folder, store_url)
    assert second.status == "complete" and second.key == first.key
    assert fs.loc.read_bytes(manifest) == before


def test_other_config_gets_another_key(small_folder, tmp_path):
    a = run(small_folder, tmp_path / "store")
    b = run(small_folder, tmp_path / "store", overrides={"n_mels": 64})
    c = run(small_folder, tmp_path / "store", preset="palanisamy2020")
    assert len({a.key, b.key, c.key}) == 3
    assert zarr.open_array(str(b.path / "fold-1" / "x"), mode="r").shape[2] == 64


def test_changed_dataset_is_never_reused_silently(small_folder, store_url):
    first = run(small_folder, store_url)
    old = FeatureStore(store_url).read_manifest("folder", first.key)["fingerprint"]
    sf.write(small_folder / "class0" / "class0-000.wav", real_signal(22050, 1.3, seed=99), 22050)
    with pytest.raises(StoreError, match="different copy of folder"):
        run(small_folder, store_url)
    rebuilt = run(small_folder, store_url, rebuild=True)
    assert rebuilt.status == "written" and rebuilt.key == first.key
    new = FeatureStore(store_url).read_manifest("folder", first.key)["fingerprint"]
    assert new["digest"] != old["digest"] and new["bytes"] > old["bytes"]


def test_verify_names_the_damaged_chunk_and_array(small_folder, tmp_path):
    summary = run(small_folder, tmp_path / "store")
    fs = FeatureStore(tmp_path / "store")
    assert fs.verify("folder", summary.key) == []
    chunk = summary.path / "fold-2" / "x" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    y = zarr.open_array(str(summary.path / "fold-3" / "y"), mode="r+")
    y[0] = (y[0] + 1) % 3
    problems = fs.verify("folder", summary.key)
    assert len(problems) == 2
    assert f"folder/{summary.key}/fold-2/x chunk 0 (clips 0-9)" in problems[0]
    assert problems[1] == f"folder/{summary.key}/fold-3/y: checksum mismatch"


def test_reader_refuses_a_store_without_manifest(small_folder, store_url):
    summary = run(small_folder, store_url)
    fs = FeatureStore(store_url)
    fs.loc.remove(fs.rel("folder", summary.key, "manifest.json"))
    with pytest.raises(StoreError, match="no manifest"):
        load_fold(FeatureStore(store_url), "folder", summary.key, "1")


def test_new_arrays_use_the_store_codec_and_old_codec_arrays_are_still_served(small_folder, tmp_path):
    """The codec is recorded per array and is not part of the key: a store written with the
    codec stores had before (Blosc zstd-1 bit shuffle) is read, verified and reused as it is."""
    from zarr.codecs import BloscCodec

    from audiofx.pipeline.store import X_CODEC

    summary = run(small_folder, tmp_path / "store")
    fs = FeatureStore(tmp_path / "store")
    fold = zarr.open_group(str(summary.path / "fold-1"), mode="r+")
    blosc = fold["x"].metadata.codecs[1]
    assert isinstance(blosc, BloscCodec) and blosc.typesize == 2  # zarr sets the item size from the dtype
    assert (blosc.cname, blosc.clevel, blosc.shuffle, blosc.blocksize) == (
        X_CODEC.cname, X_CODEC.clevel, X_CODEC.shuffle, X_CODEC.blocksize)
    before = load_fold(fs, "folder", summary.key, "1")
    values, chunks = fold["x"][:], fold["x"].chunks
    del fold["x"]
    old = fold.create_array("x", shape=values.shape, chunks=chunks, dtype=values.dtype, fill_value=0,
                            compressors=BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"))
    old[:] = values
    reopened = zarr.open_array(str(summary.path / "fold-1" / "x"), mode="r")
    assert reopened.metadata.codecs[1].shuffle.name == "bitshuffle"  # really the old codec on disk
    after = load_fold(fs, "folder", summary.key, "1")
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert fs.verify("folder", summary.key) == []  # checksums are of values, whatever the codec
    assert run(small_folder, tmp_path / "store").status == "complete"  # same key, nothing redone
