"""The papers' split protocols through the real CLI (in process): a stored set is chosen by the
same --set its extraction was given, and a train/val/test split selects epochs on val."""

from __future__ import annotations

import json

import pytest

from tests import layouts as L
from tests.conftest import assert_one_line_error, run_cli

FAST = ("--set", "clip_seconds=0.5", "--set", "frames=20")


def summary_of(run_dir) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r.get("event") == "summary")


def test_gtzan_70_15_15_finetunes_on_train_selects_on_val_and_tests_once(tmp_path):
    root = L.make_gtzan(tmp_path / "gtzan", per_genre=10)
    store, runs = str(tmp_path / "store"), str(tmp_path / "runs")
    for protocol in ((), ("--set", "ratios=70/15/15")):
        done = run_cli("extract", "--dataset", "gtzan", "--root", str(root), "--store", store, *FAST, *protocol,
                       "--workers", "1", "--no-progress")
        assert done.returncode == 0, done.stderr
    common = ("--dataset", "gtzan", "--store", store, "--runs", runs, "--arch", "tiny", "--device", "cpu")
    split = run_cli("finetune", *common, "--set", "ratios=70,15,15", "--epochs", "2", "--lr", "1e-3",
                    "--no-progress", "--name", "split")
    assert split.returncode == 0, split.stderr
    assert "epochs selected on val" in split.stdout
    s = summary_of(tmp_path / "runs/finetune/split")
    assert s["n_folds"] == 1 and "selected_acc_mean" in s and "val_acc_mean" in s
    config = json.loads((tmp_path / "runs/finetune/split/config.json").read_text())
    assert config["set_options"] == {"ratios": "70/15/15"}  # one spelling: a resume given 70/15/15 is this run
    # The default protocol (10 folds) is taken without --set; evaluate takes --set as finetune does.
    knn = run_cli("evaluate", "--run", "random", *common, "--mode", "knn", "--k", "5,3", "--set", "ratios=70/15/15",
                  "--name", "knn")
    assert knn.returncode == 0, knn.stderr
    s = summary_of(tmp_path / "runs/evaluate/knn")
    # Each k reported, the first the headline; k also cross-validated on stratified parts of the one training split.
    assert s["n_folds"] == 1 and s["k"] == [5, 3] and s["acc_mean"] == s["acc_k5_mean"] and "acc_k3_mean" in s
    assert "acc_kcv_mean" in s
    assert "| accuracy (k 5) | accuracy (k 3) |" in (tmp_path / "runs/evaluate/knn/summary.md").read_text()
    for bad in ("5,5", "0", "x"):
        refused = run_cli("evaluate", "--run", "random", *common, "--mode", "knn", "--k", bad, "--name", "bad")
        assert refused.returncode == 2 and "not one or more distinct whole numbers" in refused.stderr
    tenfold = run_cli("evaluate", "--run", "random", *common, "--mode", "knn", "--k", "5", "--fold", "3",
                      "--name", "tenfold")
    assert tenfold.returncode == 0, tenfold.stderr
    assert "fold 3:" in tenfold.stdout
    missing = run_cli("finetune", *common, "--set", "folds=4", "--epochs", "1", "--name", "none")
    assert_one_line_error(missing, "no complete gtzan features", "--set folds=4", "sets there:")
    assert not (tmp_path / "runs/finetune/none").exists()


def test_one_mel_on_three_channels_lin2022_through_every_stage(tmp_path):
    """Lin 2022's input: one log-mel, stored once (1 channel), repeated on the network's 3."""
    from tests.conftest import make_class_folder

    make_class_folder(tmp_path / "raw", classes=2, per_class=6, seconds=0.5)
    store, runs = str(tmp_path / "store"), str(tmp_path / "runs")
    done = run_cli("extract", "--dataset", "folder", "--root", str(tmp_path / "raw"), "--store", store, "--preset",
                   "lin2022", "--set", "clip_seconds=0.5", "--set", "frames=32", "--set", "folds=2", "--workers", "1",
                   "--no-progress")
    assert done.returncode == 0, done.stderr
    common = ("--preset", "lin2022", "--store", store, "--runs", runs, "--arch", "tiny", "--device", "cpu")
    for stage in (("pretrain", "--method", "moco", "--datasets", "folder", "--epochs", "1", "--batch-size", "4",
                   "--no-progress", "--name", "moco"),
                  ("finetune", "--dataset", "folder", "--init", "moco", "--epochs", "1", "--no-progress", "--name", "ft"),
                  ("evaluate", "--run", "moco", "--dataset", "folder", "--mode", "knn", "--k", "3", "--name", "knn")):
        proc = run_cli(*stage, *common)
        assert proc.returncode == 0, proc.stderr
    key = json.loads((tmp_path / "runs/finetune/ft/config.json").read_text())["key"]
    from audiofx.pipeline.reading import load_fold
    from audiofx.pipeline.store import FeatureStore

    assert load_fold(FeatureStore(store), "folder", key, "1")[0].shape[1:] == (1, 128, 32)


