"""Where the write units run: joblib/loky processes on this machine (the default), or a Dask
cluster (`--scheduler local:N` starts a LocalCluster of N one-thread worker processes for the
length of the command; `--scheduler tcp://HOST:PORT` uses a running cluster).

Both executors run the same picklable task on the same jobs and hand results back unordered,
as each finishes, so the caller's progress bar and its handling of a strict failure do not
depend on where the work ran. Leaving an executor's `with` block (normally, on an error, or on
Ctrl-C) cancels what has not run yet and closes what the executor started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from audiofx.errors import AudiofxError, ConfigError

CONNECT_TIMEOUT_S = 5  # a scheduler that does not answer within this is reported, not waited for
WORKERS_TIMEOUT_S = 10  # how long a reachable scheduler may take to show its first worker
SCHEDULER_HINT = "use --scheduler local:N for N local Dask worker processes, or tcp://HOST:PORT of a running dask scheduler"


@dataclass(frozen=True)
class Scheduler:
    """A parsed --scheduler value: either `local_workers` > 0 or a tcp:// address (`text`)."""

    text: str
    local_workers: int = 0
    host: str = ""
    port: int = 0


def _require_distributed() -> None:
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ConfigError("--scheduler needs Dask's distributed package, which is not installed",
                          "pip install 'audiofx[dask]'") from None


def parse_scheduler(text: str | None, workers: int = 0) -> Scheduler | None:
    """Check a --scheduler value without connecting; None means joblib on this machine."""
    if not text:
        return None
    if workers:
        raise ConfigError("--workers sets joblib processes on this machine and does not apply with --scheduler",
                          "drop --workers: use --scheduler local:N for N local Dask workers, or size the cluster itself")
    _require_distributed()
    if text.startswith("local:"):
        n = text.removeprefix("local:")
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--scheduler {text!r}: N in local:N must be a whole number >= 1", SCHEDULER_HINT)
        return Scheduler(text, local_workers=int(n))
    if text.startswith("tcp://"):
        from distributed.comm import get_address_host_port

        # Checked here: distributed's Client, given a malformed address, fails and then prints a
        # traceback from its destructor at exit.
        try:
            host, port = get_address_host_port(text)
        except ValueError as err:
            raise ConfigError(f"malformed --scheduler address {text!r}: {err}", SCHEDULER_HINT) from None
        if not host or not 0 < port < 65536:
            raise ConfigError(f"malformed --scheduler address {text!r}", SCHEDULER_HINT)
        return Scheduler(text, host=host, port=port)
    raise ConfigError(f"unknown --scheduler {text!r}", SCHEDULER_HINT)


class LocalProcesses:
    """joblib's loky processes on this machine; one worker runs in this process."""

    def __init__(self, workers: int):
        self.workers = workers
        self._stream: Any = None

    @property
    def info(self) -> dict[str, Any]:
        return {"workers": self.workers}

    def map_unordered(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        if self.workers == 1:
            return _in_this_process(fn, items)
        from joblib import Parallel, delayed

        # One item per task; results come back as they finish so a progress bar moves smoothly.
        parent, environ = os.getpid(), dict(os.environ)
        self._stream = Parallel(n_jobs=self.workers, backend="loky", return_as="generator_unordered", batch_size=1)(
            delayed(_in_worker)(fn, item, parent, environ) for item in items
        )
        return self._stream

    def close(self) -> None:
        if self._stream is not None:
            with warnings.catch_warnings():  # a run stopped on purpose (--strict, a full disk) says why itself
                warnings.filterwarnings("ignore", message=".*tasks which were still being processed",
                                        category=UserWarning)
                self._stream.close()  # joblib aborts the tasks that have not started


_watching: int | None = None  # the parent this worker process exits with, once it watches it


def _in_worker(fn: Callable[[Any], Any], item: Any, parent: int, environ: dict[str, str]) -> Any:
    """``fn(item)`` in a loky worker process, with the caller's environment of this call, and
    which exits within a second of the process that started it: loky keeps idle workers for
    minutes (~1 GB each with torch loaded), and after a kill -9 of the extract command nobody
    would stop them."""
    global _watching
    if _watching != parent and os.getppid() == parent:
        _watching = parent
        threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="audiofx-parent-watch").start()
    _adopt_environ(environ)
    return fn(item)


