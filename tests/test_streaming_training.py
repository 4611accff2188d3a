"""finetune and evaluate streaming from the store (`--memory-budget`, 0 forces streaming)
through the real CLI, on the synthetic demo dataset (5 classes, 200 clips, 5 folds of 40)
and on a learnable FSD50K-layout fixture (multi-label, with a validation split)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from audiofx.pipeline.extract import ExtractRequest, extract
from audiofx.training.stages.runs import Run
from tests.conftest import TINY, assert_one_line_error, kill_9, run_cli, start_cli, wait_while_running


@pytest.fixture(scope="module")
def store(demo_store) -> Path:
    return demo_store


def metrics(run: Path) -> list[dict]:
    return Run(run).metrics()


def epochs_of(records: list[dict], key: str = "test_acc") -> list[tuple[str, int, float]]:
    return [(r["fold"], r["epoch"], r[key]) for r in records if r["event"] == "epoch"]


def test_streaming_finetune_learns_and_records_its_mode(store, tmp_path):
    # One test fold: the fold loop is the in-memory one (test_training checks --fold all).
    proc = run_cli("finetune", "--dataset", "demo", "--store", str(store), "--runs", str(tmp_path), "--init", "scratch",
                   "--fold", "2", "--epochs", "4", "--lr", "3e-3", "--memory-budget", "0", "--name", "s", *TINY)
    assert proc.returncode == 0, proc.stderr
    # 200 clips of 3 x 128 x 100 float16 = 15.36 MB, over a budget of 0
    assert "features streaming (0.0154 GB, over the budget of 0 GB)" in proc.stdout.splitlines()[0]
    run = tmp_path / "finetune" / "s"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data_mode"] == "streaming" and cfg["memory_budget_gb"] == 0
    records = metrics(run)
    folds = {r["fold"]: r for r in records if r["event"] == "fold_done"}
    assert sorted(folds) == ["2"]
    accs = [a for f, _, a in epochs_of(records) if f == "2"]
    assert len(accs) == 4 and folds["2"]["last_acc"] == accs[-1]
    assert sorted(run.joinpath("predictions").iterdir()) == [run / "predictions" / "fold-2.npz"]
    summary = next(r for r in records if r["event"] == "summary")
    assert summary["last_acc_mean"] == folds["2"]["last_acc"]
    # Chance is 20% (40 test clips: a chance accuracy has a std of ~6 points). Measured with
    # these settings over seeds 0-2 and all folds: streaming 78.5-81.5% on average.
    assert summary["last_acc_mean"] > 0.5


def test_streaming_statistics_equal_channel_stats(store):
    from audiofx.training.data.featuresets import FoldSet, resolve_featureset
    from audiofx.training.data.memory import load_in_memory
    from audiofx.training.data.statistics import channel_stats, streaming_channel_stats

    key, _ = resolve_featureset(str(store), "demo")
    for folds, batch in ((["2", "3", "4", "5"], 256), (["1", "3", "5"], 48), (["4"], 7)):
        fs = FoldSet(str(store), "demo", key, folds)
        x = load_in_memory(fs).x
        mean, std = streaming_channel_stats(fs, batch=batch)
        ref_mean, ref_std = channel_stats(x, chunk=batch)
        assert torch.equal(mean, ref_mean) and torch.equal(std, ref_std)  # bit for bit
        # and both are the statistics: numpy, float64, all at once
        a = x.numpy().astype(np.float64)
        assert np.allclose(mean.flatten().numpy(), a.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-6)
        assert np.allclose(std.flatten().numpy(), a.std(axis=(0, 2, 3)), rtol=1e-5)
    assert torch.equal(streaming_channel_stats(fs)[0], channel_stats(x)[0])  # the defaults agree too


def test_evaluate_knn_streaming_equals_in_memory(store, tmp_path):
    from audiofx.training.models.encoders import build_encoder

    torch.manual_seed(0)  # a random tiny encoder without recorded statistics: both modes compute them
    encoder = tmp_path / "encoder.pt"
    torch.save({"states": {"encoder": build_encoder("tiny").state_dict()}, "meta": {"arch": "tiny"}}, encoder)
    common = ["evaluate", "--run", str(encoder), "--dataset", "demo", "--store", str(store), "--runs", str(tmp_path),
              "--mode", "knn", "--k", "20"]
    memory, streaming = run_cli(*common, "--name", "mem"), run_cli(*common, "--memory-budget", "0", "--name", "str")
    assert memory.returncode == 0, memory.stderr
    assert streaming.returncode == 0, streaming.stderr
    assert "features in memory (0.0154 GB, budget" in memory.stdout.splitlines()[0]
    assert "features streaming (0.0154 GB, over the budget of 0 GB)" in streaming.stdout.splitlines()[0]
    a, b = tmp_path / "evaluate" / "mem", tmp_path / "evaluate" / "str"
    assert metrics(a) == metrics(b)  # every fold's scores, k by CV, the summary: exactly
    assert next(r for r in metrics(a) if r["event"] == "summary")["acc_mean"] > 0.3  # real numbers, not chance
    assert (a / "per_class.json").read_text() == (b / "per_class.json").read_text()
    pa, pb = Run(a).predictions(), Run(b).predictions()
    assert sorted(pa) == list("12345") and sorted(pb) == sorted(pa)
    for fold in pa:
        assert len(pa[fold]["clip"]) == 40
        for k in ("clip", "y_true", "y_pred", "scores"):
            assert np.array_equal(pa[fold][k], pb[fold][k]), (fold, k)
    assert json.loads((b / "config.json").read_text())["data_mode"] == "streaming"
    assert memory.stdout.splitlines()[-1].split(";")[0] == streaming.stdout.splitlines()[-1].split(";")[0]


def test_fragments_refuse_to_stream_with_a_one_line_error(store, tmp_path):
    proc = run_cli("finetune", "--dataset", "demo", "--store", str(store), "--runs", str(tmp_path), "--fragments", "2",
                   "--memory-budget", "0", "--name", "f", *TINY)
    assert_one_line_error(proc, "--fragments 2 needs the training folds in memory", "(0.0154 GB)",
                          "over the memory budget of 0 GB", "raise --memory-budget to at least 0.0154")
    assert not (tmp_path / "finetune" / "f").exists()  # refused before a run folder was made


def test_streaming_finetune_resumes_after_kill_9_and_matches_an_uninterrupted_run(store, tmp_path):
    args = ["finetune", "--dataset", "demo", "--store", str(store), "--runs", str(tmp_path), "--init", "scratch",
            "--fold", "1", "--epochs", "2", "--lr", "1e-3", "--memory-budget", "0", *TINY]
    whole = run_cli(*args, "--name", "whole")
    assert whole.returncode == 0, whole.stderr
    proc = start_cli(*args, "--name", "cut", own_group=True)
    checkpoint = tmp_path / "finetune" / "cut" / "checkpoints" / "fold-1.pt"
    wait_while_running(proc, checkpoint.exists)
    kill_9(proc)
    done_before = [e for _, e, _ in epochs_of(metrics(tmp_path / "finetune" / "cut"))]
    assert len(done_before) == 1
    # another budget would read in another order: the run keeps the mode it started with
    assert_one_line_error(run_cli(*args[:-5], "--memory-budget", "100", *TINY, "--name", "cut", "--resume"),
                          "was started with other settings (data_mode streaming, now memory)")
    # without --memory-budget the resume keeps the recorded mode, and says so
    resumed = run_cli(*args[:-5], *TINY, "--name", "cut", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "features streaming (0.0154 GB, as the resumed run started)" in resumed.stdout.splitlines()[0]
    # an epoch's line is logged before its checkpoint, so the log may be one epoch ahead of it
    assert any(f"resuming after epoch {e}" in resumed.stdout for e in (done_before[-1], done_before[-1] - 1))
    cut, ref = metrics(tmp_path / "finetune" / "cut"), metrics(tmp_path / "finetune" / "whole")
    assert [e for _, e, _ in epochs_of(cut)] == [1, 2]
    assert epochs_of(cut) == epochs_of(ref)
    a = torch.load(tmp_path / "finetune" / "cut" / "checkpoints" / "fold-1.pt", weights_only=True)["states"]
    b = torch.load(tmp_path / "finetune" / "whole" / "checkpoints" / "fold-1.pt", weights_only=True)["states"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["mean"], b["mean"]) and torch.equal(a["std"], b["std"])


def test_streaming_finetune_on_a_multilabel_set_with_a_validation_split(tmp_path):
    from audiofx.training.stages.metrics import multilabel_scores
    from tests.layouts import make_fsd50k_learnable

    make_fsd50k_learnable(tmp_path / "raw")
    extract(ExtractRequest(dataset="fsd50k", root=tmp_path / "raw", store=str(tmp_path / "features"), workers=1,
                           progress=False, overrides={"clip_seconds": 1, "frames": 100}), on_event=lambda m: None)
    proc = run_cli("finetune", "--dataset", "fsd50k", "--store", str(tmp_path / "features"), "--runs", str(tmp_path),
                   "--epochs", "4", "--lr", "3e-3", "--memory-budget", "0", "--name", "ml", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "streaming" in proc.stdout.splitlines()[0] and "validation split selects" in proc.stdout
    run = tmp_path / "finetune" / "ml"
    records = metrics(run)
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4] and all(0 < r["val_map"] <= 1 for r in epochs)
    done = next(r for r in records if r["event"] == "fold_done")
    saved = np.load(run / "predictions" / "fold-eval.npz")
    y, scores = saved["y_true"], saved["scores"]
    assert y.dtype == bool and y.shape == (24, 4) and scores.shape == (24, 4)
    assert done["last_map"] == pytest.approx(multilabel_scores(y, scores)["map"])
    chance = float(y.mean(axis=0)[y.any(axis=0)].mean())  # ~0.4: each class's AP is its prevalence
    assert done["last_map"] > chance + 0.2