def test_val_split_held_out_of_the_training_folds_selects_epochs_on_the_fold_averaged_curve(tmp_path):
    import numpy as np
    import torch

    from audiofx.training.data.memory import InMemoryData, hold_out
    from tests.conftest import make_class_folder

    # hold_out: disjoint, stratified, seeded
    data = InMemoryData(x=torch.arange(40.0).reshape(40, 1, 1, 1), y=torch.arange(40) % 4, index=torch.arange(40),
                        clips=[str(i) for i in range(40)], fold_of=["1"] * 40)
    rest, held = hold_out(data, 0.2, seed=0)
    assert len(held) == 8 and len(rest) == 32 and not set(held.clips) & set(rest.clips)
    assert np.bincount(held.y.numpy()).tolist() == [2, 2, 2, 2]
    assert hold_out(data, 0.2, seed=0)[1].clips == held.clips != hold_out(data, 0.2, seed=1)[1].clips

    make_class_folder(tmp_path / "raw", classes=2, per_class=9, seconds=0.5)
    store, runs = str(tmp_path / "store"), str(tmp_path / "runs")
    assert run_cli("extract", "--dataset", "folder", "--root", str(tmp_path / "raw"), "--store", store, *FAST,
                   "--set", "folds=3", "--workers", "1", "--no-progress").returncode == 0
    proc = run_cli("finetune", "--dataset", "folder", "--store", store, "--runs", runs, "--arch", "tiny", "--device",
                   "cpu", "--epochs", "3", "--lr", "1e-3", "--val-split", "0.25", "--no-progress", "--name", "v")
    assert proc.returncode == 0, proc.stderr
    assert "epochs selected on 0.25 of the training folds held out" in proc.stdout
    assert "best on the fold-averaged validation curve" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "runs/finetune/v/metrics.jsonl").read_text().splitlines()]
    s = summary_of(tmp_path / "runs/finetune/v")
    epochs = [r for r in records if r.get("event") == "epoch"]
    val = np.array([[r["val_acc"] for r in epochs if r["fold"] == f] for f in "123"])
    test = np.array([[r["test_acc"] for r in epochs if r["fold"] == f] for f in "123"])
    chosen = int(np.argmax(val.mean(0)))  # the first of equal maxima, as np.argmax takes
    assert s["curve_selected_epoch"] == chosen + 1
    assert s["curve_selected_acc_mean"] == pytest.approx(test[:, chosen].mean())
    assert s["best_mean_test_acc"] == pytest.approx(test.mean(0).max())
    assert s["selected_acc_mean"] == pytest.approx(np.mean([test[i, int(np.argmax(val[i]))] for i in range(3)]))
    assert "averaged over folds" in (tmp_path / "runs/finetune/v/summary.md").read_text()
    refused = run_cli("finetune", "--dataset", "folder", "--store", store, "--runs", runs, "--arch", "tiny",
                      "--epochs", "1", "--val-split", "0.25", "--memory-budget", "0", "--name", "streamed")
    assert_one_line_error(refused, "--val-split 0.25 needs the training folds in memory")


