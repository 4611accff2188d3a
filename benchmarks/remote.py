"""Training reads from an S3 store through the local read-through cache, against a local store.

    python benchmarks/remote.py [--clips 2000] [--batch-size 32] [--threads 2] [--out DIR] [--keep]

Built first (not timed): the ESC-50-shaped store of benchmarks/loader.py (3x128x250 float16,
5 folds), pushed with `copy_group` to a real S3-compatible server (moto's server mode) on
127.0.0.1. Then, for the training folds 1-4 (the fold set of one cross-validation split),
whole streaming epochs (StreamingLoader: shuffled runs of chunks read by background
threads), in samples/s:

  local             the local store (warm page cache): the target
  s3 first epoch    empty cache: every fold is fetched, checked against the manifest
                    checksums and written to the cache, then read
  s3 second epoch   the same loader again: the folds are read from the cache
  s3 second run     a new loader (a new run) on the same cache

and the in-memory load (load_in_memory) of the same folds from each. Target: the second
epoch within 10% of local. The S3 server is on loopback, so the first epoch measures the
protocol and the checksums, not a real network; over a WAN it is bounded by bandwidth.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from audiofx.pipeline import readcache  # noqa: E402
from audiofx.pipeline.store import FeatureStore  # noqa: E402
from audiofx.pipeline.transfer import copy_group  # noqa: E402
from audiofx.training.data.featuresets import FoldSet  # noqa: E402
from audiofx.training.data.memory import load_in_memory  # noqa: E402
from audiofx.training.data.streaming import StreamingLoader  # noqa: E402
from benchmarks.loader import DATASET, build  # noqa: E402
from tests.s3server import moto_server  # noqa: E402

TRAIN_FOLDS = ["1", "2", "3", "4"]


def epoch_rate(loader: StreamingLoader, epoch: int) -> tuple[float, float]:
    """(samples/s, seconds) of one whole epoch."""
    loader.set_epoch(epoch)
    n, started = 0, time.perf_counter()
    for batch in loader:
        n += int(batch.x.shape[0])
    seconds = time.perf_counter() - started
    return n / seconds, seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="streaming reader threads")
    p.add_argument("--out", type=Path, default=None, help="keep the stores and the cache here")
    p.add_argument("--keep", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([os.path.relpath(sys.executable), "benchmarks/remote.py", *sys.argv[1:]])
    base = args.out or Path(tempfile.mkdtemp(prefix="audiofx-remote-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    try:
        with moto_server("bench") as endpoint:
            _, _, store_root, _, foldset = build(base, args.clips, memmap=False)
            local = FeatureStore(store_root)
            url = "s3://bench/features"
            t0 = time.perf_counter()
            copy_group(local, FeatureStore(url), DATASET, foldset.key)
            push_s = time.perf_counter() - t0
            stored = local.read_manifest(DATASET, foldset.key)["sizes"]["stored_bytes"]
            print(f"built {args.clips} clips, pushed {stored / 2**20:.0f} MiB to {endpoint} in {push_s:.1f} s",
                  file=sys.stderr)
            local_set = FoldSet(str(store_root), DATASET, foldset.key, TRAIN_FOLDS)
            remote_set = FoldSet(url, DATASET, foldset.key, TRAIN_FOLDS)

            def loader(fs: FoldSet) -> StreamingLoader:
                return StreamingLoader(fs, args.batch_size, seed=0, threads=args.threads)

            # In-memory loads: local, then S3 with an empty cache, then S3 with the cache warm.
            readcache.configure(base / "cache-load")
            load_local = load_in_memory(local_set).seconds
            load_cold = load_in_memory(remote_set).seconds
            load_warm = load_in_memory(remote_set).seconds

            # Streaming epochs. A fresh cache so that the first epoch fetches.
            readcache.configure(base / "cache-stream")
            lp = loader(local_set)
            epoch_rate(lp, 0)  # warm the page cache of the local store
            local_rate = max(epoch_rate(lp, e)[0] for e in (1, 2))
            t0 = time.perf_counter()
            rp = loader(remote_set)  # opening the folds fetches them into the cache
            fetch_s = time.perf_counter() - t0
            _, epoch_s = epoch_rate(rp, 0)
            first_s = fetch_s + epoch_s
            first = rp.num_samples / first_s
            second = max(epoch_rate(rp, e)[0] for e in (1, 2))
            again = max(epoch_rate(loader(remote_set), e)[0] for e in (3, 4))
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(base, ignore_errors=True)

    n = len(TRAIN_FOLDS)
    rows = [
        ("local", local_rate, "the local store, page cache warm (best of 2 epochs)"),
        ("s3 first epoch", first, f"fetch + checksum + cache write of {n} folds ({fetch_s:.1f} s), then the epoch"),
        ("s3 second epoch", second, "read from the local cache (best of epochs 2-3)"),
        ("s3 second run", again, "a new loader on the same cache (best of 2 epochs)"),
    ]
    print(f"\n{command}")
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.clips} clips "
          f"(folds {','.join(TRAIN_FOLDS)} read), batch {args.batch_size}, {args.threads} reader threads, "
          f"load average {load_before:.1f} before the run\n")
    print("| streaming epoch | samples/s | / local | note |")
    print("|---|---|---|---|")
    for name, rate, note in rows:
        print(f"| {name} | {rate:,.0f} | {rate / local_rate:.2f}x | {note} |")
    print("\n| in-memory load | seconds | / local |")
    print("|---|---|---|")
    for name, s in (("local", load_local), ("s3, empty cache", load_cold), ("s3, cache warm", load_warm)):
        print(f"| {name} | {s:.2f} | {s / load_local:.2f}x |")
    ok = second >= 0.9 * local_rate
    print(f"\n{'met    ' if ok else 'NOT MET'}  second epoch within 10% of local ({second / local_rate:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
