"""Pretraining streamed from the store (--memory-budget): the pool loader gives the in-memory
pool's samples under the same pool indices, its statistics match, and NPID / SimCLR train,
monitor and resume through the real CLI.

The store holds the demo dataset (200 clips of 100 frames) and a `folder` dataset of 15
clips of 250 frames: each of those becomes two samples of 100 frames (the last 50 frames
are cut off, as in memory), so the pool has 200 + 30 samples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from audiofx.pipeline.extract import ExtractRequest, extract
from audiofx.training.data.featuresets import FoldSet, resolve_featureset
from audiofx.training.data.memory import load_in_memory
from audiofx.training.data.pretrain_pool import PoolLoader, load_pool, pool_channel_stats, segments
from audiofx.training.data.statistics import channel_stats
from audiofx.training.stages.runs import Run
from tests.conftest import (
    REPO,
    TINY,
    cli_env,
    copy_store,
    kill_9,
    make_class_folder,
    run_cli,
    start_cli,
    wait_while_running,
)

FRAMES = 100
POOL = 200 + 15 * 2
# raw bytes (float16): demo 200 x 3x128x100 = 15.36 MB, folder 15 x 3x128x250 = 2.88 MB
BETWEEN = "0.016"  # GB: the demo set alone fits (kNN monitoring), the pool does not (streaming)


@pytest.fixture(scope="module")
def store(tmp_path_factory, demo_store) -> Path:
    base = tmp_path_factory.mktemp("pool")
    copy_store(demo_store, base)
    root = make_class_folder(base / "folder", classes=3, per_class=5, seconds=5.0)
    extract(ExtractRequest(dataset="folder", root=root, store=str(base / "features"), workers=1, progress=False,
                           overrides={"clip_seconds": 5.0, "frames": 250}), on_event=lambda m: None)
    return base / "features"


@pytest.fixture(scope="module")
def pool(store) -> tuple[list[FoldSet], torch.Tensor]:
    """The FoldSets of the pool (demo, folder) and the in-memory pool built as pretrain does."""
    foldsets = []
    for ds in ("demo", "folder"):
        key, manifest = resolve_featureset(str(store), ds)
        foldsets.append(FoldSet(str(store), ds, key, list(manifest["folds"])))
    x, demo = load_pool(foldsets, FRAMES, keep=0)
    assert x.shape == (POOL, 3, 128, FRAMES) and x.dtype == torch.float16
    # cut in place, one dataset at a time: the concatenation of each dataset's segments
    assert torch.equal(x, torch.cat([segments(load_in_memory(fs).x, FRAMES) for fs in foldsets]))
    assert torch.equal(demo.x, load_in_memory(foldsets[0]).x)
    return foldsets, x


def epoch_batches(loader: PoolLoader, epoch: int) -> list:
    loader.set_epoch(epoch)
    return list(loader)


@pytest.mark.parametrize("world", [1, 2])
def test_pool_loader_gives_every_pool_sample_once_with_its_in_memory_values(pool, world):
    foldsets, ref = pool
    # One chunk per run and a one-chunk buffer: many runs, so run order and buffer shuffling matter.
    loaders = [PoolLoader(foldsets, FRAMES, 16, seed=3, rank=r, world_size=world, run_chunks=1, buffer_chunks=1,
                          threads=1) for r in range(world)]
    assert all(ld.n == POOL for ld in loaders)
    per_rank = [epoch_batches(ld, 1) for ld in loaders]
    for ld, batches in zip(loaders, per_rank):
        assert len(batches) == len(ld)
        for b in batches:
            assert b.x.dtype == torch.float32 and b.x.shape[1:] == (3, 128, FRAMES)
            assert torch.equal(b.x, ref[b.index].float())  # bitwise: float16 values cast
            # a demo batch: 16 clips of one sample; a folder batch: 16 // 2 = 8 clips of two samples
            assert len(b) <= 16 and (bool((b.index < 200).all()) or bool((b.index >= 200).all()))
            if int(b.index[0]) >= 200:  # a clip's two segments, consecutive and in order
                assert torch.equal(b.index[1::2] - b.index[0::2], torch.ones(len(b) // 2, dtype=torch.long))
    # Every rank takes the same steps with batches of the same sizes (DDP and NPID's gather need it).
    assert len({tuple(len(b) for b in batches) for batches in per_rank}) == 1
    seen = torch.cat([b.index for batches in per_rank for b in batches])
    assert set(seen.tolist()) == set(range(POOL))
    # Duplicates only from padding each rank to equal shares: the folder's 15 clips become 2 x 8
    # (one clip, two samples, twice); demo's 200 split evenly.
    assert len(seen) == POOL + (2 if world == 2 else 0)
    if world == 1:
        order = seen.tolist()
        assert order != sorted(order)  # shuffled
        # the datasets' batches come in the seeded interleaving, 13 of demo and 2 of folder
        ld = loaders[0]
        assert [int(b.index[0] >= 200) for b in per_rank[0]] == ld.order(1).tolist()
        assert sorted(ld.order(1).tolist()) == [0] * 13 + [1] * 2
        assert any(ld.order(e).tolist() != sorted(ld.order(e).tolist()) for e in range(3))
        # the order depends only on (seed, epoch): a new loader repeats it, another epoch differs
        again = PoolLoader(foldsets, FRAMES, 16, seed=3, run_chunks=1, buffer_chunks=1, threads=1)
        assert torch.equal(torch.cat([b.index for b in epoch_batches(again, 1)]), seen)
        assert not torch.equal(torch.cat([b.index for b in epoch_batches(again, 2)]), seen)


def test_streamed_channel_stats_equal_the_in_memory_pools(pool):
    foldsets, ref = pool
    mean, std = pool_channel_stats(foldsets, FRAMES, batch_size=7)
    want_mean, want_std = channel_stats(ref)
    assert mean.shape == (1, 3, 1, 1)
    torch.testing.assert_close(mean, want_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std, want_std, rtol=1e-6, atol=1e-6)
    # the cut matters: the folder clips' last 50 frames are not in the statistics
    full = load_in_memory(foldsets[1]).x.double()
    assert not torch.allclose(full.mean(dim=(0, 2, 3)), segments(load_in_memory(foldsets[1]).x, FRAMES).double()
                              .mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in Run(run).metrics() if r["event"] == "epoch"]


def test_npid_streams_and_resumes_after_kill_9_like_an_uninterrupted_run(store, tmp_path):
    args = ["pretrain", "--method", "npid", "--store", str(store), "--runs", str(tmp_path), "--epochs", "2",
            "--batch-size", "32", "--memory-budget", "0", *TINY]
    whole = run_cli(*args, "--name", "whole")
    assert whole.returncode == 0, whole.stderr
    first = whole.stdout.splitlines()[0]
    assert first.startswith("data: streaming (") and "over the budget of 0 GB" in first, whole.stdout
    assert f"({POOL} samples of {FRAMES} frames)" in whole.stdout
    assert "no kNN monitoring: demo's folds for it take 0.02 GB, over the memory budget" in whole.stdout
    cfg = json.loads((tmp_path / "pretrain" / "whole" / "config.json").read_text())
    assert cfg["data_mode"] == "streaming" and cfg["memory_budget_gb"] == 0.0
    assert len(losses(tmp_path / "pretrain" / "whole")) == 2 and np.isfinite(losses(tmp_path / "pretrain" / "whole")).all()
    bank = torch.load(tmp_path / "pretrain" / "whole" / "checkpoints" / "last.pt", weights_only=True)["states"]["method"]
    bank = bank["bank.memory"]
    assert bank.shape == (POOL, 128)  # one row per pool sample, as in memory
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(POOL), rtol=0, atol=1e-5)

    proc = start_cli(*args, "--name", "cut", own_group=True)
    checkpoint = tmp_path / "pretrain" / "cut" / "checkpoints" / "last.pt"
    wait_while_running(proc, checkpoint.exists)
    kill_9(proc)
    done = len(losses(tmp_path / "pretrain" / "cut"))
    assert done == 1
    resumed = run_cli(*args, "--name", "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("data: streaming") and "resuming after epoch" in resumed.stdout
    # the batch order depends only on (seed, epoch): the resumed run is the uninterrupted one
    assert losses(tmp_path / "pretrain" / "cut") == losses(tmp_path / "pretrain" / "whole")
    a = torch.load(tmp_path / "pretrain" / "cut" / "checkpoints" / "final.pt", weights_only=True)["states"]
    b = torch.load(tmp_path / "pretrain" / "whole" / "checkpoints" / "final.pt", weights_only=True)["states"]
    assert all(torch.equal(a["encoder"][k], b["encoder"][k]) for k in a["encoder"])
    assert torch.equal(a["mean"], b["mean"]) and torch.equal(a["std"], b["std"])


def test_simclr_streams_with_knn_monitoring_when_the_monitored_set_fits(store, pool, tmp_path):
    args = ["pretrain", "--method", "simclr", "--store", str(store), "--runs", str(tmp_path), "--epochs", "1",
            "--batch-size", "64", "--memory-budget", BETWEEN, "--name", "s", *TINY]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("data: streaming (") and first.endswith("GB, over the budget of 0.016 GB)"), proc.stdout
    assert "kNN" in proc.stdout and "on demo fold 1 (monitoring only)" in proc.stdout
    records = Run(tmp_path / "pretrain" / "s").metrics()
    assert np.isfinite(records[0]["loss"]) and 0 <= records[0]["knn_acc"] <= 1
    final = torch.load(tmp_path / "pretrain" / "s" / "checkpoints" / "final.pt", weights_only=True)["states"]
    mean, std = channel_stats(pool[1])
    torch.testing.assert_close(final["mean"], mean, rtol=1e-6, atol=1e-6)
    again = run_cli(*args, "--resume")
    assert again.returncode == 0 and "the run has finished, nothing left to do" in again.stdout, again.stderr
    # a budget the whole pool fits in: held in memory, and config.json says so
    mem = run_cli(*args[:-len(TINY) - 4], "--memory-budget", "1", "--name", "m", *TINY)
    assert mem.returncode == 0, mem.stderr
    first = mem.stdout.splitlines()[0]
    assert first.startswith("data: in memory (") and first.endswith("GB, budget 1 GB)"), mem.stdout
    config = tmp_path / "pretrain" / "m" / "config.json"
    recorded = json.loads(config.read_text())
    assert recorded["data_mode"] == "memory" and recorded["memory_budget_gb"] == 1.0
    # a run from before --memory-budget (no such keys) was in memory, and resumes so
    del recorded["data_mode"], recorded["memory_budget_gb"]
    config.write_text(json.dumps(recorded))
    old = run_cli(*args[:-len(TINY) - 4], "--name", "m", "--resume", *TINY)
    assert old.returncode == 0, old.stderr
    assert old.stdout.startswith("data: in memory") and "resuming after epoch 1" in old.stdout


def test_torchrun_two_ranks_stream_the_pool(store, pool, tmp_path):
    """Two gloo ranks under torchrun, each streaming its share: the same steps on both (NPID
    gathers both ranks' batches into one bank every step, which needs equal batch sizes);
    the input statistics from each rank's half of the pool, summed over the ranks."""
    torchrun = Path(sys.executable).parent / "torchrun"
    # --standalone: a free port for the rendezvous, not the fixed 29500 another job may hold
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "audiofx", "pretrain",
                           "--method", "npid", "--epochs", "1", "--batch-size", "25", "--name", "p", "--memory-budget",
                           "0", "--store", str(store), "--runs", str(tmp_path), *TINY],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("data: streaming")
    state = torch.load(tmp_path / "pretrain" / "p" / "checkpoints" / "last.pt", weights_only=True)["states"]["method"]
    torch.testing.assert_close(state["bank.memory"].norm(dim=1), torch.ones(POOL), rtol=0, atol=1e-5)
    assert np.isfinite(losses(tmp_path / "pretrain" / "p")).all()
    final = torch.load(tmp_path / "pretrain" / "p" / "checkpoints" / "final.pt", weights_only=True)["states"]
    mean, std = channel_stats(pool[1])  # the whole pool in one process
    torch.testing.assert_close(final["mean"], mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(final["std"], std, rtol=1e-6, atol=1e-6)
