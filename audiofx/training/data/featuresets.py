"""Which stored feature set and folds a training stage reads: the set by dataset and preset,
or by key; the folds by the protocol (k-fold or the official split), their usable clips, and
the ``FoldSet`` every loader is given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from audiofx.config import LATER_FIELDS, FeatureConfig, canonical_json, resolve_feature_config, split_overrides
from audiofx.errors import ConfigError, StoreError
from audiofx.pipeline.datasets import get_adapter
from audiofx.pipeline.datasets.base import parse_ratios
from audiofx.pipeline.store import FeatureStore


def resolve_featureset(store: str, dataset: str, preset: str = "shin2021", key: str | None = None,
                       overrides: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(key, manifest) of the complete feature set of `dataset` extracted with `preset`, or of
    the given key prefix.

    ``overrides`` are the ``--set KEY=VALUE`` that extract was given: the set must have been
    extracted with those feature options (fit=resize) and dataset options (folds=2,
    ratios=70/15/15), the preset's config otherwise when one such set has it (a set extracted
    with more --set overrides besides is found too); no match is a StoreError listing the
    sets there are. Without them the set at the preset and the dataset's default options is
    preferred (a DCASE 2013 store holding 5 and 2 folds gives the 5), then the preset's config
    with other options, then the default options with another config (features extracted with
    --set overrides), then any; among equals the newest; --key chooses another. A set of
    augmented copies (pretraining's) is found only when ``augment_copies`` is asked for.
    """
    if key and overrides:  # the run would record a --set that did not choose its data
        raise ConfigError(f"--key {key} names one feature set and --set chooses among them", "give one of the two")
    adapter = get_adapter(dataset)
    feature_options, dataset_options = split_overrides(overrides or {}, adapter.options)
    if dataset_options.get("ratios") is not None:  # 70,15,15 and 70/15/15 are one split, recorded as the latter
        dataset_options["ratios"] = "/".join(map(str, parse_ratios(dataset_options["ratios"])))
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
        wanted_config = resolve_feature_config(adapter.defaults, preset, feature_options)
        # Sets holding augmented copies (pretraining's) are found only when asked for.
        complete = [(k, m) for k, m in complete if stored_copies(m) == wanted_config.copies]
        wanted = canonical_json(wanted_config.to_dict())

        def config_is(m: dict[str, Any]) -> bool:
            return canonical_json(m["feature_config"]) == wanted

        def features_have(m: dict[str, Any]) -> bool:
            """The feature options asked for, at their values (other fields may differ)."""
            recorded = m["feature_config"]
            return all(canonical_json(recorded.get(k, LATER_FIELDS.get(k))) == canonical_json(getattr(wanted_config, k))
                       for k in feature_options)

        def options_are(m: dict[str, Any], options: Mapping[str, Any]) -> bool:
            recorded = m.get("dataset_options", {})
            return all(canonical_json(recorded.get(k)) == canonical_json(v) for k, v in options.items())

        if feature_options or dataset_options:  # asked for: nothing else will do
            found = [(k, m) for k, m in complete if options_are(m, dataset_options) and features_have(m)]
            # The preset's config with those options is preferred; sets extracted with other
            # feature --set overrides besides are found too.
            found = [(k, m) for k, m in found if config_is(m)] or found
            if not found:
                asked = " ".join(f"--set {k}={v}" for k, v in (overrides or {}).items())
                there = "; ".join(f"{k} ({_options_text(m)})"
                                  for k, m in sorted(complete, key=lambda km: km[1]["created_at"])) or "none"
                raise StoreError(f"no complete {dataset} features with preset {preset} and {asked} in store {fs} "
                                 f"(sets there: {there})",
                                 f"extract them: audiofx extract --dataset {dataset} --preset {preset} {asked} "
                                 f"--store {store}, or give the --set a set there was extracted with")
            if not dataset_options:  # feature options alone: the dataset's default protocol first, as without --set
                found = [(k, m) for k, m in found if options_are(m, adapter.options)] or found
            complete = found
        else:
            complete = ([(k, m) for k, m in complete if config_is(m) and options_are(m, adapter.options)]
                        or [(k, m) for k, m in complete if config_is(m)]
                        or [(k, m) for k, m in complete if options_are(m, adapter.options)] or complete)
    if not complete:
        what = f"key {key}" if key else f"preset {preset}"
        raise StoreError(f"no complete {dataset} features ({what}) in store {fs}",
                         f"extract them first: audiofx extract --dataset {dataset} --preset {preset} --store {store}")
    complete.sort(key=lambda km: km[1]["created_at"])
    return complete[-1]


