"""Which stored feature set a training stage reads: by dataset and preset, or by key."""

from __future__ import annotations

from typing import Any

from audiofx.config import canonical_json, resolve_feature_config
from audiofx.errors import StoreError
from audiofx.pipeline.datasets import get_adapter
from audiofx.pipeline.store import FeatureStore


def resolve_featureset(store: str, dataset: str, preset: str = "shin2021", key: str | None = None) -> tuple[str, dict[str, Any]]:
    """(key, manifest) of the complete feature set of `dataset` extracted with `preset` (at
    the dataset's default rate, length and frames), or of the given key prefix.

    Several matches (e.g. two GTZAN splits) take the newest; --key chooses another. When no
    set has the preset's exact config (features extracted with --set overrides), the newest
    complete set of the dataset is used.
    """
    fs = FeatureStore(store)
    complete = []
    for ds, k, _ in fs.groups():
        if ds != dataset or (key and not k.startswith(key)):
            continue
        try:
            complete.append((k, fs.read_manifest(ds, k)))
        except StoreError:
            continue
    if not key:
        # Prefer the preset at the dataset's defaults; features extracted with --set overrides
        # are still found (the newest), and the caller prints the key it uses.
        wanted = canonical_json(resolve_feature_config(get_adapter(dataset).defaults, preset).to_dict())
        exact = [(k, m) for k, m in complete if canonical_json(m["feature_config"]) == wanted]
        complete = exact or complete
    if not complete:
        what = f"key {key}" if key else f"preset {preset}"
        raise StoreError(f"no complete {dataset} features ({what}) in store {fs.root}",
                         f"extract them first: audiofx extract --dataset {dataset} --preset {preset} --store {store}")
    complete.sort(key=lambda km: km[1]["created_at"])
    return complete[-1]


def fold_order(fold: str) -> tuple[bool, str]:
    """Sort key for fold names: numbered folds in numeric order (2 before 10), then named
    splits alphabetically."""
    return (not fold.isdigit(), fold.zfill(6))


def validation_fold(folds: list[str], plan: list[tuple[str, list[str]]]) -> str | None:
    """An official validation split that neither trains nor tests (FSD50K's ``val``): it is
    scored every epoch so that an epoch can be selected without looking at the test split."""
    used = {f for test, train in plan for f in [test, *train]}
    return next((f for f in ("val", "validation") if f in folds and f not in used), None)


# What to do about clips skipped at extraction: stages that find none usable say it.
SKIPPED_HINT = ("extract listed them (so does the manifest, under skipped): fix or replace those audio files and "
                "extract again")


def usable_clips(manifest: dict[str, Any], fold: str) -> int:
    """Clips of ``fold`` that extraction did not skip (the manifest's count; stores written
    before it was recorded count every clip)."""
    entry = manifest["folds"][fold]
    return int(entry.get("ok", entry["clips"]))


def check_usable(manifest: dict[str, Any], dataset: str, plan: list[tuple[str, list[str]]],
                 val_fold: str | None = None) -> None:
    """Refuse, before anything is loaded, a split with nothing to test, train or select on:
    folds whose every clip was skipped at extraction (unreadable audio) would otherwise give
    empty tensors, NaN statistics and a failure deep in training. Raises StoreError."""
    roles = [(f"test fold {test}", [test]) for test, _ in plan]
    roles += [(f"training folds {', '.join(train)} (testing on {test})", train) for test, train in plan]
    roles += [(f"validation split {val_fold}", [val_fold])] if val_fold else []
    for role, folds in roles:
        if folds and not sum(usable_clips(manifest, f) for f in folds):
            clips = sum(int(manifest["folds"][f]["clips"]) for f in folds)
            raise StoreError(f"{dataset} has no usable clip in its {role}: all {clips} were skipped at extraction",
                             f"{SKIPPED_HINT}, or choose other folds with --fold K")


def split_folds(folds: list[str], which: str) -> list[tuple[str, list[str]]]:
    """(test fold, training folds) pairs for --fold all|K.

    Numbered official folds (ESC-50 1-5, UrbanSound8K 1-10, stratified k folds) give k-fold
    cross-validation. Named splits (TUT/TAU train/evaluate, FSD50K train/val/eval) give their
    one official split: test on evaluate/eval, train on train.
    """
    if all(f.isdigit() for f in folds):
        tests = folds if which == "all" else [which]
        bad = [t for t in tests if t not in folds]
        if bad:
            raise StoreError(f"fold {bad[0]} does not exist", f"folds are {', '.join(folds)} (or all)")
        return [(t, [f for f in folds if f != t]) for t in tests]
    test = next((f for f in ("eval", "evaluate", "test") if f in folds), None)
    if test is None or (which not in ("all", test)):
        raise StoreError(f"cannot make a test split from folds {', '.join(folds)} with --fold {which}",
                         f"use --fold all or --fold {test}" if test else "name a fold eval, evaluate or test")
    return [(test, ["train"] if "train" in folds else [f for f in folds if f != test])]
