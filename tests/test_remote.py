"""Remote feature stores against a real S3-compatible server on 127.0.0.1 (moto's server
mode): extract into it, train from it through the local read-through cache on a "second
machine", push/pull between a local store and it (a killed push resumed, partial pulls),
a corrupted object named by verify and refused by readers, two concurrent extractions into
one key, gc and rm, and the one-line errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from audiofx.errors import StoreError
from audiofx.pipeline.reading import load_fold, open_fold
from audiofx.pipeline.store import FeatureStore
from tests.conftest import (
    TINY,
    assert_one_line_error,
    kill_9,
    make_class_folder,
    run_cli,
    run_process,
    start_cli,
    wait_while_running,
)
from tests.s3server import s3_filesystem
from tests.storecheck import assert_same_features

BUCKET = "audiofx-test"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(s3_endpoint):
    return s3_endpoint


@pytest.fixture(scope="module")
def folder_raw(tmp_path_factory) -> Path:
    return make_class_folder(tmp_path_factory.mktemp("raw") / "sounds", classes=3, per_class=10, seconds=0.5)


@pytest.fixture(scope="module")
def local_folder(tmp_path_factory, folder_raw) -> tuple[Path, str]:
    """The folder dataset extracted into a local store: the reference for remote copies."""
    store = tmp_path_factory.mktemp("local") / "store"
    proc = run_cli("extract", "--dataset", "folder", "--root", str(folder_raw), "--store", str(store), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    [(_, key, _)] = FeatureStore(store).groups()
    return store, key


@pytest.fixture(scope="module")
def local_demo(tmp_path_factory) -> tuple[Path, str]:
    """The demo dataset (200 clips, 25 chunks): enough objects to interrupt a push."""
    tmp = tmp_path_factory.mktemp("demo")
    proc = run_cli("extract", "--dataset", "demo", "--root", str(tmp / "raw"), "--store", str(tmp / "store"),
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    [(_, key, _)] = FeatureStore(tmp / "store").groups()
    return tmp / "store", key


def test_extract_into_s3_equals_local_and_a_second_machine_trains_through_its_cache(s3, folder_raw, local_folder,
                                                                                       tmp_path):
    local, key = local_folder
    url = f"s3://{BUCKET}/extract/features"
    proc = run_cli("extract", "--dataset", "folder", "--root", str(folder_raw), "--store", url, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"{url}/folder/{key}" in proc.stdout
    assert_same_features(url, local, "folder")
    # No credentials in anything written to the store.
    blobs = s3_filesystem().cat([p for p in s3_filesystem().find(f"{BUCKET}/extract")])
    assert not any(b"testing-secret" in b for b in blobs.values())
    listing = run_cli("cache", "ls", "--store", url)
    assert listing.returncode == 0 and key in listing.stdout and "complete" in listing.stdout

    # Machine 2 has nothing local but a cache dir: it fine-tunes from S3; machine 1 from its disk.
    cache = tmp_path / "machine2-cache"
    train = ("finetune", "--dataset", "folder", "--arch", "tiny", "--epochs", "1", "--fold", "1", "--no-progress")
    p_remote = run_cli(*train, "--store", url, "--cache-dir", str(cache), "--runs", str(tmp_path / "runs2"), "--name", "r")
    p_local = run_cli(*train, "--store", str(local), "--runs", str(tmp_path / "runs1"), "--name", "r")
    assert p_remote.returncode == 0, p_remote.stderr
    assert p_local.returncode == 0, p_local.stderr
    pred = [np.load(tmp_path / r / "finetune/r/predictions/fold-1.npz") for r in ("runs1", "runs2")]
    assert np.array_equal(pred[0]["scores"], pred[1]["scores"])  # the same values reached the model
    [mirror] = [p for p in cache.iterdir() if p.is_dir()]
    assert (mirror / "SOURCE").read_text().strip() == url
    cached = {p: p.stat().st_mtime_ns for p in mirror.rglob("*") if p.is_file() and "/x/" in p.as_posix()}
    assert cached, "the folds were not cached"
    # A second run on machine 2 reads the cache (it is used: its LRU mark moves), and not one
    # chunk is fetched again.
    marker = mirror / "folder" / key / ".last-used"
    used_before = marker.stat().st_mtime_ns
    again = run_cli(*train, "--store", url, "--cache-dir", str(cache), "--runs", str(tmp_path / "runs2"), "--name", "r2")
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in cached} == cached
    assert marker.stat().st_mtime_ns > used_before


def test_two_concurrent_extracts_into_one_s3_key_make_one_valid_store(s3, folder_raw, local_folder):
    local, _ = local_folder
    url = f"s3://{BUCKET}/concurrent/features"
    args = ("extract", "--dataset", "folder", "--root", str(folder_raw), "--store", url, "--workers", "1",
            "--no-progress")
    procs = [start_cli(*args) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert_same_features(url, local, "folder")  # one valid set (verified), equal to the local one


def test_push_killed_midway_resumes_and_pull_of_some_folds_is_partial(s3, local_demo, tmp_path):
    store, key = local_demo
    url = f"s3://{BUCKET}/push/features"
    fs = s3_filesystem()
    push = start_cli("cache", "push", key[:8], "--to", url, "--store", str(store), "--no-progress",
                     env={"AUDIOFX_COPY_THREADS": "1"}, own_group=True)  # one object at a time: a kill lands mid-way

    def objects_pushed() -> int:
        fs.invalidate_cache()
        return len(fs.find(f"{BUCKET}/push"))

    wait_while_running(push, lambda: objects_pushed() >= 8, timeout=60)
    kill_9(push)
    remote = FeatureStore(url)
    assert not remote.has_manifest("demo", key)
    with pytest.raises(StoreError, match="no manifest"):
        open_fold(remote, "demo", key, "1")
    assert "incomplete" in run_cli("cache", "ls", "--store", url).stdout

    resumed = run_cli("cache", "push", key[:8], "--to", url, "--store", str(store), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "already there" in resumed.stdout
    assert remote.read_manifest("demo", key) == FeatureStore(store).read_manifest("demo", key)
    assert remote.verify("demo", key) == []
    again = run_cli("cache", "push", key[:8], "--to", url, "--store", str(store))
    assert again.returncode == 0 and "nothing to push" in again.stdout

    # Pull one fold onto another machine: usable, marked partial, the other folds refused.
    pulled = tmp_path / "pulled"
    one = run_cli("cache", "pull", key[:8], "--from", url, "--store", str(pulled), "--fold", "2", "--no-progress")
    assert one.returncode == 0, one.stderr
    assert "partial (folds 2)" in run_cli("cache", "ls", "--store", str(pulled)).stdout
    local = FeatureStore(pulled)
    x, y, clips = load_fold(local, "demo", key, "2")
    x0, y0, clips0 = load_fold(FeatureStore(store), "demo", key, "2")
    assert np.array_equal(x, x0) and np.array_equal(y, y0) and list(clips) == list(clips0)
    with pytest.raises(StoreError, match="fold 1 .* was not pulled"):
        load_fold(local, "demo", key, "1")
    rest = run_cli("cache", "pull", key[:8], "--from", url, "--store", str(pulled), "--no-progress")
    assert rest.returncode == 0, rest.stderr
    assert local.read_manifest("demo", key) == FeatureStore(store).read_manifest("demo", key)
    assert local.verify("demo", key) == []


@pytest.fixture
def read_cache(tmp_path, monkeypatch):
    """This test's own read-through cache; the process-wide one is put back afterwards."""
    from audiofx.pipeline import readcache

    monkeypatch.setattr(readcache, "_default", None)
    return lambda **limit: readcache.configure(tmp_path / "cache", **limit)


