"""Training input throughput: store -> float32 batches, against a raw memmap and on-the-fly features.

    python benchmarks/loader.py [--clips 3000] [--batch-size 32] [--seconds 3] [--threads 2] [--torch-threads 1]
                                [--no-codecs] [--out DIR] [--keep]

Built first (not timed): an ESC-50-shaped feature store (3x128x250 float16, 5 folds, 8 clips
per chunk) written through the store's own APIs (prepare, write_unit, finalize: same layout,
codec and manifest as `audiofx extract`), and a raw .npy memmap holding the same values. The
values are the features of 16 generated 5 s clips plus small noise, 8 different ones in each
chunk, so the chunks compress like real features rather than like random bytes (or like
repeated clips).

Then samples/s of float32 batches (B, 3, 128, 250), each for about --seconds, and the CPU
time of this process per batch (all threads):
  in-memory   load_in_memory + InMemoryLoader (the load time is reported separately)
  streaming   StreamingLoader: shuffled runs of chunks read by background threads, every chunk
              checked against the manifest's CRC-32C of its values as it is decoded
  streaming, unchecked
              the same with the check switched off: what the check costs
  streaming, old codec
              the same, from a copy of the store whose x arrays use the codec stores had
              before (Blosc zstd-1 bit shuffle): what existing stores still stream at
  memmap      random batches from the raw .npy memmap: the limit for data on local disk
  zarr/clip   random per-clip Zarr reads (x[i] per sample): why training never does this
  on-the-fly  decode_clip + compute_features per clip (the Palanisamy-style baseline of
              computing features in the training loop), on a handful of WAVs, extrapolated

and where the streaming loader's CPU time goes per batch (chunk files read and decoded, batch
rows copied and cast to float32, the rest), each part timed alone on one thread. Unless
--no-codecs: the size and encode/decode time of one 8-clip chunk of this store under each
candidate Blosc codec (numcodecs, one thread), which is what the store's codec was chosen by.

Everything was just written, so all reads come from the page cache: this compares the
readers, not the disk. Every path runs with one torch thread by default (--torch-threads),
as a DataLoader worker does: on a shared 2-core machine, torch's default of one OpenMP
thread per core made the feature computation ~25x slower and a float16 -> float32 cast ~10x
slower whenever another process kept a core busy.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from audiofx.config import feature_key, resolve_feature_config
from audiofx.features.melspec import compute_features
from audiofx.pipeline.decode import decode_clip
from audiofx.pipeline.store import (
    FeatureStore,
    GroupPlan,
    chunk_clips,
    fold_group,
    plan_units,
)
from audiofx.training.data.featuresets import open_foldset
from audiofx.training.data.memory import InMemoryLoader, load_in_memory
from audiofx.training.data.streaming import StreamingLoader

SEED = 20240611
RATE = 44100
SECONDS = 5.0
FOLDS = 5
CLASSES = 50
BASE_CLIPS = 16  # generated WAVs: the on-the-fly baseline and the seeds of the stored values
DATASET = "esc-like"


# -- building (not timed) --------------------------------------------------------------------

def synth_clip(rng: np.random.Generator) -> np.ndarray:
    """5 s of notes, sweeps and noise bursts over a little background noise."""
    n = int(SECONDS * RATE)
    t = np.arange(n) / RATE
    x = 0.01 * rng.standard_normal(n)
    for _ in range(rng.integers(3, 8)):
        start, dur = rng.uniform(0, SECONDS - 0.2), rng.uniform(0.1, 1.5)
        m = (t >= start) & (t < start + dur)
        tt = t[m] - start
        env = np.exp(-tt * rng.uniform(1, 8))
        kind = rng.integers(3)
        if kind == 0:
            f0 = 110 * 2 ** (rng.integers(0, 36) / 12)
            x[m] += 0.4 * env * sum(np.sin(2 * np.pi * k * f0 * tt) / k for k in range(1, 6))
        elif kind == 1:
            f0, f1 = rng.uniform(100, 2000), rng.uniform(500, 12000)
            x[m] += 0.3 * env * np.sin(2 * np.pi * (f0 * tt + (f1 - f0) * tt ** 2 / (2 * dur)))
        else:
            x[m] += 0.3 * env * rng.standard_normal(int(m.sum()))
    return (0.8 * x / np.abs(x).max()).astype(np.float32)


def build(base: Path, clips: int, memmap: bool = True) -> tuple[list[Path], object, Path, Path | None, object]:
    """WAVs, the feature config, the store root, the memmap path (None without `memmap`) and
    the group's FoldSet."""
    rng = np.random.default_rng(SEED)
    config = resolve_feature_config({"sample_rate": RATE, "clip_seconds": SECONDS, "frames": 250})
    wavs = []
    for i in range(BASE_CLIPS):
        path = base / "wav" / f"clip-{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, synth_clip(rng), RATE, subtype="PCM_16")
        wavs.append(path)
    with torch.inference_mode():
        feats = np.stack([compute_features(torch.from_numpy(decode_clip(p, config))[None], config)[0].numpy()
                          for p in wavs])

    folds = {str(f + 1): [(f"synthetic/{i:05d}.wav", i % CLASSES) for i in range(f, clips, FOLDS)]
             for f in range(FOLDS)}
    options = {"folds": FOLDS, "seed": SEED, "split": None}
    plan = GroupPlan(dataset=DATASET, key=feature_key(config, options), config=config,
                     fingerprint={"digest": f"synthetic-{clips}-{SEED}", "files": clips, "bytes": 0},
                     classes=[f"class{c:02d}" for c in range(CLASSES)], multilabel=False, folds=folds,
                     dataset_options=options)
    store = FeatureStore(base / "store")
    store.prepare(plan, rebuild=True)
    units = plan_units({f: len(c) for f, c in folds.items()}, chunk_clips(config))
    mm_path = base / "features.npy" if memmap else None
    mm = np.lib.format.open_memmap(mm_path, mode="w+", dtype=np.float16, shape=(clips,) + config.shape) \
        if memmap else None
    offsets = np.cumsum([0] + [len(c) for c in folds.values()])
    fold_offset = dict(zip(folds, offsets[:-1].tolist()))
    for unit in units:
        n = unit.stop - unit.start
        # n different clips per chunk: a chunk of repeated clips would compress unlike real data.
        x = feats[rng.choice(BASE_CLIPS, n, replace=False)] + 0.05 * rng.standard_normal((n,) + config.shape,
                                                                                        dtype=np.float32)
        x = x.astype(np.float16)
        store.write_unit(DATASET, plan.key, unit, x, [])
        if mm is not None:
            a = fold_offset[unit.fold] + unit.start  # the memmap holds the folds one after another
            mm[a:a + n] = x
    if mm is not None:
        mm.flush()
        del mm
    store.finalize(plan, units, {"workers": 1, "device": "cpu", "seconds": 0.0})
    foldset = open_foldset(str(store.root), DATASET, plan.key, list(folds))
    return wavs, config, store.root, mm_path, foldset


