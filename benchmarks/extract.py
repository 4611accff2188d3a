"""Extraction throughput: audiofx end to end vs. librosa + joblib vs. the arithmetic floor.

    python benchmarks/extract.py [--clips N] [--workers W] [--out DIR] [--keep] [--device cuda]

Two synthetic datasets in the `folder` layout are generated first (not timed):
  esc-like    5 s clips, 44.1 kHz mono PCM_16 WAV, features at 44.1 kHz (no resampling)
  gtzan-like  30 s clips, stored at 44.1 kHz PCM_16 WAV, features at 22.05 kHz, so the
              44.1 -> 22.05 kHz resampling is part of what is measured

Then, for each set, three paths on the same W worker processes:
  audiofx   extract() into a fresh store: decode, resample, features, Zarr write, manifest
  librosa   per clip librosa.load (soxr_hq) + the librosa reference features + a float16 .npy
  floor     compute_features alone on clips decoded beforehand, batch 2, one torch thread per
            process, no I/O: the best the feature math can do on this machine

All three use joblib's loky backend with n_jobs=W and the same worker environment, so loky
keeps one executor for the whole run: worker start-up and imports are paid in the warm-ups,
not in the timed calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SEED = 20240501
FILE_RATE = 44100  # both sets are stored at 44.1 kHz
CLASSES = ("tones", "chirps", "noise", "music")
FOLDS = 5


@dataclass(frozen=True)
class SetSpec:
    name: str
    seconds: float
    overrides: dict  # ExtractRequest.overrides: feature options and the folder adapter's folds


SETS = (
    SetSpec("esc-like", 5.0, {"sample_rate": 44100, "clip_seconds": 5.0, "frames": 250, "folds": FOLDS}),
    SetSpec("gtzan-like", 30.0, {"sample_rate": 22050, "clip_seconds": 30.0, "frames": 1500, "folds": FOLDS}),
)


# -- synthetic audio -----------------------------------------------------------------------
# Each class has its own texture so spectra differ between and within clips: harmonic notes,
# sweeps, band-limited noise bursts, and a "music" mix of chords and percussive hits.

def _envelope(n: int, sr: int, attack: float, release: float) -> np.ndarray:
    a, r = max(1, int(attack * sr)), max(1, int(release * sr))
    env = np.ones(n)
    env[:min(a, n)] = np.linspace(0, 1, min(a, n))
    env[-min(r, n):] *= np.exp(-np.linspace(0, 5, min(r, n)))
    return env


def _place(x: np.ndarray, event: np.ndarray, start: int) -> None:
    stop = min(len(x), start + len(event))
    x[start:stop] += event[:stop - start]


def _tone(rng, sr: int, dur: float, f0: float, partials: int = 6) -> np.ndarray:
    t = np.arange(int(dur * sr)) / sr
    vib = 1 + 0.006 * np.sin(2 * np.pi * rng.uniform(4, 7) * t)
    phase = 2 * np.pi * np.cumsum(f0 * vib) / sr
    amps = rng.uniform(0.3, 1.0, partials) / np.arange(1, partials + 1)
    wave = sum(a * np.sin(k * phase) for k, a in enumerate(amps, start=1) if k * f0 < sr / 2)
    return wave * _envelope(len(t), sr, rng.uniform(0.005, 0.05), rng.uniform(0.05, 0.3))


def _chirp(rng, sr: int, dur: float) -> np.ndarray:
    t = np.arange(int(dur * sr)) / sr
    f0, f1 = rng.uniform(80, 2000), rng.uniform(200, 12000)
    if rng.random() < 0.5:  # exponential sweep
        freq = f0 * (f1 / f0) ** (t / dur)
    else:  # linear sweep
        freq = f0 + (f1 - f0) * t / dur
    return np.sin(2 * np.pi * np.cumsum(freq) / sr) * _envelope(len(t), sr, 0.01, 0.05)


def _noise_burst(rng, sr: int, dur: float) -> np.ndarray:
    """White noise shaped in the frequency domain to a random band, with a fast attack."""
    n = int(dur * sr)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / sr)
    lo = rng.uniform(50, 4000)
    hi = lo * rng.uniform(1.5, 8)
    spec *= np.exp(-0.5 * ((np.log(f + 1) - np.log((lo + hi) / 2)) / np.log(hi / lo)) ** 2)
    wave = np.fft.irfft(spec, n)
    return wave / (np.abs(wave).max() + 1e-9) * _envelope(n, sr, 0.002, rng.uniform(0.02, dur))


def synth_clip(cls: str, seconds: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    n = int(seconds * sr)
    x = 0.01 * rng.standard_normal(n)  # a little background noise: no digital silence
    cursor = 0.0
    while cursor < seconds:
        start = int(cursor * sr)
        if cls == "tones":
            dur = rng.uniform(0.2, 1.5)
            _place(x, 0.5 * _tone(rng, sr, dur, 110 * 2 ** (rng.integers(0, 36) / 12)), start)
        elif cls == "chirps":
            dur = rng.uniform(0.3, 2.0)
            _place(x, 0.4 * _chirp(rng, sr, dur), start)
        elif cls == "noise":
            dur = rng.uniform(0.05, 1.0)
            _place(x, 0.6 * _noise_burst(rng, sr, dur), start)
        else:  # music: a chord on every beat, a percussive hit on most
            dur = 60 / rng.uniform(80, 160)
            root = 110 * 2 ** (rng.integers(0, 24) / 12)
            for step in (0, 4, 7):
                _place(x, 0.2 * _tone(rng, sr, dur, root * 2 ** (step / 12), partials=4), start)
            if rng.random() < 0.8:
                _place(x, 0.5 * _noise_burst(rng, sr, 0.08), start)
        cursor += dur * rng.uniform(0.5, 1.1)  # events overlap a little
    return (0.9 * x / np.abs(x).max()).astype(np.float32)


def class_count(clips: int) -> int:
    # The folder adapter's stratified folds need every class to hold >= FOLDS clips.
    return max(2, min(len(CLASSES), clips // FOLDS))


def make_dataset(root: Path, clips: int, seconds: float, classes: int, seed: int) -> list[Path]:
    """Write `clips` WAVs in the folder layout, dealt round-robin over the classes.

    Deterministic per (seed, clip), so an existing file (--out ... --keep) is reused as is.
    """
    paths = []
    for i in range(clips):
        cls = CLASSES[i % classes]
        path = root / cls / f"{cls}-{i:05d}.wav"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            audio = synth_clip(cls, seconds, FILE_RATE, np.random.default_rng([seed, i]))
            tmp = path.with_name(f".{path.name}.tmp")  # hidden: never indexed if left behind
            sf.write(tmp, audio, FILE_RATE, subtype="PCM_16", format="WAV")
            os.replace(tmp, path)
        paths.append(path)
    return paths


# -- the three measured paths ----------------------------------------------------------------

def run_audiofx(root: Path, store: Path, overrides: dict, workers: int, device: str):
    """One extract() call into a fresh store; returns (seconds, summary)."""
    from audiofx.pipeline.extract import ExtractRequest, extract

    shutil.rmtree(store, ignore_errors=True)  # fresh: an existing complete group would be a no-op
    req = ExtractRequest(dataset="folder", root=root, store=str(store), workers=workers, device=device,
                         progress=False, overrides=dict(overrides))
    started = time.perf_counter()
    summary = extract(req, on_event=lambda msg: None)
    seconds = time.perf_counter() - started
    if summary.status != "written" or summary.skipped:
        raise RuntimeError(f"audiofx run on {root} did not write every clip: {summary}")
    return seconds, summary


def baseline_clip(path: str, out: str, config) -> None:
    """librosa path for one clip, in a worker: load + resample, pad/crop, features, save."""
    import librosa
    import torch

    from audiofx.features.reference import librosa_features

    torch.set_num_threads(1)  # the reference resizes with torch; keep it to one thread like audiofx
    audio, _ = librosa.load(path, sr=config.sample_rate, mono=True)  # res_type defaults to soxr_hq
    audio = librosa.util.fix_length(audio, size=config.clip_samples)
    np.save(out, librosa_features(audio, config).astype(np.float16))


def run_baseline(paths: list[Path], root: Path, out_dir: Path, config, workers: int) -> float:
    from joblib import Parallel, delayed

    shutil.rmtree(out_dir, ignore_errors=True)
    outs = [out_dir / p.relative_to(root).with_suffix(".npy") for p in paths]
    for parent in {o.parent for o in outs}:
        parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    Parallel(n_jobs=workers, backend="loky")(
        delayed(baseline_clip)(str(p), str(o), config) for p, o in zip(paths, outs))
    return time.perf_counter() - started


def _barrier(folder: str, name: str, parties: int, timeout: float = 1800.0) -> None:
    """Wait until `parties` workers have each dropped a file in `folder`.

    Lets the floor's workers start their timed loops together, after each decoded its share.
    """
    Path(folder, name).touch()
    deadline = time.monotonic() + timeout
    while len(os.listdir(folder)) < parties:
        if time.monotonic() > deadline:
            raise RuntimeError(f"floor barrier: only {len(os.listdir(folder))} of {parties} workers arrived; "
                               "the loky pool has fewer processes than shares")
        time.sleep(0.001)


def floor_share(paths: list[str], config, barrier_dir: str, share: int, parties: int, batch: int = 2):
    """compute_features over one share of clips decoded beforehand; returns (t0, t1, clips).

    time.monotonic is CLOCK_MONOTONIC on Linux, one clock for every process, so the parent
    can take the wall time as max(t1) - min(t0) over the shares.
    """
    import torch

    from audiofx.features.melspec import compute_features
    from audiofx.pipeline.decode import decode_clip

    torch.set_num_threads(1)
    audio = [decode_clip(Path(p), config) for p in paths]  # not timed: the floor has no I/O
    with torch.inference_mode():
        compute_features(torch.from_numpy(np.stack(audio[:batch])), config)  # warm-up: filterbank, allocator
        _barrier(barrier_dir, f"share-{share}", parties)
        t0 = time.monotonic()
        for b in range(0, len(audio), batch):
            compute_features(torch.from_numpy(np.stack(audio[b:b + batch])), config)
        t1 = time.monotonic()
    return t0, t1, len(audio)


def run_floor(paths: list[Path], config, workers: int, scratch: Path) -> float:
    from joblib import Parallel, delayed

    shares = [[str(p) for p in paths[i::workers]] for i in range(workers)]
    shares = [s for s in shares if s]
    barrier_dir = scratch / "floor-barrier"
    shutil.rmtree(barrier_dir, ignore_errors=True)
    barrier_dir.mkdir(parents=True)
    # batch_size=1: one share per worker (each blocks at the barrier, so none can take two).
    results = Parallel(n_jobs=workers, backend="loky", batch_size=1)(
        delayed(floor_share)(s, config, str(barrier_dir), i, len(shares)) for i, s in enumerate(shares))
    return max(r[1] for r in results) - min(r[0] for r in results)


def parity(store: Path, summary, baseline_dir: Path) -> float:
    """Max |audiofx - librosa| over fold 1, in log-mel units: both paths computed the same thing."""
    from audiofx.pipeline.reading import load_fold
    from audiofx.pipeline.store import FeatureStore

    x, _, clips = load_fold(FeatureStore(store), summary.dataset, summary.key, "1")
    diffs = [np.abs(x[i].astype(np.float32) - np.load(baseline_dir / Path(str(c)).with_suffix(".npy")).astype(np.float32)).max()
             for i, c in enumerate(clips)]
    return float(max(diffs))


# -- one set, the report ------------------------------------------------------------------------

def feature_config(spec: SetSpec):
    """The features extract computes for a set: the folder adapter's defaults, preset shin2021,
    the set's feature options."""
    from audiofx.config import FEATURE_FIELDS, resolve_feature_config
    from audiofx.pipeline.datasets import get_adapter

    feature_overrides = {k: v for k, v in spec.overrides.items() if k in FEATURE_FIELDS}
    return resolve_feature_config(get_adapter("folder").defaults, "shin2021", feature_overrides)


