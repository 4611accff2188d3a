"""`audiofx extract --scheduler`: the write units on Dask instead of joblib, through the real CLI.

- `--scheduler local:2` (a LocalCluster of 2 worker processes started by the command) and
  `--scheduler tcp://...` (a cluster started here, in the test process) each give a store
  equal, value for value, to the joblib store of the same dataset;
- a closed port, a port where nothing answers, and malformed values are one-line errors,
  reported within seconds;
- a --strict failure on Dask is the same one-line error as with joblib;
- Ctrl-C closes the LocalCluster the command started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from audiofx.pipeline.executors import CONNECT_TIMEOUT_S
from tests.conftest import assert_one_line_error, make_class_folder, run_cli, run_process, start_cli
from tests.s3server import free_port
from tests.storecheck import assert_same_features

pytestmark = pytest.mark.slow

# 24 one-second clips in 2 folds of 12: 8-clip chunks, so 4 write units (8 + 4 clips per fold).
ARGS = ["--dataset", "folder", "--set", "clip_seconds=1.0", "--set", "frames=250", "--set", "folds=2"]
UNITS, CLIPS = 4, 24


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_class_folder(tmp_path_factory.mktemp("raw"), classes=4, per_class=6, seconds=1.0)


@pytest.fixture(scope="module")
def joblib_store(dataset, tmp_path_factory) -> Path:
    """The default path (joblib, 2 loky processes): what every Dask run must equal."""
    store = tmp_path_factory.mktemp("joblib")
    proc = run_process("extract", *ARGS, "--root", str(dataset), "--store", str(store), "--workers", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return store


def group(store: Path) -> Path:
    (g,) = [p for p in (store / "folder").iterdir() if p.is_dir()]
    return g


def manifest(store: Path) -> dict:
    return json.loads((group(store) / "manifest.json").read_text())


def assert_same_store(store: Path, reference: Path) -> None:
    m = assert_same_features(store, reference, "folder")
    assert len(m["units"]) == UNITS and m["clips"] == CLIPS


def test_local_cluster_store_equals_joblib_store(dataset, joblib_store, tmp_path):
    store = tmp_path / "store"
    # with the progress bar: it is drawn by this process as the workers' units complete
    proc = start_cli("extract", *ARGS, "--root", str(dataset), "--store", str(store), "--scheduler", "local:2")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"{CLIPS} computed in this run" in out
    assert f"{CLIPS}/{CLIPS}" in err and "Traceback" not in err
    assert_same_store(store, joblib_store)
    extraction = manifest(store)["extraction"]
    assert extraction["scheduler"] == "local:2" and extraction["workers"] == 2
    # the units really ran in the cluster's worker processes, not in the CLI's
    pids = {json.loads(p.read_text())["pid"] for p in (group(store) / "units").glob("*.json")}
    assert 1 <= len(pids) <= 2 and proc.pid not in pids
    assert "scheduler" not in manifest(joblib_store)["extraction"]


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    from audiofx.pipeline.executors import restore_environ

    environ = dict(os.environ)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as c, \
            Client(c) as client:
        yield c, client
    # distributed's Nanny set OMP_NUM_THREADS=1 and friends in this process: without this,
    # every later test's subprocess would run torch on one thread
    restore_environ(environ)


def test_a_local_cluster_leaves_the_callers_environment_as_it_was(monkeypatch):
    """extract --scheduler local:N from Python (a notebook): distributed sets OMP_NUM_THREADS=1
    and friends in the caller's environment; closing the executor takes them back."""
    from audiofx.pipeline.executors import _connect, parse_scheduler

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    before = dict(os.environ)
    executor = _connect(parse_scheduler("local:1"))
    try:
        assert os.environ.get("OMP_NUM_THREADS") == "1" and os.environ["MKL_NUM_THREADS"] == "3"  # unset ones only

        def preloaded() -> tuple[bool, bool]:  # run in the worker: what dask_setup installed there
            import logging
            import signal

            from audiofx.pipeline.executors import not_a_heartbeat_at_shutdown

            return (signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
                    not_a_heartbeat_at_shutdown in logging.getLogger("distributed.worker").filters)

        assert list(executor.on_every_worker(preloaded).values()) == [(True, True)]
    finally:
        executor.close()
    assert dict(os.environ) == before


def test_a_local_cluster_beside_another_says_nothing_of_the_port_it_could_not_take():
    """Two extractions with --scheduler local:N on one machine: the second cluster's scheduler
    found 8787 (distributed's default HTTP port) taken and printed a multi-line warning about
    it, though it starts no dashboard. Its HTTP server now takes a free port."""
    import socket
    import warnings

    from audiofx.pipeline.executors import _connect, parse_scheduler

    with socket.socket() as other:  # the first cluster's port, or whoever holds 8787 already
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            other.bind(("", 8787))
            other.listen()
        except OSError:
            pass  # taken already: the condition the test needs
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            _connect(parse_scheduler("local:1")).close()
    assert not [w for w in said if "8787" in str(w.message)]


def test_reused_joblib_workers_run_with_the_callers_environment_of_each_call(monkeypatch):
    """loky keeps its worker processes for the next call: credentials or an endpoint set after
    they started (a notebook) must reach them, or a second extract writes with the old ones."""
    from audiofx.pipeline.executors import LocalProcesses

    monkeypatch.delenv("AUDIOFX_TEST_LATER", raising=False)
    first = LocalProcesses(2)
    assert list(first.map_unordered(os.getenv, ["AUDIOFX_TEST_LATER"] * 4)) == [None] * 4
    first.close()
    monkeypatch.setenv("AUDIOFX_TEST_LATER", "set after the workers started")
    again = LocalProcesses(2)
    assert list(again.map_unordered(os.getenv, ["AUDIOFX_TEST_LATER"] * 4)) == ["set after the workers started"] * 4
    again.close()


