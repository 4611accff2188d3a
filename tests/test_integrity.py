"""A damaged store never trains: every chunk a reader decodes is checked against the manifest
(CRC-32C of its values, or sha256 for stores written before), the small arrays too, and no
byte sequence in a chunk file crashes a process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from audiofx.errors import StoreError
from audiofx.pipeline.extract import ExtractRequest, extract
from audiofx.pipeline.store import FeatureStore
from audiofx.training.data.featuresets import open_foldset
from audiofx.training.data.memory import load_in_memory
from audiofx.training.data.streaming import StreamingLoader
from tests.conftest import REPO, TINY, assert_one_line_error, make_class_folder, run_cli

CHUNK = 4  # clips per chunk: fold 2 has chunks 0-2


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("integrity")
    root = make_class_folder(tmp / "raw", classes=3, per_class=8, seconds=0.5)
    with pytest.MonkeyPatch.context() as mp:  # workers=1 runs in this process: smaller chunks apply
        mp.setattr("audiofx.pipeline.store.MAX_CHUNK_CLIPS", CHUNK)
        summary = extract(ExtractRequest(dataset="folder", root=root, store=str(tmp / "store"), workers=1,
                                         progress=False, overrides={"sample_rate": 22050, "clip_seconds": 0.5,
                                                                    "frames": 20, "folds": 2}),
                          on_event=lambda m: None)
    return tmp / "store", summary.key


@pytest.fixture
def copy(built, tmp_path) -> tuple[Path, str, Path]:
    """A copy of the store to damage, its key, and its feature set's folder."""
    store, key = built
    shutil.copytree(store, tmp_path / "store")
    return tmp_path / "store", key, tmp_path / "store" / "folder" / key


def chunk(group: Path, fold: str, c: int) -> Path:
    return group / f"fold-{fold}" / "x" / "c" / str(c) / "0" / "0" / "0"


def read_all(store: Path, key: str) -> None:
    """What training does with the folds: load them into memory, and stream them."""
    fset = open_foldset(str(store), "folder", key, ["1", "2"])
    load_in_memory(fset)
    for _ in StreamingLoader(fset, 4, run_chunks=1, buffer_chunks=1):
        pass


def test_an_intact_store_reads_and_records_a_crc_per_chunk(built):
    store, key = built
    read_all(store, key)
    manifest = FeatureStore(store).read_manifest("folder", key)
    assert all(isinstance(u["crc32c"], int) for u in manifest["units"].values())
    assert FeatureStore(store).verify("folder", key) == []