def bench_set(spec: SetSpec, clips: int, workers: int, device: str, work: Path, say) -> dict:
    config = feature_config(spec)
    classes = class_count(clips)
    seed = SEED + SETS.index(spec)

    say(f"[{spec.name}] generating {clips} clips of {spec.seconds:g} s in {classes} classes (not timed)")
    root = work / "audio" / spec.name
    paths = make_dataset(root, clips, spec.seconds, classes, seed)
    # Warm-up set: 2 classes x `warm_folds` clips, one fold per worker, so audiofx plans at
    # least `workers` units and starts the loky pool at its full size.
    warm_folds = max(2, workers)
    warm_root = work / "audio" / f"{spec.name}-warmup"
    warm_paths = make_dataset(warm_root, 2 * warm_folds, spec.seconds, 2, seed + 1000)

    say(f"[{spec.name}] warm-up (pool start, imports)")
    run_audiofx(warm_root, work / "stores" / f"{spec.name}-warmup", {**spec.overrides, "folds": warm_folds},
                workers, device)
    run_baseline(warm_paths, warm_root, work / "baseline" / f"{spec.name}-warmup", config, workers)

    say(f"[{spec.name}] audiofx")
    store = work / "stores" / spec.name
    t_fx, summary = run_audiofx(root, store, spec.overrides, workers, device)
    say(f"[{spec.name}] librosa + joblib")
    baseline_dir = work / "baseline" / spec.name
    t_lr = run_baseline(paths, root, baseline_dir, config, workers)
    say(f"[{spec.name}] floor")
    t_floor = run_floor(paths, config, workers, work)

    result = {
        "clips": clips, "classes": classes, "clip_seconds": spec.seconds, "file_rate": FILE_RATE,
        "feature_rate": config.sample_rate, "feature_shape": list(config.shape), "overrides": spec.overrides,
        "audiofx_seconds": t_fx, "audiofx_inner_seconds": summary.seconds,
        "librosa_seconds": t_lr, "floor_seconds": t_floor,
        "audiofx_clips_s": clips / t_fx, "librosa_clips_s": clips / t_lr, "floor_clips_s": clips / t_floor,
        "store_bytes": summary.stored_bytes, "parity_max_abs": parity(store, summary, baseline_dir),
    }
    result["ratio_audiofx_librosa"] = result["audiofx_clips_s"] / result["librosa_clips_s"]
    result["audiofx_pct_of_floor"] = 100 * result["audiofx_clips_s"] / result["floor_clips_s"]
    return result