def test_a_corrupted_object_is_named_by_verify_and_never_served(s3, local_demo, tmp_path, read_cache):
    store, key = local_demo
    url = f"s3://{BUCKET}/corrupt/features"
    assert run_cli("cache", "push", key[:8], "--to", url, "--store", str(store), "--no-progress").returncode == 0
    fs = s3_filesystem()
    chunk = f"{BUCKET}/corrupt/features/demo/{key}/fold-3/x/c/1/0/0/0"
    other = f"{BUCKET}/corrupt/features/demo/{key}/fold-3/x/c/0/0/0/0"
    fs.pipe_file(chunk, fs.cat_file(other))  # a valid chunk, wrong values
    check = run_cli("cache", "verify", "--store", url)
    assert_one_line_error(check, "1 of 1 feature sets are damaged")
    assert f"DAMAGED demo/{key}/fold-3/x chunk 1 (clips 16-31): checksum mismatch" in check.stdout
    # A reader with an empty cache fetches fold 3, checks it and refuses it.
    read_cache()
    with pytest.raises(StoreError, match="fold-3/x chunk 1"):
        open_fold(FeatureStore(url), "demo", key, "3")
    x, _, _ = load_fold(FeatureStore(url), "demo", key, "1")  # the intact folds stay usable
    assert x.shape[0] == 40


