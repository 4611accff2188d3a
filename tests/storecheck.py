"""One check for "this feature set equals that one", value for value, used wherever a run
(Dask, resumed, concurrent, remote) must give what a plain local run gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from audiofx.pipeline.store import FeatureStore

# Manifest fields that say when and how a set was written, not what it holds: the time, the
# executor (workers, scheduler) and the bytes on disk (these count the unit records, which
# hold the writing process's pid). Everything else (config, fingerprint, counts, every
# unit's and array's checksum, skipped and missing clips) must be equal.
_CIRCUMSTANCES = ("created_at", "extraction")


def only_key(store: FeatureStore, dataset: str) -> str:
    """The feature key of the one feature set of `dataset` in the store."""
    keys = [k for d, k, _ in store.groups() if d == dataset]
    assert len(keys) == 1, f"{store}: {len(keys)} feature sets of {dataset}: {keys}"
    return keys[0]


def feature_arrays(store: str | Path, dataset: str, key: str) -> dict[str, np.ndarray]:
    """Every fold's x, y, clip and ok as 'FOLD/NAME', read from the store itself (a local
    directory or a URL; never through the read-through cache)."""
    fs = FeatureStore(store)
    return {f"{fold}/{name}": zarr.open_array(fs.zarr_store(dataset, key, f"fold-{fold}", name), mode="r")[:]
            for fold in fs.read_manifest(dataset, key)["folds"] for name in ("x", "y", "clip", "ok")}


def _content(manifest: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in manifest.items() if k not in _CIRCUMSTANCES}
    out["sizes"] = {k: v for k, v in manifest["sizes"].items() if k != "stored_bytes"}
    return out


def assert_same_features(store: str | Path, reference: str | Path, dataset: str) -> dict[str, Any]:
    """The one feature set of `dataset` in `store` equals the one in `reference`: the same
    feature key, manifests equal but for _CIRCUMSTANCES, every array equal in dtype, shape and
    value, and `store` intact by `verify`. Returns store's manifest for the caller's counts."""
    fs, ref = FeatureStore(store), FeatureStore(reference)
    key = only_key(fs, dataset)
    assert key == only_key(ref, dataset)  # the same feature config and code
    manifest = fs.read_manifest(dataset, key)
    assert _content(manifest) == _content(ref.read_manifest(dataset, key))
    got, expected = feature_arrays(store, dataset, key), feature_arrays(reference, dataset, key)
    assert got.keys() == expected.keys()
    for name, values in got.items():
        assert values.dtype == expected[name].dtype and values.shape == expected[name].shape, name
        assert np.array_equal(values, expected[name]), name
    assert fs.verify(dataset, key, manifest) == []
    return manifest
