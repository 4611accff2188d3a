"""Shared fixtures: small generated datasets, and two ways to run the real `audiofx` CLI: in
this process (``run_cli``: its main, as the command line would call it) and as a process of
its own (``run_process``, ``start_cli``: where the process is the point: kill -9, Ctrl-C,
concurrency, torchrun, the one smoke run of each command)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]

# A shell without job control (`make test &` in a script, nohup) starts pytest with SIGINT
# ignored, and every CLI process it starts would inherit that: the Ctrl-C tests would test the
# ignoring. A handled SIGINT is back at its default in a child after exec, as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def real_signal(sr: int, seconds: float, seed: int, channels: int = 1) -> np.ndarray:
    """A real-looking test signal: a gliding harmonic tone with vibrato, noise and a gap of
    silence, so the spectrum has structure at every frame length."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    f0 = rng.uniform(110, 880) * (1 + 0.3 * t / max(seconds, 1e-9))
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.01 * np.sin(2 * np.pi * 5 * t))) / sr
    x = sum(0.3 / k * np.sin(k * phase) for k in range(1, 5)) + 0.02 * rng.standard_normal(len(t))
    x[int(0.4 * len(t)):int(0.5 * len(t))] = 0.0
    if channels == 2:
        x = np.stack([x, 0.5 * x + 0.05 * rng.standard_normal(len(t))], axis=1)
    return (0.8 * x / np.max(np.abs(x))).astype(np.float32)


def stored_as_computed(stored: np.ndarray, computed: np.ndarray) -> bool:
    """Stored float16 features equal to ones computed here, within one float16 step: the store
    computes clips in batches, whose float32 sums may round a value lying near a float16
    midpoint the other way than one clip computed alone."""
    return np.allclose(np.asarray(stored, np.float32), np.asarray(computed, np.float32), rtol=2 ** -10, atol=1e-6)


def make_class_folder(root: Path, classes: int = 3, per_class: int = 10, seconds: float = 1.0, sr: int = 22050,
                      subtype: str = "PCM_16", channels: int = 1) -> Path:
    """A `folder`-layout dataset: <root>/<class>/<class>-<i>.wav, mono or (channels=2) stereo."""
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            sf.write(d / f"class{c}-{i:03d}.wav", real_signal(sr, seconds, seed=1000 * c + i, channels=channels), sr,
                     subtype=subtype)
    return root


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    return make_class_folder(tmp_path / "raw", classes=3, per_class=10, seconds=1.0)


TINY = ["--arch", "tiny", "--no-progress"]  # the small CNN, no progress bars: training tests' CLI options


def extract_demo(base: Path) -> Path:
    """The synthetic demo dataset generated under base/raw and extracted (one worker) into
    base/features; returns the store."""
    from audiofx.pipeline.extract import ExtractRequest, extract

    extract(ExtractRequest(dataset="demo", root=base / "raw", store=str(base / "features"), workers=1, progress=False),
            on_event=lambda m: None)
    return base / "features"


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory) -> Path:
    """The demo dataset extracted once for the whole session. Read it, never write into it:
    a test that adds to a store copies it first (``copy_store``)."""
    return extract_demo(tmp_path_factory.mktemp("demo"))


def copy_store(store: Path, base: Path) -> Path:
    """A copy of a feature store, to add to or damage: base/features."""
    import shutil

    return Path(shutil.copytree(store, base / "features"))


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def audiofx_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "audiofx", *args]


def run_process(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (a real process, as a user would), for what only a real
    process shows: its exit, its startup, the processes it starts. env: variables added to cli_env()."""
    return subprocess.run(audiofx_cmd(*args), cwd=cwd or REPO, env={**cli_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI's ``main`` in this process as the command line would (arguments, working
    folder, environment), with stdout and stderr captured and the exit status it would have,
    without ~3 s of interpreter start and imports per call. A traceback (a bug) is written to
    the captured stderr, as Python would, so assert_one_line_error sees it. The working
    folder, the environment and the read-through cache setting are put back afterwards."""
    from audiofx import cli
    from audiofx.pipeline import readcache

    out, err = io.StringIO(), io.StringIO()
    saved_cwd, saved_env, saved_cache = os.getcwd(), dict(os.environ), readcache._default
    code = 0
    try:
        os.environ.update(env or {})
        os.chdir(cwd or REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main(list(args))
            except SystemExit as exit_:
                if isinstance(exit_.code, str):  # sys.exit("message"): Python prints it and exits 1
                    print(exit_.code, file=sys.stderr)
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except Exception:  # noqa: BLE001 - what the interpreter would print for an uncaught error
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        readcache._default = saved_cache
    return subprocess.CompletedProcess(["audiofx", *args], code, out.getvalue(), err.getvalue())


def start_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
              own_group: bool = False) -> subprocess.Popen:
    """Start the real CLI in the background (stdout and stderr piped, as text) to watch,
    interrupt, kill or wait for. env: variables added to cli_env(). own_group: a process
    group of its own, so that os.killpg reaches the worker processes it starts too, as
    Ctrl-C in a terminal or kill -9 of a job does."""
    return subprocess.Popen(audiofx_cmd(*args), cwd=cwd or REPO, env={**cli_env(), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=own_group)


def wait_while_running(proc: subprocess.Popen, done: Callable[[], bool], timeout: float = 120,
                       poll: float = 0.02) -> None:
    """Poll done() until it holds, failing if the command ends first (too late to interrupt
    it) or after `timeout` seconds."""
    deadline = time.time() + timeout
    while not done():
        assert proc.poll() is None, "the command ended before it could be interrupted"
        assert time.time() < deadline, f"no progress within {timeout} s"
        time.sleep(poll)


def kill_9(proc: subprocess.Popen) -> None:
    """kill -9 a command started with own_group=True and the workers it started, as an OOM
    kill or a crash would, and reap it."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A user error: non-zero exit, exactly one line on stderr starting with 'error:', no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# What a library may change for a whole process and must give back: once, distributed's
# LocalCluster left OMP_NUM_THREADS=1 here (every later training subprocess ran on one
# thread) and extract's in-process worker left torch on one thread.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _thread_settings() -> tuple:
    import torch

    return torch.get_num_threads(), {k: os.environ.get(k) for k in _THREAD_VARS}


@pytest.fixture(autouse=True)
def _test_keeps_thread_settings():
    before = _thread_settings()
    yield
    assert _thread_settings() == before, "this test left the process's thread settings changed"


@pytest.fixture(scope="module", autouse=True)
def _module_keeps_thread_settings():
    """The module's fixtures too (they are set up before a test's own snapshot)."""
    before = _thread_settings()
    yield
    assert _thread_settings() == before, "this module's fixtures left the process's thread settings changed"


@pytest.fixture(scope="session", autouse=True)
def _private_read_cache(tmp_path_factory):
    """Reads of remote stores go through a cache in the test's temp dir, never ~/.cache."""
    os.environ["AUDIOFX_CACHE_DIR"] = str(tmp_path_factory.mktemp("read-cache"))


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto) on 127.0.0.1 with the bucket `audiofx-test`."""
    from tests.s3server import moto_server

    with moto_server("audiofx-test") as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path) -> str:
    """The same store test against a local directory and against the S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_endpoint")
    return f"s3://audiofx-test/{tmp_path.name}/store"