# Set by loky in its workers to keep them from oversubscribing the cores: the worker's own.
_WORKER_OWN = re.compile(r"^(LOKY_.*|.*_NUM_THREADS|VECLIB_MAXIMUM_THREADS)$")


def _adopt_environ(environ: dict[str, str]) -> None:
    """The caller's environment in a worker: loky reuses its worker processes across calls,
    and a worker started before the caller set its credentials or AWS_ENDPOINT_URL (a
    notebook, a second extract in one process) would otherwise write with the old ones."""
    restore_environ({**{k: v for k, v in environ.items() if not _WORKER_OWN.match(k)},
                     **{k: v for k, v in os.environ.items() if _WORKER_OWN.match(k)}})


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:  # a dead parent's children are handed to another process
        time.sleep(0.5)
    os._exit(1)


def _in_this_process(fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
    """fn over items in this process, then torch's and Blosc's thread counts as they were:
    the tasks set both to one thread, as a worker process should (extract.run_unit), and a
    caller that extracts and then trains in one process (a notebook) would otherwise train
    on one thread."""
    import torch
    from numcodecs import blosc

    torch_threads, blosc_threads = torch.get_num_threads(), blosc.get_nthreads()
    try:
        for item in items:
            yield fn(item)
    finally:
        torch.set_num_threads(torch_threads)
        blosc.set_nthreads(blosc_threads)


class DaskExecutor:
    """A Dask distributed client, and the LocalCluster it started for `local:N`."""

    def __init__(self, scheduler: Scheduler, client: Any, cluster: Any = None,
                 environ: dict[str, str] | None = None):
        self.scheduler = scheduler
        self.client = client
        self.cluster = cluster
        self._environ = environ  # this process's environment before the cluster started
        self._futures: list[Any] = []

    @property
    def info(self) -> dict[str, Any]:
        return {"workers": len(self.client.nthreads()), "scheduler": self.scheduler.text}

    def on_every_worker(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        """fn(*args) on each worker: {worker address: result}."""
        return self.client.run(fn, *args)

    def map_unordered(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        from concurrent.futures import CancelledError

        from distributed import KilledWorker, as_completed

        # pure=False: every task is run (the tasks write files), never merged with another
        # client's task of the same arguments.
        self._futures = self.client.map(fn, list(items), pure=False)
        try:
            for _future, result in as_completed(self._futures, loop=self.client.loop, with_results=True):
                yield result
        except KilledWorker as err:  # Dask retried the task on other workers, and they died too
            raise AudiofxError(f"Dask workers died while running a task ({err})",
                               "finished units are kept: check the workers' memory and logs, then rerun") from None
        except CancelledError:  # not by us (we cancel only after the loop): the scheduler went away
            raise AudiofxError(f"the tasks were cancelled on {self.scheduler.text} (scheduler restarted or lost?)",
                               "finished units are kept: rerun the same command") from None

    def close(self) -> None:
        try:
            if self._futures:
                self.client.cancel(self._futures)  # a cluster we do not own stops our queued tasks too
            self.client.close()
        finally:
            if self.cluster is not None:
                self.cluster.close()
            if self._environ is not None:
                restore_environ(self._environ)


def restore_environ(saved: dict[str, str]) -> None:
    """Put this process's environment back as it was. distributed's Nanny sets
    OMP_NUM_THREADS, MKL_NUM_THREADS and OPENBLAS_NUM_THREADS to 1 (its pre-spawn-environ)
    in the environment of the process that starts a LocalCluster, and leaves them there:
    every process the caller started afterwards (a training run, torchrun) would run torch
    on one thread. Measured in our own test suite: training tests 2-3x slower."""
    for k in [k for k in os.environ if k not in saved]:
        del os.environ[k]
    for k, v in saved.items():
        if os.environ.get(k) != v:
            os.environ[k] = v


def dask_setup(worker: Any) -> None:
    """Preload of the LocalCluster's worker processes. Ctrl-C in a terminal reaches the whole
    process group; the workers leave it to this process, which closes the cluster (otherwise
    each worker prints its own KeyboardInterrupt traceback)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("distributed.worker").addFilter(not_a_heartbeat_at_shutdown)


def not_a_heartbeat_at_shutdown(record: logging.LogRecord) -> bool:
    """False for the traceback a local worker logs when its heartbeat meets the scheduler
    closing first (a race on Ctrl-C, seen on a loaded machine). The scheduler lives in the
    command's own process, so a lost scheduler is never news the user needs from a worker."""
    return not record.getMessage().startswith("Failed to communicate with scheduler during heartbeat")


async def _identity(address: str) -> dict[str, Any]:
    from distributed.comm import connect

    comm = await connect(address, timeout=CONNECT_TIMEOUT_S)
    try:
        await comm.write({"op": "identity"})
        return await comm.read()
    finally:
        comm.abort()  # not close(): that can wait on a peer that never answers


def _connect(scheduler: Scheduler) -> DaskExecutor:
    from distributed import Client, LocalCluster

    if scheduler.local_workers:
        # One thread per worker process: parallelism comes from processes (torch and Blosc are
        # set to one thread inside each task, too). No dashboard; the scheduler's HTTP server
        # (health, metrics) still starts, on a free port: on its default, 8787, a second cluster
        # on the machine would print a warning about the port.
        environ = dict(os.environ)
        cluster = LocalCluster(n_workers=scheduler.local_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, scheduler_kwargs={"dashboard_address": ":0"},
                               silence_logs=logging.ERROR, preload=[__name__])
        try:
            return DaskExecutor(scheduler, Client(cluster, set_as_default=False), cluster, environ)
        except BaseException:
            cluster.close()
            restore_environ(environ)
            raise
    where = f"the Dask scheduler at {scheduler.text}"
    # A plain TCP connect first: "connection refused" or an unknown host is then reported at
    # once, rather than after distributed's retries.
    try:
        socket.create_connection((scheduler.host, scheduler.port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise ConfigError(f"cannot reach {where}: {err.strerror or err}",
                          "is `dask scheduler` running there and the port open? " + SCHEDULER_HINT) from None
    # Then ask it who it is, with a deadline: distributed's Client waits forever on a port
    # where something other than a Dask scheduler listens and never answers.
    try:
        kind = asyncio.run(asyncio.wait_for(_identity(scheduler.text), CONNECT_TIMEOUT_S)).get("type")
    except (OSError, TimeoutError, asyncio.TimeoutError, ValueError, TypeError, AttributeError):
        kind = None
    if kind != "Scheduler":
        raise ConfigError(f"no Dask scheduler answered at {scheduler.text} within {CONNECT_TIMEOUT_S} s",
                          "give the address that `dask scheduler` printed, e.g. tcp://HOST:8786")
    try:
        client = Client(scheduler.text, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError) as err:
        raise ConfigError(f"cannot connect to {where}: {err}", SCHEDULER_HINT) from None
    try:
        client.wait_for_workers(1, timeout=WORKERS_TIMEOUT_S)
    except (TimeoutError, OSError):
        client.close()
        raise ConfigError(f"{where} has no workers (waited {WORKERS_TIMEOUT_S} s)",
                          f"start some with: dask worker {scheduler.text} --nthreads 1") from None
    return DaskExecutor(scheduler, client)


@contextmanager
def open_executor(scheduler: Scheduler | None, workers: int) -> Iterator[LocalProcesses | DaskExecutor]:
    """joblib with `workers` processes when scheduler is None, else a Dask client (and cluster).
    Everything it started is closed on the way out, Ctrl-C included."""
    executor = LocalProcesses(workers) if scheduler is None else _connect(scheduler)
    try:
        yield executor
    finally:
        executor.close()