def normal_set_options(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``--set`` values as a run records them: a split's ratios in one spelling (70,15,15 and
    70/15/15 are one split), so a resume given either is the same run."""
    return {k: "/".join(map(str, parse_ratios(v))) if k.rpartition(":")[2] == "ratios" and v is not None else v
            for k, v in overrides.items()}


def stored_copies(manifest: dict[str, Any]) -> int:
    """Copies of each clip a set stores: 1, or 1 + augment_copies (config.FeatureConfig)."""
    return 1 + int(manifest.get("feature_config", {}).get("augment_copies", 0))


def check_single_copy(manifest: dict[str, Any], dataset: str, stage: str) -> None:
    """Refuse, before anything is loaded, a set of augmented copies outside pretraining: its
    channels are several copies of each clip, which only pretraining's views draw from."""
    if stored_copies(manifest) > 1:
        raise StoreError(f"{dataset} ({manifest.get('feature_key', '?')}) holds {stored_copies(manifest)} copies of each "
                         f"clip (augment_copies), which only pretraining draws its views from, not {stage}",
                         "give the key of a set extracted without --set augment_copies, or no --key and no --set "
                         "augment_copies")


def _options_text(manifest: dict[str, Any]) -> str:
    """A set's dataset options as --set would give them, e.g. folds=5, seed=0."""
    options = {k: v for k, v in manifest.get("dataset_options", {}).items() if v is not None}
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "no dataset options"


def input_channel(manifest: dict[str, Any], spec: str | None) -> int | None:
    """``--input-channel``: the stored channel a network takes alone (repeated on its 3 input
    channels), named by its source (left, right, mid: Zhou et al.'s average channel is mid)
    or by its index from 0; None: the whole stack."""
    if spec is None:
        return None
    channels = int(manifest["shape"][0])
    config = manifest.get("feature_config", {})
    sources = list(config.get("sources", ())) if config.get("kind", "logmel") == "logmel" else []
    if str(spec).isdigit() and int(spec) < channels:
        return int(spec)
    if sources.count(spec) == 1:
        return sources.index(spec)
    # the sources name the channels only when each is another (left, right, mid), not three windows of one
    named = f" ({', '.join(f'{i}: {s}' for i, s in enumerate(sources))})" if sources and len(set(sources)) == len(sources) else ""
    raise ConfigError(f"--input-channel {spec!r} is not one channel of the {channels} stored{named}",
                      f"give an index from 0 to {channels - 1}" + (", or a source that names one channel" if named else ""))


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


@dataclass
class FoldSet:
    """Which folds of which feature set to load. Plain, picklable values only."""

    store: str
    dataset: str
    key: str
    folds: list[str]

    def feature_store(self) -> FeatureStore:
        return FeatureStore(self.store)

    def manifest(self) -> dict[str, Any]:
        return self.feature_store().read_manifest(self.dataset, self.key)

    def raw_bytes(self, manifest: dict[str, Any] | None = None) -> int:
        """Bytes of the folds' x values as stored (float16): clips * prod(shape) * itemsize."""
        m = manifest or self.manifest()
        itemsize = np.dtype(m.get("feature_config", {}).get("dtype", "float16")).itemsize
        clips = sum(int(m["folds"][f]["clips"]) for f in self.folds)
        return clips * int(np.prod(m["shape"])) * itemsize