@pytest.mark.parametrize("damage", ["swapped", "flipped", "deleted"])
def test_a_damaged_chunk_stops_every_reader_with_one_line_naming_it(copy, damage, tmp_path):
    store, key, group = copy
    target = chunk(group, "2", 1)
    if damage == "swapped":  # a valid chunk with the wrong values: decodes fine
        target.write_bytes(chunk(group, "2", 0).read_bytes())
    elif damage == "flipped":  # bytes of the compressed payload, past the header
        raw = bytearray(target.read_bytes())
        for i in range(len(raw) // 2, len(raw) // 2 + 8):
            raw[i] ^= 0xFF
        target.write_bytes(bytes(raw))
    else:  # zarr would serve it as zeros (the fill value)
        target.unlink()
    name = r"damaged chunk .*fold-2/x/c/1/0/0/0: .*\(clips 4-7\)"
    with pytest.raises(StoreError, match=name):
        load_in_memory(open_foldset(str(store), "folder", key, ["2"]))
    with pytest.raises(StoreError, match=name):
        for _ in StreamingLoader(open_foldset(str(store), "folder", key, ["1", "2"]), 4, run_chunks=1):
            pass
    trained = run_cli("finetune", "--dataset", "folder", "--store", str(store), "--runs", str(tmp_path / "runs"),
                      "--epochs", "1", "--name", "f", *TINY)
    line = assert_one_line_error(trained, "damaged chunk", "fold-2/x/c/1/0/0/0", "clips 4-7", "audiofx cache verify")
    assert trained.returncode == 2, line
    assert not list((tmp_path / "runs" / "finetune" / "f").glob("checkpoints/*.pt"))  # no epoch trained
    verify = run_cli("cache", "verify", "--store", str(store))
    assert f"DAMAGED folder/{key}/fold-2/x chunk 1 (clips 4-7)" in verify.stdout and verify.returncode != 0


def test_rotated_labels_are_refused_before_anything_trains(copy):
    store, key, group = copy
    y = zarr.open_array(str(group / "fold-1" / "y"), mode="r+")
    y[:] = np.roll(y[:], 1)
    with pytest.raises(StoreError, match=r"damaged array .*fold-1/y: its values are not the ones"):
        load_in_memory(open_foldset(str(store), "folder", key, ["1"]))


@pytest.mark.parametrize("target", ["fold-1/y/c/0", "fold-1/ok/c/0", "fold-1/clip/c/0", "fold-1/x/zarr.json",
                                    "fold-1/zarr.json"])
def test_small_arrays_and_metadata_that_do_not_decode_are_one_line_for_every_reader(copy, target):
    """The labels' chunk, the usable-clip mask, the paths, x's or the fold's metadata with their
    bytes rotated: zstd's and JSON's own errors become the damaged-array line, in memory and
    streaming alike, before anything trains."""
    store, key, group = copy
    path = group / target
    data = path.read_bytes()
    path.write_bytes(data[1:] + data[:1])
    with pytest.raises(StoreError, match=r"damaged array .*fold-1"):
        load_in_memory(open_foldset(str(store), "folder", key, ["1"]))
    with pytest.raises(StoreError, match=r"damaged array .*fold-1"):
        for _ in StreamingLoader(open_foldset(str(store), "folder", key, ["1"]), 4):
            pass


def test_a_store_written_before_per_chunk_crcs_is_checked_by_its_sha256(copy):
    store, key, group = copy
    manifest = json.loads((group / "manifest.json").read_text())
    for unit in manifest["units"].values():
        del unit["crc32c"]
    (group / "manifest.json").write_text(json.dumps(manifest))
    read_all(store, key)  # intact: reads
    chunk(group, "1", 2).write_bytes(chunk(group, "1", 0).read_bytes())
    with pytest.raises(StoreError, match=r"fold-1/x/c/2/0/0/0: its values are not the ones the manifest recorded"):
        load_in_memory(open_foldset(str(store), "folder", key, ["1"]))


# Every kind of damage to the bytes of one chunk file; each must end in a StoreError (or a
# "damaged" line from verify), never a crash. Run in a process of its own: a segfault is the point.
FUZZ = r"""
import sys, random
from pathlib import Path
from audiofx.errors import StoreError
from audiofx.pipeline.store import FeatureStore
from audiofx.training.data.featuresets import open_foldset
from audiofx.training.data.memory import load_in_memory

store, key, target = sys.argv[1], sys.argv[2], Path(sys.argv[3])
good = target.read_bytes()
rng = random.Random(0)
cases = [good[:len(good) // 2], good[:len(good) // 10], good[:16], good[:15], b"", good + b"junk" * 100,
         bytes(len(good)), b"\xff" * len(good), rng.randbytes(len(good)), good[:16] + rng.randbytes(len(good) - 16)]
for _ in range(40):  # a few bytes flipped anywhere, header included
    raw = bytearray(good)
    for i in rng.sample(range(len(raw)), 4):
        raw[i] = rng.randrange(256)
    cases.append(bytes(raw))
refused = 0
for raw in cases:
    target.write_bytes(raw)
    try:
        load_in_memory(open_foldset(store, "folder", key, ["2"]))
    except StoreError:
        refused += 1
    else:
        assert raw == good, "damaged bytes were served"
    assert FeatureStore(store).verify("folder", key) or raw == good
print("refused", refused, "of", len(cases))
"""


def test_no_bytes_in_a_chunk_file_crash_a_reader(copy):
    store, key, group = copy
    proc = subprocess.run([sys.executable, "-c", FUZZ, str(store), key, str(chunk(group, "2", 1))], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    refused, total = (int(v) for v in proc.stdout.split()[1::2])
    assert refused == total == 50, proc.stdout