def test_existing_cluster_store_equals_joblib_store(dataset, joblib_store, cluster, tmp_path):
    c, client = cluster
    store = tmp_path / "store"
    # Relative --root/--store from another working directory than the workers': the coordinator
    # must hand the workers absolute paths.
    (tmp_path / "data").symlink_to(dataset)
    proc = run_process("extract", *ARGS, "--root", "data", "--store", "store", "--scheduler", c.scheduler_address,
                       "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_same_store(store, joblib_store)
    assert manifest(store)["extraction"]["scheduler"] == c.scheduler_address
    worker_pids = set(client.run(lambda: __import__("os").getpid()).values())
    unit_pids = {json.loads(p.read_text())["pid"] for p in (group(store) / "units").glob("*.json")}
    assert unit_pids <= worker_pids


def test_strict_failure_on_dask_is_one_line_and_leaves_no_manifest(dataset, cluster, tmp_path):
    c, client = cluster
    root = make_class_folder(tmp_path / "raw", classes=2, per_class=8, seconds=1.0)
    (root / "class1" / "class1-003.wav").write_bytes(b"not audio at all")
    store = tmp_path / "store"
    proc = run_process("extract", *ARGS, "--root", str(root), "--store", str(store), "--scheduler",
                       c.scheduler_address, "--strict", "--no-progress")
    assert_one_line_error(proc, "class1-003.wav", "not readable as audio", "--strict")
    assert proc.returncode == 2
    assert not (group(store) / "manifest.json").exists()


def test_closed_port_is_a_one_line_error_at_once(dataset, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    proc = run_cli("extract", *ARGS, "--root", str(dataset), "--store", str(tmp_path / "store"), "--scheduler", address)
    elapsed = time.perf_counter() - started
    assert_one_line_error(proc, "cannot reach the Dask scheduler", address, "refused", "dask scheduler")
    assert elapsed < 30, elapsed  # start-up and planning only: a refused connection is not retried


def test_silent_listener_is_a_one_line_error_after_the_connect_timeout(dataset, tmp_path):
    """Something listens on the port but is not a Dask scheduler and never answers:
    distributed's own Client would wait forever there."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    try:
        started = time.perf_counter()
        proc = run_cli("extract", *ARGS, "--root", str(dataset), "--store", str(tmp_path / "store"),
                       "--scheduler", address)
        elapsed = time.perf_counter() - started
    finally:
        server.close()
    assert_one_line_error(proc, "no Dask scheduler answered", address, f"within {CONNECT_TIMEOUT_S} s")
    assert accepted  # it did connect; the answer never came
    assert CONNECT_TIMEOUT_S <= elapsed < CONNECT_TIMEOUT_S + 30, elapsed


@pytest.mark.parametrize("extra, needles", [
    (["--scheduler", "tcp://127.0.0.1:notaport"], ["malformed --scheduler address", "local:N"]),
    (["--scheduler", "127.0.0.1:8786"], ["unknown --scheduler", "tcp://HOST:PORT"]),
    (["--scheduler", "local:2", "--workers", "2"], ["--workers", "does not apply with --scheduler"]),
])
def test_bad_scheduler_values_are_one_line_errors_before_any_work(dataset, tmp_path, extra, needles):
    store = tmp_path / "store"
    proc = run_cli("extract", *ARGS, "--root", str(dataset), "--store", str(store), *extra)
    assert_one_line_error(proc, *needles)
    assert not store.exists()  # checked before the store is touched


def test_ctrl_c_closes_the_local_cluster_it_started(tmp_path):
    """Ctrl-C in a terminal reaches the whole process group: one 'interrupted' line, exit 130,
    no worker tracebacks, and none of the LocalCluster's processes outlive the command."""
    import psutil

    # 4-second clips: the units run long enough (~10 s in all) to be interrupted mid-way
    root = make_class_folder(tmp_path / "raw", classes=4, per_class=10, seconds=4.0)
    store = tmp_path / "store"
    proc = start_cli("extract", *ARGS, "--set", "clip_seconds=4.0", "--root", str(root), "--store", str(store),
                     "--scheduler", "local:2", own_group=True)
    # the progress bar appears once the cluster is up and the units are being handed out
    err = ""
    while "extract folder" not in err:
        char = proc.stderr.read(1)
        assert char, "the command ended before it could be interrupted"
        err += char
    children = psutil.Process(proc.pid).children(recursive=True)
    assert len([c for c in children if "python" in c.name().lower()]) >= 2  # the two worker processes
    os.killpg(proc.pid, signal.SIGINT)
    out, rest = proc.communicate(timeout=60)
    err += rest
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted: finished write units are kept" in err
    assert not (group(store) / "manifest.json").exists()
    deadline = time.time() + 10
    alive = children
    while alive and time.time() < deadline:
        alive = [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    assert not alive, alive


def test_a_local_worker_keeps_its_errors_but_not_the_heartbeat_race_at_shutdown():
    """On Ctrl-C the scheduler (in the command's process) may close before a worker's
    heartbeat, and the worker logged a traceback: that one record is dropped, no other."""
    import logging

    from audiofx.pipeline.executors import not_a_heartbeat_at_shutdown

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("distributed.worker", logging.ERROR, "worker.py", 1, msg, None, None)

    assert not not_a_heartbeat_at_shutdown(record("Failed to communicate with scheduler during heartbeat."))
    assert not_a_heartbeat_at_shutdown(record("Unexpected exception during heartbeat. Closing worker."))
    assert not_a_heartbeat_at_shutdown(record("Compute Failed"))
