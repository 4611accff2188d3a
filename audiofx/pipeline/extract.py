"""Dataset -> feature store: plan the write units, run them in parallel, finalize.

The coordinator (this process) indexes the dataset, checks it, creates the group with every
array at its final shape, and hands whole write units to worker processes (joblib/loky).
Each worker decodes its clips, computes features in small batches, writes its chunk and
then its unit record. When every unit has a record, the coordinator writes the manifest.
A killed run leaves finished units behind; the next run does only the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from audiofx.config import (
    FeatureConfig,
    feature_key,
    resolve_feature_config,
    split_overrides,
)
from audiofx.errors import AudioSkip, ConfigError, DatasetError, StoreError
from audiofx.pipeline.datasets import get_adapter
from audiofx.pipeline.datasets.base import DatasetIndex, default_root, printable_path
from audiofx.pipeline.decode import decode_clip
from audiofx.pipeline.executors import Scheduler, open_executor, parse_scheduler
from audiofx.pipeline.fingerprint import file_sizes, fingerprint
from audiofx.pipeline.store import (
    FeatureStore,
    GroupPlan,
    Unit,
    chunk_clips,
    plan_units,
)
from audiofx.pipeline.waveaugment import with_copies

FINGERPRINTS = ("sizes", "content")  # what tells a changed dataset: names and sizes, or also sha256 of the files


@dataclass
class ExtractRequest:
    dataset: str
    root: Path | None = None  # default data/raw/<dataset>
    store: str = "data/features"
    preset: str = "shin2021"
    overrides: dict[str, Any] = field(default_factory=dict)  # --set key=value (features or dataset options)
    workers: int = 0  # 0: one per core
    device: str = "cpu"
    strict: bool = False
    allow_missing: bool = False
    rebuild: bool = False
    progress: bool = True
    scheduler: str | None = None  # None: joblib here; "local:N" or "tcp://HOST:PORT": Dask (see executors.py)
    fingerprint: str = "sizes"  # sizes, or content: every source file's sha256 too (files edited in place)


@dataclass
class ExtractSummary:
    dataset: str
    key: str
    path: Path
    status: str  # "complete" (nothing to do) or "written"
    clips_total: int = 0  # rows in the arrays
    clips_ok: int = 0  # usable rows (the manifest's count)
    clips_written: int = 0  # computed by this run
    units_total: int = 0
    units_done_before: int = 0
    units_computed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stored_bytes: int = 0
    raw_bytes: int = 0

    @property
    def clips_per_second(self) -> float:
        return self.clips_written / self.seconds if self.seconds > 0 else 0.0

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 0.0


@dataclass(frozen=True)
class UnitJob:
    """Everything a worker needs, as plain picklable values (stores are opened in the worker)."""

    store: str
    dataset: str
    key: str
    unit: Unit
    root: str
    paths: tuple[str, ...]
    config: dict[str, Any]
    device: str
    strict: bool
    batch: int


def _one_thread_per_worker() -> None:
    """Parallelism comes from worker processes; threads inside them (torch's pool, Blosc's
    compressor threads, one per core by default) would only fight over the same cores."""
    import torch
    from numcodecs import blosc

    torch.set_num_threads(1)
    blosc.set_nthreads(1)


def run_unit(job: UnitJob) -> dict[str, Any]:
    """Decode, compute and write one write unit. Runs in a worker process."""
    import torch

    from audiofx.features.melspec import compute_features

    _one_thread_per_worker()
    store = FeatureStore(job.store)
    if store.unit_done(job.dataset, job.key, job.unit.id):  # finished meanwhile by a concurrent run
        return {"unit": job.unit.id, "computed": False, "skipped": [], "clips": 0}
    started = time.perf_counter()
    config = FeatureConfig.from_dict(job.config)
    x = np.zeros((len(job.paths),) + config.shape, dtype=config.dtype)
    audio, rows, skipped = [], [], []
    for i, rel in enumerate(job.paths):
        try:
            audio.append(decode_clip(Path(job.root) / rel, config))
            rows.append(i)
        except AudioSkip as skip:
            if job.strict:
                return {"unit": job.unit.id, "strict_failure": [rel, skip.reason]}
            skipped.append((rel, skip.reason))
    # (row, copy, waveform): the clip itself, then its augmented copies (augment_copies)
    waves = [(row, k, wave) for row, clip in zip(rows, audio)
             for k, wave in enumerate(with_copies(clip, config, job.paths[row]) if config.augment_copies else [clip])]
    c = config.base_channels
    with torch.inference_mode():
        # Waveforms of one length are batched together (all of them, unless fit=resize keeps
        # each clip's own length).
        by_length: dict[int, list[int]] = {}
        for at, (_, _, wave) in enumerate(waves):
            by_length.setdefault(wave.shape[-1], []).append(at)
        for group in by_length.values():
            for b in range(0, len(group), job.batch):
                part = group[b:b + job.batch]
                batch = torch.from_numpy(np.stack([waves[a][2] for a in part])).to(job.device)
                feats = compute_features(batch, config).cpu().numpy()
                for j, a in enumerate(part):  # cast to the store dtype by the assignment
                    row, k, _ = waves[a]
                    x[row, k * c:(k + 1) * c] = feats[j]
    # Features that are not finite (in the store's dtype: float16 overflows above 65504) would
    # train on NaN: such a clip is skipped, with the reason, like unreadable audio.
    for i in rows:
        if not np.isfinite(x[i]).all():
            rel = job.paths[i]
            reason = (f"features not finite ({int(np.isnan(x[i]).sum())} NaN, {int(np.isinf(x[i]).sum())} infinite "
                      f"of {x[i].size}): samples out of the audio range, or a feature option that makes the log-mel "
                      "undefined")
            if job.strict:
                return {"unit": job.unit.id, "strict_failure": [rel, reason]}
            skipped.append((rel, reason))
            x[i] = 0
    try:
        record = store.write_unit(job.dataset, job.key, job.unit, x, skipped,
                                  extra={"seconds": round(time.perf_counter() - started, 3), "pid": os.getpid()})
    except OSError as err:  # a full or read-only disk: the parent stops the run and says so in one line
        if err.errno not in _WRITE_ERRNOS:
            raise
        return {"unit": job.unit.id, "write_failure": [err.errno, err.strerror, err.filename]}
    return {**record, "computed": True, "clips": len(rows)}


def storage_line(dataset: str, clips: int, config: FeatureConfig) -> str:
    """What a set will take, said before extraction starts (augmented copies multiply it)."""
    raw = clips * int(np.prod(config.shape)) * np.dtype(config.dtype).itemsize
    copies = (f", the clip and {config.augment_copies} augmented cop{'y' if config.augment_copies == 1 else 'ies'} "
              f"of it ({config.copies}x)" if config.augment_copies else "")
    shape = "x".join(map(str, config.shape))
    return f"{dataset}: {clips} clips of {shape} {config.dtype}{copies}: {raw / 1e9:.3g} GB before compression"


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_device(device: str) -> str:
    import torch

    if device == "cpu":
        return device
    index = device.removeprefix("cuda").removeprefix(":")
    if not device.startswith("cuda") or (index and not index.isdigit()) or device == "cuda:":
        raise ConfigError(f"unknown device {device!r}", "use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device} was asked for but torch sees no CUDA device here", "use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: torch sees only {torch.cuda.device_count()} CUDA device(s)",
                          "use --device cuda or a smaller N")
    return device


# A fold's name is a folder name (fold-<name>) and part of every unit id and record file name.
FOLD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")


def check_fold_names(index: DatasetIndex) -> None:
    bad = next((f for f in index.folds if not FOLD_NAME.fullmatch(f)), None)
    if bad is not None:
        source = next((str(p) for p in index.metadata_files), str(index.root))
        raise DatasetError(f"{source}: fold name {printable_path(bad)!r} cannot name a fold",
                           "use letters, digits and - _ . + (starting with a letter or digit), e.g. 1, 2 or train, test")


def leave_out_unnamed(index: DatasetIndex) -> DatasetIndex:
    """The index without files whose names are not UTF-8 (a store records every name as
    text): each is listed as skipped, with its bytes shown as \\xNN."""
    unnamed = []
    for clip in index.clips:
        try:
            clip.path.encode("utf-8")
        except UnicodeEncodeError:
            unnamed.append(clip)
    if not unnamed:
        return index
    skipped = [(printable_path(c.path), "file name is not UTF-8 (rename it to include it)") for c in unnamed]
    return dataclasses.replace(index, clips=[c for c in index.clips if c not in unnamed],
                               skipped=[*index.skipped, *skipped])


def build_plan(req: ExtractRequest) -> tuple[GroupPlan, DatasetIndex, FeatureConfig]:
    # Options first: a misspelt one is told before the dataset is indexed and every file stat'ed.
    if req.fingerprint not in FINGERPRINTS:
        raise ConfigError(f"--fingerprint {req.fingerprint!r} is unknown", f"use {' or '.join(FINGERPRINTS)}")
    adapter = get_adapter(req.dataset)
    root = Path(req.root) if req.root else default_root(req.dataset)
    feature_overrides, option_overrides = split_overrides(req.overrides, dict(adapter.options))
    config = resolve_feature_config(adapter.defaults, req.preset, feature_overrides)
    index = adapter.index(root, {**adapter.options, **option_overrides})
    # A dataset option given that the protocol has no use for (the seed of DCASE 2013's official
    # folds, the fold count of a ratios split) would be recorded as not given: the same --set
    # could then never find the set again.
    unused = [k for k in option_overrides if k in index.options and index.options[k] is None]
    if unused:
        raise ConfigError(f"--set {unused[0]}={option_overrides[unused[0]]} does not apply to this {adapter.name} protocol "
                          f"({', '.join(f'{k}={v}' for k, v in index.options.items() if v is not None)})",
                          f"drop --set {unused[0]}")
    check_fold_names(index)
    index = leave_out_unnamed(index)
    if not index.clips:
        raise DatasetError(f"{adapter.name}: no clips found under {root}", f"expected layout: {adapter.layout}")
    sizes = file_sizes(index)
    missing = sorted(p for p, s in sizes.items() if s < 0)
    if missing and not req.allow_missing:
        raise DatasetError(
            f"{len(missing)} file(s) listed in the {adapter.name} metadata are missing under {root}, "
            f"e.g. {', '.join(missing[:3])}",
            "restore them, or pass --allow-missing to go on without them (they are recorded in the manifest)",
        )
    absent = set(missing)
    folds: dict[str, list[tuple[str, Any]]] = {f: [] for f in index.folds}
    for clip in index.clips:
        if clip.path not in absent:
            folds.setdefault(clip.fold, []).append((clip.path, clip.label))
    folds = {f: c for f, c in folds.items() if c}
    options = dict(index.options)
    key = feature_key(config, options)
    fp = fingerprint(index, sizes, content=req.fingerprint == "content")
    plan = GroupPlan(
        dataset=adapter.name, key=key, config=config, fingerprint=fp.to_dict(), classes=list(index.classes),
        multilabel=index.multilabel, folds=folds, dataset_options=options,
        missing=missing, left_out=list(index.skipped),
    )
    return plan, index, config


# Errors of the disk a store is written to, not of the audio read: each becomes one line.
_WRITE_ERRNOS = {errno.ENOSPC: "free space there, or pass another --store",
                 errno.EDQUOT: "free space within your quota there, or pass another --store",
                 errno.EFBIG: "raise the file size limit (ulimit -f), or pass another --store",
                 errno.EROFS: "pass a --store on a writable disk", errno.EACCES: "pass a --store you may write to",
                 errno.EPERM: "pass a --store you may write to"}


@contextlib.contextmanager
def store_writes(store: str) -> Iterator[None]:
    """A full disk, a quota, a file size limit, a read-only filesystem or a permission denied
    while the store is written:
    one line naming the store and the file, and what to do; finished write units are kept."""
    try:
        yield
    except OSError as err:
        if err.errno not in _WRITE_ERRNOS:
            raise
        raise StoreError(f"cannot write to store {store}: {err.strerror} ({err.filename or 'a file of it'})",
                         f"{_WRITE_ERRNOS[err.errno]}; the write units already finished are kept, and the same "
                         "command finishes the rest") from None


def extract(req: ExtractRequest, on_event: Callable[[str], None] | None = None) -> ExtractSummary:
    say = on_event or (lambda msg: print(msg, file=sys.stderr))
    device = check_device(req.device)
    scheduler = parse_scheduler(req.scheduler, req.workers)
    plan, index, config = build_plan(req)
    with store_writes(req.store):
        return _extract(req, plan, index, config, say, device, scheduler)


def _extract(req: ExtractRequest, plan: GroupPlan, index: DatasetIndex, config: FeatureConfig,
             say: Callable[[str], None], device: str, scheduler: Scheduler | None) -> ExtractSummary:
    store = FeatureStore(req.store)
    path = store.group_path(plan.dataset, plan.key)
    state = store.prepare(plan, rebuild=req.rebuild)
    if plan.fingerprint.get("content") and not store.recorded_fingerprint(plan.dataset, plan.key).get("content"):
        say(f"note: {path} was made without --fingerprint content: only the files' names and sizes could be "
            "compared (--rebuild records their content)")
    summary = ExtractSummary(plan.dataset, plan.key, path, "complete", missing=plan.missing)
    if state == "complete":
        _fill_from_manifest(summary, store.read_manifest(plan.dataset, plan.key))
        summary.clips_total = summary.clips_ok
        return summary

    units = plan_units({f: len(c) for f, c in plan.folds.items()}, chunk_clips(config))
    done = store.unit_records(plan.dataset, plan.key)
    todo = [u for u in units if u.id not in done]
    # Start at a random place: two runs on the same store then mostly work on different
    # units (each also skips units the other has finished), yet each run reads in order.
    shift = random.Random(os.getpid() ^ time.time_ns()).randrange(len(todo)) if todo else 0
    todo = todo[shift:] + todo[:shift]
    summary.status = "written"
    summary.units_total, summary.units_done_before = len(units), len(units) - len(todo)
    summary.clips_total = sum(len(c) for c in plan.folds.values())
    if not summary.units_done_before:
        say(storage_line(plan.dataset, summary.clips_total, config))
    if summary.units_done_before:
        say(f"resuming {plan.dataset}/{plan.key}: {summary.units_done_before} of {len(units)} write units already done")

    cores = default_workers()
    if req.workers > cores and scheduler is None:
        say(f"--workers {req.workers} is more than the {cores} cores here: using {cores} (each worker keeps one core "
            "busy; more only take turns)")
    workers = max(1, min(req.workers or cores, cores, len(todo) or 1))
    # Absolute paths: Dask workers (and a remote-free store on a shared mount) may run in
    # another working directory.
    store_at = store.url if store.remote else str(store.root.resolve())
    jobs = [
        UnitJob(store_at, plan.dataset, plan.key, u, str(Path(index.root).resolve()),
                tuple(p for p, _ in plan.folds[u.fold][u.start:u.stop]), config.to_dict(), device, req.strict,
                batch=16 if device != "cpu" else 2)  # small batches keep CPU intermediates in cache
        for u in todo
    ]
    started = time.perf_counter()
    results, ran = _run_jobs(jobs, workers, scheduler, req.progress, summary.clips_total, plan.dataset)
    if results and "write_failure" in results[-1]:  # store_writes makes it one line
        raise OSError(*results[-1]["write_failure"])
    if results and "strict_failure" in results[-1]:  # the run stops at the first one
        rel, reason = results[-1]["strict_failure"]
        raise DatasetError(f"{index.root / rel}: {reason}",
                           "--strict is set: fix or remove the file, or drop --strict to record it as skipped")
    summary.seconds = time.perf_counter() - started
    summary.units_computed = sum(1 for r in results if r.get("computed"))
    summary.clips_written = sum(r.get("clips", 0) for r in results)
    _fill_from_manifest(summary, store.finalize(plan, units, {**ran, "device": device,
                                                              "seconds": round(summary.seconds, 2)}))
    return summary


def _fill_from_manifest(summary: ExtractSummary, manifest: dict[str, Any]) -> None:
    summary.clips_ok = manifest["clips"]
    summary.skipped = [(s["clip"], s["reason"]) for s in manifest["skipped"]]
    summary.stored_bytes, summary.raw_bytes = manifest["sizes"]["stored_bytes"], manifest["sizes"]["raw_bytes"]


def _run_jobs(jobs: list[UnitJob], workers: int, scheduler: Scheduler | None, progress: bool,
              total: int, name: str) -> tuple[list[dict], dict[str, Any]]:
    """Run the units with joblib (scheduler None) or on Dask; return the results and how they
    ran (the manifest's extraction info: metadata only, it changes no array)."""
    from tqdm import tqdm

    if not jobs:  # every unit finished before: nothing to start a cluster for
        ran: dict[str, Any] = {"workers": workers} if scheduler is None else \
            {"workers": scheduler.local_workers, "scheduler": scheduler.text}
        return [], ran
    initial = total - sum(len(j.paths) for j in jobs)
    sizes = {j.unit.id: len(j.paths) for j in jobs}
    results: list[dict] = []
    with open_executor(scheduler, workers) as executor:
        if scheduler is not None:
            _check_workers_see(executor, jobs[0])
        ran = executor.info
        bar = tqdm(total=total, initial=initial, unit="clip", desc=f"extract {name}", disable=not progress,
                   file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
        try:
            for result in executor.map_unordered(run_unit, jobs):
                results.append(result)
                if "strict_failure" in result or "write_failure" in result:
                    break  # leaving the executor cancels the units not yet run
                bar.update(sizes[result["unit"]])
        finally:
            bar.close()
    return results, ran


def _missing_paths(paths: list[str]) -> list[str]:
    """Run on each worker: which of the coordinator's paths this machine does not see."""
    return [p for p in paths if not Path(p).exists()]


def _check_workers_see(executor: Any, job: UnitJob) -> None:
    """Dask workers on other machines must see the dataset root and a local store at the same
    paths (a shared filesystem); say so at once rather than failing in every task."""
    paths = [job.root, str(Path(job.root) / job.paths[0])]
    store = FeatureStore(job.store)
    if not store.remote:
        paths.append(str(store.group_path(job.dataset, job.key)))
    for worker, missing in sorted(executor.on_every_worker(_missing_paths, paths).items()):
        if missing:
            raise DatasetError(f"Dask worker {worker} does not see {missing[0]}",
                               "every worker needs the dataset root and the store at the same paths "
                               "(a shared filesystem), or an s3:// store; see docs/scaling.md")