def machine(workers: int, device: str) -> dict:
    import joblib
    import librosa
    import torch

    return {
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads_main": torch.get_num_threads(), "torch_threads_worker": 1,
        "librosa": librosa.__version__, "joblib": joblib.__version__, "workers": workers, "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
    }


def print_report(command: str, info: dict, results: dict) -> None:
    print()
    print(f"command: {command}")
    print(f"machine: {info['cores']} cores ({info['cpu']}), python {info['python']}, torch {info['torch']} "
          f"(main process {info['torch_threads_main']} threads, workers 1), librosa {info['librosa']}, "
          f"joblib {info['joblib']}; {info['workers']} workers, audiofx device {info['device']}"
          + (f" ({info['gpu']})" if info["gpu"] else ""))
    header = (f"{'set':<11} {'clips':>5} {'audiofx':>9} {'librosa+joblib':>15} {'floor':>9} "
              f"{'audiofx/librosa':>16} {'% of floor':>11} {'max|diff|':>10}")
    print()
    print("clips per second (higher is better); floor = compute_features only, CPU, no I/O")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<11} {r['clips']:>5} {r['audiofx_clips_s']:>9.1f} {r['librosa_clips_s']:>15.1f} "
              f"{r['floor_clips_s']:>9.1f} {r['ratio_audiofx_librosa']:>15.2f}x {r['audiofx_pct_of_floor']:>10.0f}% "
              f"{r['parity_max_abs']:>10.3f}")
    print()
    print("max|diff|: largest |audiofx - librosa| feature difference (log-mel units) over fold 1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=200, help="clips per dataset (default 200)")
    p.add_argument("--workers", type=int, default=cores, help=f"worker processes (default: cores = {cores})")
    p.add_argument("--out", type=Path, help="working folder; extract-bench.json is written here (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated audio, stores and baseline outputs")
    p.add_argument("--device", default="cpu", help="device for the audiofx path: cpu or cuda (default cpu)")
    args = p.parse_args(argv)
    if args.clips < 2 * FOLDS:
        p.error(f"--clips must be at least {2 * FOLDS}: 2 classes x {FOLDS} folds")
    if args.workers < 1:
        p.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda was asked for but torch sees no CUDA device here (use --device cpu)",
                  file=sys.stderr)
            return 2
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    base = args.out or Path(tempfile.mkdtemp(prefix="audiofx-bench-"))
    work = base / "work"
    info = machine(args.workers, args.device)  # before the runs: with --workers 1 they set this process's threads
    try:
        results = {spec.name: bench_set(spec, args.clips, args.workers, args.device, work, say) for spec in SETS}
    finally:
        if args.keep:
            say(f"kept the working files in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            if not args.out:
                shutil.rmtree(base, ignore_errors=True)

    print_report(command, info, results)
    if args.out:
        report = {"command": command, "machine": info, "sets": results}
        (args.out / "extract-bench.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.out / 'extract-bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