# -- timing ----------------------------------------------------------------------------------

@contextlib.contextmanager
def unchecked():
    """Readers that decode chunks without checking them against the manifest (the baseline
    of what the check costs; audiofx itself never reads that way)."""
    from audiofx.pipeline.chunks import ChunkReader

    check = ChunkReader._check
    ChunkReader._check = lambda self, c, values: None
    try:
        yield
    finally:
        ChunkReader._check = check


def median_run(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The run of median rate (rate, CPU ms per batch)."""
    return sorted(runs)[len(runs) // 2]


def timed_epochs(make_iter, budget: float) -> tuple[float, float]:
    """Run whole passes of make_iter() until budget seconds have passed:
    (samples/s, CPU ms of this process, all threads, per batch)."""
    n = batches = 0
    started, cpu = time.perf_counter(), time.process_time()
    while True:
        for batch in make_iter():
            n += int(batch.shape[0])
            batches += 1
            if time.perf_counter() - started > budget:
                break
        elapsed = time.perf_counter() - started
        if elapsed > budget:
            return n / elapsed, (time.process_time() - cpu) * 1e3 / batches


def batches_of(loader):
    return lambda: (b.x for b in loader)


def memmap_batches(path: Path, batch_size: int, seed: int):
    mm = np.load(path, mmap_mode="r")
    rng = np.random.default_rng(seed)

    def epoch():
        order = rng.permutation(len(mm))
        for s in range(0, len(order), batch_size):
            yield torch.from_numpy(mm[order[s:s + batch_size]]).float()
    return epoch


def zarr_clip_batches(store: Path, foldset, batch_size: int, seed: int):
    import zarr

    group = FeatureStore(store).group_path(foldset.dataset, foldset.key)
    arrays = [zarr.open_array(str(group / fold_group(f) / "x"), mode="r") for f in foldset.folds]
    where = [(a, i) for a in arrays for i in range(a.shape[0])]
    rng = np.random.default_rng(seed)

    def epoch():
        order = rng.permutation(len(where))
        for s in range(0, len(order), batch_size):
            rows = [where[j][0][where[j][1]] for j in order[s:s + batch_size]]
            yield torch.from_numpy(np.stack(rows)).float()
    return epoch


def on_the_fly(wavs: list[Path], config, budget: float, batch_size: int) -> tuple[float, float]:
    """decode_clip + compute_features, one clip at a time, cycling over the WAVs:
    (samples/s, CPU ms per batch of batch_size)."""
    with torch.inference_mode():
        compute_features(torch.from_numpy(decode_clip(wavs[0], config))[None], config)  # warm-up
        n = 0
        started, cpu = time.perf_counter(), time.process_time()
        while time.perf_counter() - started < budget:
            audio = decode_clip(wavs[n % len(wavs)], config)
            compute_features(torch.from_numpy(audio)[None], config).float()
            n += 1
    return n / (time.perf_counter() - started), (time.process_time() - cpu) * 1e3 / n * batch_size


# -- codecs ----------------------------------------------------------------------------------

# Candidate Blosc settings for x, as zarr's BloscCodec takes them (None: no compression). The
# store's X_CODEC is the one marked in the table.
CODECS = [
    ("zstd-1 bitshuffle (before)", {"cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"}),
    ("zstd-1 shuffle", {"cname": "zstd", "clevel": 1, "shuffle": "shuffle"}),
    ("zstd-1 bitshuffle, 1 MiB blocks", {"cname": "zstd", "clevel": 1, "shuffle": "bitshuffle", "blocksize": 2**20}),
    ("zstd-1 shuffle, 1 MiB blocks", {"cname": "zstd", "clevel": 1, "shuffle": "shuffle", "blocksize": 2**20}),
    ("zstd-2 shuffle, 1 MiB blocks", {"cname": "zstd", "clevel": 2, "shuffle": "shuffle", "blocksize": 2**20}),
    ("lz4 bitshuffle", {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}),
    ("lz4 shuffle", {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}),
    ("lz4hc-5 shuffle", {"cname": "lz4hc", "clevel": 5, "shuffle": "shuffle"}),
    ("blosclz shuffle", {"cname": "blosclz", "clevel": 5, "shuffle": "shuffle"}),
    ("none", None),
]
OLD_CODEC = CODECS[0][1]
_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def numcodecs_blosc(spec: dict, typesize: int):
    """The numcodecs codec that zarr's BloscCodec(**spec) runs for an array of this item size."""
    from numcodecs import Blosc

    return Blosc(cname=spec["cname"], clevel=spec["clevel"], shuffle=_SHUFFLE[spec["shuffle"]],
                 blocksize=spec.get("blocksize", 0), typesize=typesize)


def is_store_codec(spec: dict | None) -> bool:
    from audiofx.pipeline.store import X_CODEC

    return spec is not None and (X_CODEC.cname.name, X_CODEC.clevel, X_CODEC.shuffle.name, X_CODEC.blocksize) == (
        spec["cname"], spec["clevel"], spec["shuffle"], spec.get("blocksize", 0))


def codec_table(chunks: list[np.ndarray], reps: int = 5) -> list[tuple[str, float, float, float, bool]]:
    """(codec, ratio, encode ms, decode ms) of one chunk, on one thread: decode is the best of
    `reps` passes over all chunks, each decoded into a reused buffer as the streaming loader does."""
    import numcodecs.blosc

    numcodecs.blosc.use_threads = False  # what zarr sets: Blosc's own threads off, one per caller
    raw = sum(c.nbytes for c in chunks)
    out = np.empty_like(chunks[0])
    rows = []
    out_bytes = out.reshape(-1).view(np.uint8)
    for name, spec in CODECS:
        if spec is None:  # the chunk's bytes as they are: a copy into the buffer
            encode, decode = bytes, (lambda b: np.copyto(out_bytes, np.frombuffer(b, np.uint8)))
        else:
            codec = numcodecs_blosc(spec, chunks[0].dtype.itemsize)
            encode, decode = codec.encode, (lambda b, codec=codec: codec.decode(b, out=out))
        t0 = time.perf_counter()
        blobs = [encode(c) for c in chunks]
        enc = (time.perf_counter() - t0) / len(chunks)
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for b in blobs:
                decode(b)
            best = min(best, (time.perf_counter() - t0) / len(chunks))
        rows.append((name, raw / sum(len(b) for b in blobs), enc * 1e3, best * 1e3, is_store_codec(spec)))
    return rows


def recode(store: Path, foldset, spec: dict | None, dest: Path):
    """A copy of the store whose x arrays are written with another codec (values unchanged)."""
    import zarr
    from zarr.codecs import BloscCodec

    shutil.copytree(store, dest)
    group = FeatureStore(dest).group_path(foldset.dataset, foldset.key)
    for fold in foldset.folds:
        parent = zarr.open_group(str(group / fold_group(fold)), mode="r+")
        old = parent["x"]
        values = old[:]
        del parent["x"]
        x = parent.create_array("x", shape=values.shape, chunks=old.chunks, dtype=values.dtype, fill_value=0,
                                compressors=BloscCodec(**spec) if spec else None)
        x[:] = values
    return open_foldset(str(dest), foldset.dataset, foldset.key, list(foldset.folds))


def streaming_breakdown(loader: StreamingLoader, reps: int = 20) -> tuple[float, float, float]:
    """CPU ms per batch of: reading and decoding the chunk files of a whole epoch into one
    reused buffer (on this thread alone); the same through zarr's own read path (all of its
    threads: zarr decodes in a thread pool); assembling one batch (rows copied and cast to
    float32, this thread)."""
    plan = loader.plan(0)
    batches = loader.num_samples / loader.batch_size
    buffer = np.empty((loader.run_chunks * loader.chunk_clips,) + loader.shape, np.float16)
    cpu = time.thread_time()
    for p in plan:
        a, b = p.read_range
        loader._reader(p.run.fold).read(a, b, out=buffer[:b - a])
    read_ms = (time.thread_time() - cpu) * 1e3 / batches
    cpu = time.process_time()
    for p in plan:
        a, b = p.read_range
        loader._reader(p.run.fold).read_through_zarr(a, b)
    zarr_ms = (time.process_time() - cpu) * 1e3 / batches
    x = torch.from_numpy(buffer)
    rows = [(x, r % len(buffer)) for r in range(loader.batch_size)]
    index = np.arange(len(rows), dtype=np.int64)
    cpu = time.thread_time()
    for _ in range(reps):
        loader._assemble(rows, index)
    return read_ms, zarr_ms, (time.thread_time() - cpu) * 1e3 / reps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=3000, help="clips in the store (default 3000; ESC-50 has 2000)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--seconds", type=float, default=3.0, help="time per measured path (default 3)")
    p.add_argument("--threads", type=int, default=2, help="reader threads of the streaming loader (default 2)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch.set_num_threads for every path (default 1, as in a DataLoader worker; 0: torch's default)")
    p.add_argument("--no-codecs", action="store_true", help="skip the per-codec chunk table")
    p.add_argument("--out", type=Path, help="working folder (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated store, memmap and WAVs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable), "benchmarks/loader.py", *sys.argv[1:]])
    base = args.out or Path(tempfile.mkdtemp(prefix="audiofx-loader-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    bs, budget = args.batch_size, args.seconds
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    load_before = os.getloadavg()[0]
    try:
        t0 = time.perf_counter()
        wavs, config, store, mm_path, foldset = build(base, args.clips)
        manifest = foldset.manifest()
        raw, stored = manifest["sizes"]["raw_bytes"], manifest["sizes"]["stored_bytes"]
        print(f"built {args.clips} clips of {'x'.join(map(str, config.shape))} float16 in "
              f"{time.perf_counter() - t0:.1f} s: raw {raw / 2**20:.0f} MiB, store {stored / 2**20:.0f} MiB "
              f"({raw / stored:.2f}x), {manifest['chunk_clips']} clips per chunk", file=sys.stderr)
        old_set = recode(store, foldset, OLD_CODEC, base / "store-old-codec")

        results: dict[str, tuple[float, float]] = {}
        data = load_in_memory(foldset)
        load_s = data.seconds
        results["in-memory"] = timed_epochs(batches_of(InMemoryLoader(data, bs, seed=0)), budget)
        del data
        with unchecked():
            load_unchecked_s = min(load_in_memory(foldset).seconds for _ in range(3))
        load_s = min([load_s] + [load_in_memory(foldset).seconds for _ in range(2)])
        stream = StreamingLoader(foldset, bs, seed=0, threads=args.threads)
        # checked and unchecked in turn, three times each, medians: on two shared cores one
        # run of each differed by up to 30% either way
        checked_runs, unchecked_runs = [], []
        for _ in range(3):
            checked_runs.append(timed_epochs(batches_of(stream), budget))
            with unchecked():
                unchecked_runs.append(timed_epochs(
                    batches_of(StreamingLoader(foldset, bs, seed=0, threads=args.threads)), budget))
        results["streaming"] = median_run(checked_runs)
        results["streaming, unchecked"] = median_run(unchecked_runs)
        old_stream = StreamingLoader(old_set, bs, seed=0, threads=args.threads)
        results["streaming, old codec"] = timed_epochs(batches_of(old_stream), budget)
        results["memmap"] = timed_epochs(memmap_batches(mm_path, bs, 0), budget)
        results["zarr/clip"] = timed_epochs(zarr_clip_batches(store, foldset, bs, 0), budget)
        results["on-the-fly"] = on_the_fly(wavs, config, budget, bs)
        parts = {"streaming": streaming_breakdown(stream), "streaming, old codec": streaming_breakdown(old_stream)}
        chunks = []
        if not args.no_codecs:
            import zarr

            x = zarr.open_array(str(FeatureStore(store).group_path(DATASET, foldset.key) / fold_group("1") / "x"),
                                mode="r")
            m = int(x.chunks[0])
            chunks = [x[i:i + m] for i in range(0, min(16 * m, x.shape[0] // m * m), m)]
            codecs = codec_table(chunks)
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(base, ignore_errors=True)

    mem, fly = results["memmap"][0], results["on-the-fly"][0]
    streaming = f"{args.threads} reader threads, runs of 4 chunks, buffer of 8 chunks"
    notes = {
        "in-memory": f"after a load of {load_s:.2f} s ({args.clips / load_s:.0f} clips/s, {raw / 2**20 / load_s:.0f} MiB/s; "
                     f"{load_unchecked_s:.2f} s unchecked, best of 3 each)",
        "streaming": f"{streaming}; {manifest['sizes']['stored_bytes'] / 2**20:.0f} MiB store; chunks checked; "
                     "median of 3",
        "streaming, unchecked": "the same without the per-chunk check (what it costs); median of 3, in turn with it",
        "streaming, old codec": "the same, store written with Blosc zstd-1 bit shuffle (stores made before it changed)",
        "memmap": "random batches from a raw .npy memmap (the limit)",
        "zarr/clip": "x[i] per sample: one chunk decompressed per clip",
        "on-the-fly": f"decode_clip + compute_features per clip, {len(wavs)} WAVs cycled",
    }
    print(f"\n{command}")
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{args.clips} clips, batch {bs}, {budget:g} s per path, load average {load_before:.1f} before the run\n")
    print("| path | samples/s | / memmap | / on-the-fly | CPU ms per batch | note |")
    print("|---|---|---|---|---|---|")
    for name, (rate, cpu) in results.items():
        print(f"| {name} | {rate:,.0f} | {rate / mem:.2f}x | {rate / fly:,.0f}x | {cpu:.2f} | {notes[name]} |")

    print(f"\nWhere streaming's CPU time goes, ms per batch of {bs}: the parts timed alone, the rest is "
          "planning, thread hand-offs, page faults of new batch buffers and contention:\n")
    print("| store | read + decode chunks | (through zarr instead) | copy + cast rows | rest | total, all threads |")
    print("|---|---|---|---|---|---|")
    for name, (read_ms, zarr_ms, assemble_ms) in parts.items():
        total = results[name][1]
        print(f"| {name} | {read_ms:.2f} | ({zarr_ms:.2f}) | {assemble_ms:.2f} | {total - read_ms - assemble_ms:.2f} "
              f"| {total:.2f} |")

    if chunks:
        print(f"\nOne {len(chunks[0])}-clip chunk ({chunks[0].nbytes / 1e6:.2f} MB raw) under each codec, mean of "
              f"{len(chunks)} chunks, one thread (* = the store's codec):\n")
        print("| codec | ratio | encode ms | decode ms | decoded clips/s per core |")
        print("|---|---|---|---|---|")
        for name, ratio, enc, dec, current in codecs:
            print(f"| {name}{' *' if current else ''} | {ratio:.3f}x | {enc:.2f} | {dec:.2f} | "
                  f"{len(chunks[0]) / dec * 1e3:,.0f} |")

    stream_rate = results["streaming"][0]
    checks = [
        ("in-memory >= memmap", results["in-memory"][0] >= mem),
        ("streaming >= 50% of memmap", stream_rate >= 0.5 * mem),
        ("in-memory >= 100x on-the-fly", results["in-memory"][0] >= 100 * fly),
        ("streaming >= 100x on-the-fly", stream_rate >= 100 * fly),
        ("the per-chunk check costs streaming < 5%", stream_rate >= 0.95 * results["streaming, unchecked"][0]),
    ]
    print()
    for name, ok in checks:
        print(f"{'met    ' if ok else 'NOT MET'}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