def test_a_truncated_object_is_one_line_for_verify_pull_and_training(s3, local_demo, tmp_path, read_cache):
    store, key = local_demo
    url = f"s3://{BUCKET}/truncated/features"
    assert run_cli("cache", "push", key[:8], "--to", url, "--store", str(store), "--no-progress").returncode == 0
    fs = s3_filesystem()
    chunk = f"{BUCKET}/truncated/features/demo/{key}/fold-2/x/c/1/0/0/0"
    fs.pipe_file(chunk, fs.cat_file(chunk)[:len(fs.cat_file(chunk)) // 10])
    # real processes: Blosc given a truncated chunk used to end them with a segfault
    check = run_process("cache", "verify", "--store", url)
    assert_one_line_error(check, "1 of 1 feature sets are damaged")
    assert f"DAMAGED demo/{key}/fold-2/x chunk 1 (clips 16-31): unreadable (Blosc header says" in check.stdout
    pulled = run_process("cache", "pull", key[:8], "--from", url, "--store", str(tmp_path / "pulled"), "--no-progress")
    assert_one_line_error(pulled, "does not match the source's checksums", "fold-2/x chunk 1")
    read_cache()
    trained = run_cli("finetune", "--dataset", "demo", "--store", url, "--runs", str(tmp_path / "runs"), "--fold", "1",
                      "--epochs", "1", *TINY)
    assert_one_line_error(trained, "fold-2/x chunk 1", "unreadable")


def test_rm_and_gc_remove_only_what_they_should(s3, local_demo, tmp_path):
    store, key = local_demo
    work = tmp_path / "store"
    shutil.copytree(store, work)
    shutil.copytree(work / "demo" / key, work / "demo" / "0000abandoned000")
    (work / "demo" / "0000abandoned000" / "manifest.json").unlink()  # an extraction that never finished
    runs = tmp_path / "runs"
    young = run_cli("cache", "gc", "--store", str(work), "--runs", str(runs))
    assert young.returncode == 0 and "nothing to remove" in young.stdout  # may be in progress elsewhere
    listed = run_cli("cache", "gc", "--store", str(work), "--runs", str(runs), "--min-age", "0")
    assert "remove demo/0000abandoned000" in listed.stdout and "nothing removed: pass --yes" in listed.stdout
    assert (work / "demo" / "0000abandoned000").exists()
    done = run_cli("cache", "gc", "--store", str(work), "--runs", str(runs), "--min-age", "0", "--yes")
    assert done.returncode == 0 and "removed 1 feature set(s)" in done.stdout
    assert not (work / "demo" / "0000abandoned000").exists() and FeatureStore(work).verify("demo", key) == []

    url = f"s3://{BUCKET}/rm/features"
    assert run_cli("cache", "push", key[:8], "--to", url, "--store", str(work), "--no-progress").returncode == 0
    assert run_cli("cache", "rm", key[:8], "--store", url).stdout.strip().endswith("nothing removed: pass --yes to remove")
    assert s3_filesystem().find(f"{BUCKET}/rm")  # still there
    removed = run_cli("cache", "rm", key[:8], "--store", url, "--yes")
    assert removed.returncode == 0, removed.stderr
    assert s3_filesystem().find(f"{BUCKET}/rm") == []


def test_remote_errors_are_one_line(s3, tmp_path):
    env_backup = os.environ["AWS_ENDPOINT_URL"]
    try:
        from tests.s3server import free_port

        os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        # a process of its own: this one's S3 filesystem is cached with the server's address
        assert_one_line_error(run_process("cache", "ls", "--store", f"s3://{BUCKET}/x"),
                              "cannot reach s3://audiofx-test/x")
    finally:
        os.environ["AWS_ENDPOINT_URL"] = env_backup
    assert_one_line_error(run_cli("cache", "pull", "abc", "--from", f"s3://{BUCKET}/nothing-here",
                                  "--store", str(tmp_path / "s")), "no feature set 'abc'")
    secret = "s3://user:hunter2@" + BUCKET + "/x"
    line = assert_one_line_error(run_cli("cache", "verify", "--store", secret), "may not hold credentials")
    assert "hunter2" not in line


def test_a_missing_or_misnamed_bucket_is_one_line_before_anything_is_written(s3, folder_raw, local_folder):
    store, key = local_folder
    for url, says in ((f"s3://no-such-{BUCKET}/f", f"the bucket no-such-{BUCKET} does not exist"),
                      ("s3://Bad_Bucket!/f", "'Bad_Bucket!' is not a valid S3 bucket name")):
        assert_one_line_error(run_cli("extract", "--dataset", "folder", "--root", str(folder_raw), "--store", url,
                                      "--workers", "1", "--no-progress"), says)
        assert_one_line_error(run_cli("cache", "push", key, "--store", str(store), "--to", url), says)


def test_read_cache_evicts_least_recently_used(s3, local_demo, tmp_path, read_cache):
    store, key = local_demo
    url = f"s3://{BUCKET}/evict/features"
    assert run_cli("cache", "push", key[:8], "--to", url, "--store", str(store), "--no-progress").returncode == 0
    fold_bytes = FeatureStore(store).group_bytes("demo", key) / 5
    cache = read_cache(limit=int(1.5 * fold_bytes))
    remote = FeatureStore(url)
    open_fold(remote, "demo", key, "1")
    [(_, first_size, group)] = cache.entries()
    assert first_size < cache.limit
    # A second remote store in the same cache: the first set is least recently used and goes.
    url2 = f"s3://{BUCKET}/evict2/features"
    assert run_cli("cache", "push", key[:8], "--to", url2, "--store", str(store), "--no-progress").returncode == 0
    open_fold(FeatureStore(url2), "demo", key, "1")
    open_fold(FeatureStore(url2), "demo", key, "2")
    assert not group.exists()
    [(_, size, kept)] = cache.entries()
    assert kept != group and json.loads((kept / "manifest.json").read_text())["partial_folds"] == ["1", "2"]
