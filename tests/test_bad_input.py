"""Bad input, as a hostile user gives it: option values, file names, metadata, weight files,
run names, audio that decodes but has no finite features, a loss that blows up. Each ends in
exit code 2 with one line and no traceback (or a recorded skip), and leaves what was written
before as it was. In-process where a real process is not the point."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import TINY, assert_one_line_error, make_class_folder, run_cli, start_cli

SMALL = ["--set", "sample_rate=22050", "--set", "clip_seconds=0.5", "--set", "frames=20", "--workers", "1",
         "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_class_folder(tmp_path_factory.mktemp("raw") / "sounds", classes=2, per_class=4, seconds=0.5)


def extract(root: Path, store: Path, *extra: str):
    return run_cli("extract", "--dataset", "folder", "--root", str(root), "--store", str(store), *SMALL, *extra)


@pytest.mark.parametrize("option, needle", [
    ("fmin=11025", "fmin=11025.0 must be at least 0 and below the Nyquist frequency"),
    ("fmin=-1", "fmin=-1.0 must be at least 0"),
    ("log_offset=-1", "log_offset=-1.0 must be above 0"),
    ("log_offset=0", "log_offset=0.0 must be above 0"),
    ("power=0", "power=0.0 must be above 0"),
    ("n_mels=NaN", "n_mels must be a finite number, got nan"),
    ("fmax=Infinity", "fmax must be a finite number, got inf"),
    ("hops_ms=10,NaN,50", "hops_ms must be a finite number"),
    ("n_mels=1.5", "n_mels must be an integer"),
    ("window=nope", "window 'nope' is not a window scipy.signal.get_window knows"),
    ("pad_mode=zeros", "pad_mode 'zeros' is unknown"),
    ("augment_pitch=3", "augment_pitch shapes the augmented copies, and augment_copies is 0"),
    ("augment_seed=-1", "augment_seed=-1 must be 0 or more"),
])
def test_feature_options_that_cannot_work_are_one_line_before_the_store_is_touched(folder, tmp_path, option, needle):
    store = tmp_path / "store"
    assert_one_line_error(extract(folder, store, "--set", option), needle)
    assert not store.exists() or not any(store.rglob("*.json"))


def test_file_names_and_metadata_that_cannot_be_read(folder, tmp_path):
    import shutil

    root = tmp_path / "sounds"
    shutil.copytree(folder, root)
    # a file name that is not UTF-8: listed as skipped, the rest extracted
    os.link(root / "class0" / "class0-000.wav", os.path.join(os.fsencode(root / "class0"), b"bad-\xff\xfe.wav"))
    proc = extract(root, tmp_path / "store", "--set", "folds=2")
    assert proc.returncode == 0, proc.stderr
    assert "class0/bad-\\xff\\xfe.wav: file name is not UTF-8" in proc.stdout and "8 usable of 8" in proc.stdout
    split = tmp_path / "split.csv"
    for text, needle in [
        (b"path,label,fold\nclass0/class0-000.wav,caf\xe9,1\n", "is not UTF-8 text (byte 0xe9 at offset 41)"),
        (b"path,label,fold\nclass0/class0-000.wav\x00x,a,1\n", "holds a NUL byte"),
        (b"path,label,fold\nclass0/class0-000.wav,a,x/y\nclass1/class1-000.wav,b,1\n", "fold name 'x/y' cannot name"),
        (b"path,label,fold\nclass0/class0-000.wav,a,..\nclass1/class1-000.wav,b,1\n", "fold name '..' cannot name"),
    ]:
        split.write_bytes(text)
        assert_one_line_error(extract(root, tmp_path / "split-store", "--split", str(split)), str(split), needle)
    assert not (tmp_path / "split-store").exists() or not any((tmp_path / "split-store").rglob("manifest.json"))


def test_symbolic_links_that_lead_nowhere_are_listed_as_skipped(folder, tmp_path):
    import shutil

    root = tmp_path / "linked"
    shutil.copytree(folder, root)
    (root / "class0" / "gone.wav").symlink_to(tmp_path / "no-such-file.wav")  # dangling
    (root / "class0" / "loop.wav").symlink_to(root / "class0" / "loop.wav")  # a loop
    (root / "class1" / "alias.wav").symlink_to(root / "class0" / "class0-000.wav")  # a good link: a clip
    before = extract(folder, tmp_path / "plain", "--set", "folds=2")
    proc = extract(root, tmp_path / "store", "--set", "folds=2")
    assert before.returncode == 0 and proc.returncode == 0, proc.stderr
    for name in ("class0/gone.wav", "class0/loop.wav"):
        assert f"{name}: a symbolic link that leads to no file (dangling, or a loop)" in proc.stdout, proc.stdout
    clips = lambda out: int(re.search(r"(\d+) usable of (\d+)", out).group(1))  # noqa: E731
    assert clips(proc.stdout) == clips(before.stdout) + 1  # the good link is a clip


def test_audio_without_finite_features_is_skipped_with_the_reason(folder, tmp_path):
    import shutil

    root = tmp_path / "sounds"
    shutil.copytree(folder, root)
    loud = np.full(11025, 1e30, dtype=np.float32)  # finite samples, features beyond float16
    sf.write(root / "class1" / "loud.wav", loud, 22050, subtype="FLOAT")
    proc = extract(root, tmp_path / "store", "--set", "folds=2")
    assert proc.returncode == 0, proc.stderr
    assert "class1/loud.wav: features not finite" in proc.stdout and "8 usable of 9" in proc.stdout
    strict = extract(root, tmp_path / "strict", "--set", "folds=2", "--strict")
    assert_one_line_error(strict, "loud.wav", "features not finite")


def test_store_paths_and_run_names_that_are_not_folders(folder, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a store")
    assert_one_line_error(extract(folder, a_file, "--set", "folds=2"), f"store {a_file} is a file, not a folder")
    assert_one_line_error(run_cli("cache", "ls", "--store", str(a_file)), "is a file, not a folder")
    store = tmp_path / "store"
    assert extract(folder, store, "--set", "folds=2").returncode == 0
    runs = tmp_path / "deep" / "runs"
    for name in ("../../escaped", "a/b", "..", " "):
        proc = run_cli("finetune", "--dataset", "folder", "--store", str(store), "--runs", str(runs), "--epochs", "1",
                       "--name", name, *TINY)
        assert_one_line_error(proc, "is not a run name")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "deep" / "escaped").exists()


def test_rates_below_their_range_are_refused_before_a_run_folder(folder, tmp_path):
    store = tmp_path / "store"
    assert extract(folder, store, "--set", "folds=2").returncode == 0
    common = ["--store", str(store), "--runs", str(tmp_path / "runs"), "--epochs", "1", "--name", "r", *TINY]
    for extra, needle in [(["--lr", "-1"], "--lr must be above 0, got -1"),
                          (["--lr", "0"], "--lr must be above 0"),
                          (["--weight-decay", "-1"], "--weight-decay must be 0 or more"),
                          (["--mixup", "-0.5"], "--mixup must be 0 or more")]:
        assert_one_line_error(run_cli("finetune", "--dataset", "folder", *common, *extra), needle)
    assert_one_line_error(run_cli("pretrain", "--method", "simclr", *common, "--temperature", "0"),
                          "--temperature must be above 0")
    assert not (tmp_path / "runs").exists()  # so the same --name is free for the corrected command


def test_weight_files_that_are_not_checkpoints_are_one_line_and_never_run_code(folder, tmp_path):
    import torch

    store = tmp_path / "store"
    assert extract(folder, store, "--set", "folds=2").returncode == 0
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    files = {"text.pt": None, "payload.pt": {"w": Payload()}, "truncated.pt": {"w": torch.zeros(1000)}}
    for name, content in files.items():
        if content is None:
            (tmp_path / name).write_text("not a checkpoint\n")
        else:
            torch.save(content, tmp_path / name)
    raw = (tmp_path / "truncated.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[:len(raw) // 2])
    needles = {"text.pt": "is not a checkpoint torch can read", "payload.pt": "loading it would run code: refused",
               "truncated.pt": "is not a checkpoint torch can read"}
    for name, needle in needles.items():
        path = str(tmp_path / name)
        common = ["--dataset", "folder", "--store", str(store), "--runs", str(tmp_path / "runs")]
        assert_one_line_error(run_cli("finetune", *common, "--init", path, "--epochs", "1", *TINY), f"--init {path}",
                              needle)
        assert_one_line_error(run_cli("evaluate", *common, "--run", path), f"--run {path}", needle)
        assert_one_line_error(run_cli("finetune", *common, "--init", "imagenet", "--arch", "resnet18", "--weights", path,
                                      "--epochs", "1", "--no-progress"), f"--weights {path}", needle)
    assert not marker.exists()


def test_a_loss_that_is_not_finite_stops_training_with_one_line(folder, tmp_path):
    store = tmp_path / "store"
    assert extract(folder, store, "--set", "folds=2").returncode == 0
    proc = run_cli("finetune", "--dataset", "folder", "--store", str(store), "--runs", str(tmp_path / "runs"),
                   "--epochs", "2", "--lr", "1e30", "--batch-size", "2", "--name", "blown", *TINY)
    assert_one_line_error(proc, "finetune fold 1 epoch 1/2: the training loss is", "lower --lr")
    run = tmp_path / "runs" / "finetune" / "blown"
    assert not list(run.glob("checkpoints/*.pt"))  # nothing trained on NaN weights is saved
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").exists() else []
    assert not [r for r in records if r.get("event") == "epoch"]


def test_verify_tells_a_set_being_written_from_a_damaged_one(folder, tmp_path):
    store = tmp_path / "store"
    assert extract(folder, store, "--set", "folds=2").returncode == 0
    (group,) = [p for p in (store / "folder").iterdir() if p.is_dir()]
    (group / "manifest.json").unlink()  # as between an extraction's units and its manifest
    proc = run_cli("cache", "verify", "--store", str(store))
    assert proc.returncode == 0, proc.stderr
    assert f"incomplete folder/{group.name}: no manifest yet, 2 write unit(s) done" in proc.stdout
    assert "DAMAGED" not in proc.stdout


def test_more_workers_than_cores_are_capped_with_a_line(folder, tmp_path):
    proc = run_cli("extract", "--dataset", "folder", "--root", str(folder), "--store", str(tmp_path / "store"),
                   *SMALL[:-3], "--workers", "1000", "--no-progress", "--set", "folds=2")
    assert proc.returncode == 0, proc.stderr
    cores = len(os.sched_getaffinity(0))
    assert f"--workers 1000 is more than the {cores} cores here: using {cores}" in proc.stderr
    (group,) = [p for p in (tmp_path / "store" / "folder").iterdir() if p.is_dir()]
    assert json.loads((group / "manifest.json").read_text())["extraction"]["workers"] <= cores


def test_worker_processes_exit_when_the_extract_command_is_killed(tmp_path):
    """kill -9 of the command alone (not its process group): its loky workers see their parent
    gone and exit within seconds, instead of idling for minutes at ~1 GB each."""
    import psutil

    root = make_class_folder(tmp_path / "raw", classes=4, per_class=10, seconds=4.0)
    store = tmp_path / "store"
    proc = start_cli("extract", "--dataset", "folder", "--root", str(root), "--store", str(store), "--workers", "2",
                     "--set", "clip_seconds=4.0", "--no-progress")
    deadline = time.time() + 120
    workers: list = []
    while time.time() < deadline and not (workers and list(store.rglob("units/*.json"))):
        assert proc.poll() is None, "the command ended before it could be killed"
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "python" in c.name().lower()]
        time.sleep(0.1)
    assert workers, "no worker process started"
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, alive


def test_a_store_that_cannot_be_written_is_one_line_and_keeps_what_was_written(folder, tmp_path):
    """A full disk, a quota, a file size limit, a read-only filesystem: one line naming the
    store, the units already written kept, and the same command finishing once it can write.
    The limit is real: the process runs under RLIMIT_FSIZE (writes past it fail with EFBIG)."""
    import resource
    import signal
    import subprocess

    from tests.conftest import REPO, audiofx_cmd, cli_env

    store = tmp_path / "store"
    done = extract(folder, store, "--set", "folds=2")
    assert done.returncode == 0, done.stderr
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    args = ["extract", "--dataset", "folder", "--root", str(folder), "--store", str(store), *SMALL, "--set", "folds=4",
            "--set", "frames=200"]
    proc = subprocess.run(audiofx_cmd(*args), cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=limited)
    assert_one_line_error(proc, f"cannot write to store {store}: File too large", "ulimit -f",
                          "the same command finishes the rest")
    assert all(p.read_bytes() == data for p, data in before.items())  # the set written before is as it was
    again = extract(folder, store, "--set", "folds=4", "--set", "frames=200")
    assert again.returncode == 0, again.stderr
    assert run_cli("cache", "verify", "--store", str(store)).returncode == 0