def test_pretrain_picks_each_pooled_set_by_set_and_leaves_out_a_held_out_fold(tmp_path):
    """Hornauer et al.'s phase 1: NPID trained on a dataset's training folds, scored on its fold 1
    by weighted 5-NN; DCASE 2013 pooled as its official two folds."""
    from audiofx.errors import ConfigError
    from audiofx.training.data.featuresets import pool_overrides
    from audiofx.training.stages.evaluate import EvaluateConfig, evaluate

    assert pool_overrides(["dcase2013", "esc50"], {"folds": 2, "n_mels": 64, "esc50:x": 1}) == \
        {"dcase2013": {"folds": 2, "n_mels": 64}, "esc50": {"n_mels": 64, "x": 1}}
    with pytest.raises(ConfigError, match="no dataset of the pool"):
        pool_overrides(["esc50"], {"ratios": "70/15/15"})
    with pytest.raises(ConfigError, match="gtzan is not in the pool"):
        pool_overrides(["esc50"], {"gtzan:folds": 2})

    root = L.make_dcase2013(tmp_path / "dcase", per_scene=5, scenes=["bus", "park"])
    L.make_dcase2013(tmp_path / "dcase", per_scene=2, scenes=["bus", "park"], subdir="test")
    store, runs = str(tmp_path / "store"), str(tmp_path / "runs")
    for folds in ("2", "5"):  # the 5-fold set is extracted last, so it is the newer
        done = run_cli("extract", "--dataset", "dcase2013", "--root", str(root), "--store", store, *FAST, "--set",
                       f"folds={folds}", "--workers", "1", "--no-progress")
        assert done.returncode == 0, done.stderr
    common = ("--store", store, "--runs", runs, "--arch", "tiny", "--device", "cpu")
    proc = run_cli("pretrain", "--method", "npid", "--datasets", "dcase2013", "--set", "folds=2", "--hold-out-fold",
                   "1", "--nce-k", "0", "--epochs", "1", "--batch-size", "4", "--no-progress", "--name", "p1", *common)
    assert proc.returncode == 0, proc.stderr
    assert "without fold 1 (4 samples" in proc.stdout  # fold 2 (the evaluation set, 4 clips) only
    config = json.loads((tmp_path / "runs/pretrain/p1/config.json").read_text())
    assert config["hold_out_fold"] == "1" and config["set_options"] == {"folds": 2}
    knn = run_cli("evaluate", "--run", "npid:p1", "--set", "folds=2", "--fold", "1",  # --dataset: the run's pool
                  "--mode", "knn", "--k", "5", "--name", "phase1", *common)
    assert knn.returncode == 0, knn.stderr
    assert summary_of(tmp_path / "runs/evaluate/phase1")["n_folds"] == 1
    assert json.loads((tmp_path / "runs/evaluate/phase1/config.json").read_text())["dataset"] == "dcase2013"
    with pytest.raises(ConfigError, match="evaluate needs --dataset: --run random names no pretrain run"):
        evaluate(EvaluateConfig(run="random", arch="tiny", store=store, runs_root=runs))
    whole = run_cli("pretrain", "--method", "npid", "--datasets", "dcase2013", "--nce-k", "0", "--epochs", "1",
                    "--batch-size", "4", "--no-progress", "--name", "p5", *common)
    assert whole.returncode == 0 and "(10 samples" in whole.stdout  # the default protocol: the development set
    bad = run_cli("pretrain", "--method", "npid", "--datasets", "dcase2013", "--hold-out-fold", "7", "--epochs", "1",
                  "--name", "p7", *common)
    assert_one_line_error(bad, "--hold-out-fold 7", "has folds 1, 2, 3, 4, 5")


