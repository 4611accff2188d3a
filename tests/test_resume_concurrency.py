"""Interrupted and concurrent runs of the real `audiofx extract` process.

- kill -9 mid-run, then a rerun: the result equals an uninterrupted run, and units that were
  finished before the kill are not computed again;
- Ctrl-C (SIGINT) mid-run: a one-line message, exit 130, and the rerun completes the store;
- two processes on the same dataset and store at once: one valid, complete store equal to
  a single run.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import kill_9, make_class_folder, run_cli, start_cli, wait_while_running
from tests.storecheck import assert_same_features

pytestmark = pytest.mark.slow

# 96 clips of 3 s at 44.1 kHz in 2 folds: 8 write units of up to 14 clips, a few seconds of work.
ARGS = ["--set", "sample_rate=44100", "--set", "clip_seconds=3.0", "--set", "frames=150", "--set", "folds=2",
        "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_class_folder(tmp_path_factory.mktemp("raw"), classes=4, per_class=24, seconds=3.0, sr=44100)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted single run: what every other run must equal."""
    store = tmp_path_factory.mktemp("reference")
    proc = run_cli("extract", "--dataset", "folder", "--root", str(dataset), "--store", str(store), "--workers", "2", *ARGS)
    assert proc.returncode == 0, proc.stderr
    return store


def start(dataset: Path, store: Path, workers: int = 2) -> subprocess.Popen:
    return start_cli("extract", "--dataset", "folder", "--root", str(dataset), "--store", str(store), "--workers",
                     str(workers), *ARGS, own_group=True)  # kill -9 of its group reaches the worker processes too


def group(store: Path) -> Path:
    (g,) = [p for p in (store / "folder").iterdir() if p.is_dir()]
    return g


def wait_for_units(store: Path, n: int, proc: subprocess.Popen) -> None:
    wait_while_running(proc, lambda: len(list(store.glob("folder/*/units/*.json"))) >= n)


def assert_same_store(store: Path, reference: Path) -> None:
    assert assert_same_features(store, reference, "folder")["clips"] == 96


def test_kill_9_then_rerun_equals_uninterrupted_and_skips_finished_units(dataset, reference, tmp_path):
    store = tmp_path / "store"
    proc = start(dataset, store)
    wait_for_units(store, 2, proc)
    kill_9(proc)  # the coordinator and its workers, as an OOM kill or a crash would
    g = group(store)
    assert not (g / "manifest.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in (g / "units").glob("*.json")}
    total_units = len(json.loads((group(reference) / "manifest.json").read_text())["units"])
    assert 2 <= len(finished) < total_units
    finished_clips = sum(json.loads((g / "units" / n).read_text())["stop"] - json.loads((g / "units" / n).read_text())["start"]
                         for n in finished)

    proc = run_cli("extract", "--dataset", "folder", "--root", str(dataset), "--store", str(store), "--workers", "2", *ARGS)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(finished)} of {total_units} units were already done" in proc.stdout
    assert f"{96 - finished_clips} computed in this run" in proc.stdout
    for name, mtime in finished.items():  # finished units were not written again
        assert (g / "units" / name).stat().st_mtime_ns == mtime
    assert_same_store(store, reference)


def test_ctrl_c_exits_cleanly_and_rerun_completes(dataset, reference, tmp_path):
    store = tmp_path / "store"
    proc = start(dataset, store, workers=1)
    wait_for_units(store, 1, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted: finished write units are kept" in err
    proc = run_cli("extract", "--dataset", "folder", "--root", str(dataset), "--store", str(store), "--workers", "1", *ARGS)
    assert proc.returncode == 0, proc.stderr
    assert_same_store(store, reference)


def test_two_concurrent_runs_end_with_one_valid_store(dataset, reference, tmp_path):
    store = tmp_path / "store"
    procs = [start(dataset, store, workers=1) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    assert_same_store(store, reference)
    # between them the two runs computed every clip (whichever run got to a unit first)
    computed = [int(out.split(" computed in this run")[0].rsplit(" ", 1)[1]) if "computed" in out else 0
                for out, _ in outputs]
    assert sum(computed) >= 96
    # a third run finds it complete
    assert "store is complete" in run_cli("extract", "--dataset", "folder", "--root", str(dataset), "--store",
                                          str(store), "--workers", "1", *ARGS).stdout