def open_foldset(store: str, dataset: str, key: str, folds: list[str] | str | None = None) -> FoldSet:
    """A FoldSet whose store is complete (has a manifest) and whose folds exist.

    ``folds`` may be one name, a list, or None for every fold. Raises StoreError otherwise.
    """
    fs = FeatureStore(store)
    manifest = fs.read_manifest(dataset, key)  # StoreError when the extraction did not finish
    known = list(manifest["folds"])
    if folds is None:
        names = known
    else:
        names = [str(f) for f in ([folds] if isinstance(folds, (str, int)) else folds)]
    if not names:
        raise StoreError(f"no folds chosen from {dataset}/{key}", f"known folds: {', '.join(known)}")
    unknown = [f for f in names if f not in manifest["folds"]]
    if unknown:
        raise StoreError(f"{dataset}/{key} has no fold {', '.join(map(repr, unknown))}",
                         f"known folds: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise StoreError(f"fold listed twice in {names}", "list each fold once")
    return FoldSet(str(store), dataset, key, names)


def pool_overrides(datasets: list[str], overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``--set`` of a pretraining pool, per dataset: ``DATASET:KEY=VALUE`` for that
    dataset, a feature option for every one, a plain dataset option (``folds=2``) for each
    dataset that has it. A key that applies to no pooled dataset is a ConfigError."""
    from audiofx.config import FEATURE_FIELDS

    out: dict[str, dict[str, Any]] = {ds: {} for ds in datasets}
    for key, value in overrides.items():
        ds, sep, name = key.rpartition(":")
        if sep:
            if ds not in out:
                raise ConfigError(f"--set {key}: {ds} is not in the pool ({', '.join(datasets) or 'none'})",
                                  "name a pooled dataset, or add it to --datasets")
            out[ds][name] = value
            continue
        takers = [d for d in datasets if name in FEATURE_FIELDS or name in get_adapter(d).options]
        if not takers:
            raise ConfigError(f"--set {key}: no dataset of the pool ({', '.join(datasets) or 'none'}) has an option "
                              f"{name!r}", "give a feature option, or DATASET:KEY=VALUE for one dataset's option")
        for d in takers:
            out[d][name] = value
    return out


def pool_datasets(store: str, preset: str, wanted: tuple[str, ...], say=print,
                  overrides: Mapping[str, Any] | None = None) -> list[tuple[str, str, dict]]:
    """(dataset, key, manifest) of every dataset in the pool: the named ones (of one size), or
    by default every dataset with usable clips in the store whose features have the preset's
    channels and mel bins, or the most common ones when none has (one network takes them all
    in one batch; the number of frames may differ). ``overrides``: the ``--set`` that picks
    each dataset's stored set (``pool_overrides``)."""
    names = list(dict.fromkeys(wanted)) or sorted({ds for ds, _, _ in FeatureStore(store).groups()})
    if len(names) < len(wanted):
        twice = sorted({d for d in wanted if list(wanted).count(d) > 1})
        say(f"{', '.join(twice)} given twice in --datasets: pooled once")
    chosen = pool_overrides(names, overrides or {})
    out = []
    for ds in names:
        try:
            key, manifest = resolve_featureset(store, ds, preset, overrides=chosen[ds])
            if not any(usable_clips(manifest, f) for f in manifest["folds"]):
                clips = sum(int(m["clips"]) for m in manifest["folds"].values())
                raise StoreError(f"{ds} ({key}) has no usable clip: all {clips} were skipped at extraction",
                                 f"{SKIPPED_HINT}, or leave it out of --datasets")
            out.append((ds, key, manifest))
        except StoreError:
            if wanted:
                raise
    if not out:
        raise StoreError(f"no complete {preset} features with usable clips in store {store} to pretrain on",
                         "extract some first: audiofx extract --dataset demo")
    # One network takes every set in one batch, standardised alike: the same channels and mel
    # bins, and the same power (log-magnitude is half log-power: a dB of level would mean
    # another step in the inputs). The number of frames may differ.
    preset_config = resolve_feature_config(get_adapter(out[0][0]).defaults, preset)
    out = _one_kind(out, wanted, say, "sizes", lambda m: tuple(int(v) for v in m["shape"][:2]),
                    tuple(preset_config.shape[:2]), lambda v: f"{v[0]} x {v[1]} bins", "the same channels and mel bins")
    out = _one_kind(out, wanted, say, "scales", lambda m: FeatureConfig.from_dict(m["feature_config"]).power,
                    preset_config.power, lambda p: f"power {p:g}", "the same power (--set power=...)")
    # Each clip once: a dataset whose clips another pooled one holds is left out (Hornauer et al.
    # pool "ESC-50, its subset ESC-10"); decided on the pool as resolved, so that they are
    # never both left out.
    pooled = [ds for ds, _, _ in out]
    for d in pooled:
        if d not in unique_clips(tuple(pooled)):
            say(f"{d}'s clips are all in {get_adapter(d).subset_of}'s: the pool takes them once, from "
                f"{get_adapter(d).subset_of}")
    return [entry for entry in out if entry[0] in unique_clips(tuple(pooled))]


def _one_kind(out: list[tuple[str, str, dict]], wanted: tuple[str, ...], say, kinds: str, of, preset: Any,
              name, alike: str) -> list[tuple[str, str, dict]]:
    """The pool's sets when ``of(manifest)`` is one value for all of them. Otherwise named sets
    (``wanted``) are refused, and a default pool keeps the sets at the preset's value when one
    has it (sets extracted with --set overrides are found too, as resolve_featureset finds
    them), else at the most common (the first on ties), and says which it left out."""
    values = {ds: of(m) for ds, _, m in out}
    if len(set(values.values())) <= 1:
        return out
    if wanted:
        raise StoreError(f"the datasets to pretrain on have features of different {kinds}: "
                         + ", ".join(f"{ds} {name(v)}" for ds, v in values.items()),
                         f"name sets extracted with {alike} in --datasets")
    seen = list(values.values())
    keep = preset if preset in seen else max(seen, key=seen.count)
    other = [ds for ds, v in values.items() if v != keep]
    say(f"left out of the pool (features not {name(keep)} like the rest): "
        + ", ".join(f"{ds} ({name(values[ds])})" for ds in other))
    return [entry for entry in out if entry[0] not in other]


def unique_clips(pool: tuple[str, ...]) -> tuple[str, ...]:
    """The pool without a dataset whose clips another of it already holds (ESC-10 beside
    ESC-50: the adapters say whose subset they are): each clip is pretrained on once."""
    return tuple(d for d in pool if get_adapter(d).subset_of not in pool)