def test_pretraining_draws_its_views_from_stored_augmented_copies(tmp_path):
    """Lin 2022's waveform augmentation, stored once: pretrain takes the set with copies when
    --set augment_copies asks for it, each view a random copy; the other stages never do."""
    import torch

    from audiofx.training.data.statistics import channel_stats, fold_copies
    from audiofx.training.stages.pretrain import pick_copies
    from tests.conftest import make_class_folder

    x = torch.arange(400 * 6.0).view(400, 6, 1, 1)  # 400 samples, 3 copies of 2 channels
    gen = torch.Generator().manual_seed(0)
    first, which = pick_copies(x, 3, gen)
    assert torch.equal(first, torch.stack([x[i, 2 * k:2 * k + 2] for i, k in enumerate(which.tolist())]))
    assert sorted(torch.bincount(which).tolist())[0] > 100  # every copy drawn, about a third each
    second, other = pick_copies(x, 3, gen, which)
    assert not (other == which).any() and torch.equal(second[:, 0, 0, 0], x[torch.arange(400), 2 * other, 0, 0])
    assert (other == (which + 1) % 3).any() and (other == (which + 2) % 3).any()  # either other copy
    feats = torch.randn(5, 6, 4, 7)
    mean, std = fold_copies(*channel_stats(feats.half()), 3)
    together = feats.half().float().view(5, 3, 2, 4, 7).transpose(0, 1).reshape(15, 2, 4, 7)
    assert torch.allclose(mean.flatten(), together.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(std.flatten(), together.std(dim=(0, 2, 3), unbiased=False), atol=1e-4)

    make_class_folder(tmp_path / "raw", classes=2, per_class=6, seconds=0.5)
    store, runs = str(tmp_path / "store"), str(tmp_path / "runs")
    for copies in ("0", "2"):
        done = run_cli("extract", "--dataset", "folder", "--root", str(tmp_path / "raw"), "--store", store, *FAST,
                       "--set", "folds=2", "--set", f"augment_copies={copies}", "--workers", "1", "--no-progress")
        assert done.returncode == 0, done.stderr
    assert "the clip and 2 augmented copies of it (3x)" in done.stderr
    common = ("--store", store, "--runs", runs, "--arch", "tiny", "--device", "cpu")
    proc = run_cli("pretrain", "--method", "simclr", "--datasets", "folder", "--set", "augment_copies=2",
                   "--no-spec-augment", "--time-shift", "0", "--epochs", "1", "--batch-size", "4", "--no-progress",
                   "--name", "aug", *common)  # no other augmentation: the copies alone make the views differ
    assert proc.returncode == 0, proc.stderr
    assert "views drawn from 3 stored copies of each clip" in proc.stdout
    ckpt = torch.load(tmp_path / "runs/pretrain/aug/checkpoints/final.pt", weights_only=True)
    assert ckpt["states"]["mean"].shape == (1, 3, 1, 1)  # one copy's channels: evaluate standardises the plain set
    # The other stages take the plain set; given the augmented one by --key, they refuse it.
    knn = run_cli("evaluate", "--run", "simclr:aug", "--dataset", "folder", "--mode", "knn", "--k", "3",
                  "--name", "knn", *common)
    assert knn.returncode == 0, knn.stderr
    augmented = json.loads((tmp_path / "runs/pretrain/aug/config.json").read_text())["pool"]["folder"]
    refused = run_cli("finetune", "--dataset", "folder", "--key", augmented, "--epochs", "1", "--name", "x", *common)
    assert_one_line_error(refused, "holds 3 copies of each clip (augment_copies)")
    both = run_cli("finetune", "--dataset", "folder", "--key", augmented, "--set", "augment_copies=2", "--epochs", "1",
                   "--name", "x", *common)
    assert_one_line_error(both, f"--key {augmented} names one feature set and --set chooses among them")
    plain = run_cli("pretrain", "--method", "simclr", "--datasets", "folder", "--no-spec-augment", "--time-shift", "0",
                    "--epochs", "1", "--name", "plain", *common)
    assert_one_line_error(plain, "every augmentation is off")  # the plain set has no copies to draw from


def test_the_pool_takes_each_clip_once(tmp_path):
    """ESC-10's clips are ESC-50's, and a dataset named twice is one dataset."""
    root = L.make_esc50(tmp_path / "esc50", categories=L.ESC50_CATEGORIES[:2])
    store, runs = str(tmp_path / "store"), str(tmp_path / "runs")
    for dataset in ("esc50", "esc10"):
        done = run_cli("extract", "--dataset", dataset, "--root", str(root), "--store", store, *FAST, "--workers", "1",
                       "--no-progress")
        assert done.returncode == 0, done.stderr
    proc = run_cli("pretrain", "--method", "npid", "--datasets", "esc10,esc50,esc50", "--nce-k", "0", "--epochs", "1",
                   "--batch-size", "4", "--store", store, "--runs", runs, "--arch", "tiny", "--device", "cpu",
                   "--no-progress", "--name", "once")
    assert proc.returncode == 0, proc.stderr
    assert "esc50 given twice in --datasets: pooled once" in proc.stdout
    assert "esc10's clips are all in esc50's: the pool takes them once, from esc50" in proc.stdout
    assert "pretrain npid on esc50 (10 samples" in proc.stdout  # 2 categories x 5 clips, none twice
    assert list(json.loads((tmp_path / "runs/pretrain/once/config.json").read_text())["pool"]) == ["esc50"]


def test_an_option_the_protocol_has_no_use_for_is_refused_at_extraction(tmp_path):
    root = L.make_gtzan(tmp_path / "gtzan", per_genre=10)
    proc = run_cli("extract", "--dataset", "gtzan", "--root", str(root), "--store", str(tmp_path / "s"), *FAST,
                   "--set", "ratios=70/15/15", "--set", "folds=10", "--workers", "1", "--no-progress")
    assert_one_line_error(proc, "--set folds=10 does not apply to this gtzan protocol", "ratios=70/15/15")
    assert not (tmp_path / "s").exists()


def test_curve_selection_takes_the_epoch_of_the_best_fold_averaged_validation_score():
    from audiofx.training.stages.finetune import curve_selection

    val = {"1": [0.2, 0.6, 0.5], "2": [0.4, 0.3, 0.6]}  # means 0.30, 0.45, 0.55: epoch 3
    test = {"1": [0.9, 0.1, 0.3], "2": [0.8, 0.2, 0.5]}  # the test folds' own best mean is epoch 1 (0.85)
    records = [{"event": "epoch", "fold": f, "epoch": e + 1, "val_acc": val[f][e], "test_acc": test[f][e]}
               for f in val for e in range(3)]
    s = curve_selection(records + [{"event": "fold_done", "fold": "1"}], ["1", "2"])
    assert s["curve_selected_epoch"] == 3 and s["best_mean_val_acc"] == pytest.approx(0.55)
    assert s["curve_selected_acc_mean"] == pytest.approx(0.4) and s["curve_selected_acc_std"] == pytest.approx(0.1414, abs=1e-4)
    assert s["best_mean_test_acc"] == pytest.approx(0.85)
    assert curve_selection(records, ["1", "2", "3"]) == {}  # a fold without a validation curve: no selection
