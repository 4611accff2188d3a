"""A smoke `reproduce` of each recipe besides shin2021 (tests/test_reproduce.py runs that one):
a tiny CNN, one or two epochs, fixture datasets in the official layouts, extracted beforehand
with short clips under each recipe's protocol; each run completes and ends with its table,
whose cells read the runs with the row's metric."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from audiofx.pipeline.extract import ExtractRequest, extract
from audiofx.training.stages.runs import Run
from tests import layouts as L
from tests.conftest import run_cli
from tests.test_reproduce import table

SHORT = {"clip_seconds": 0.5, "frames": 20}


def extracted(base: Path, dataset: str, root: Path, preset: str, **options) -> None:
    extract(ExtractRequest(dataset=dataset, root=root, store=str(base / "features"), preset=preset,
                           overrides={**SHORT, **options}, workers=1, progress=False), on_event=lambda m: None)


def reproduce(base: Path, recipe: str, *args: str) -> str:
    proc = run_cli("reproduce", recipe, "--arch", "tiny", "--store", "features", "--runs", "runs", "--no-progress",
                   *args, cwd=base)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (base / "runs" / f"reproduce-{recipe}" / "table.md").is_file()
    return proc.stdout


def summary(base: Path, stage: str, name: str) -> dict:
    return Run(base / "runs" / stage / name).summary()


def pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def test_hornauer2021_phase1_knn_and_fig4_epochs_on_dcase2013_official_folds(tmp_path):
    root = L.make_dcase2013(tmp_path / "dcase", per_scene=2, scenes=L.DCASE2013_SCENES[:4])
    L.make_dcase2013(tmp_path / "dcase", per_scene=2, scenes=L.DCASE2013_SCENES[:4], subdir="test")
    extracted(tmp_path, "dcase2013", root, "hornauer2021", folds=2)
    out = reproduce(tmp_path, "hornauer2021", "--datasets", "dcase2013", "--epochs-scale", "0.03")  # 2 fine-tuning epochs
    t = table(out)
    phase1 = summary(tmp_path, "evaluate", "hornauer2021-dcase2013-phase1-knn")
    assert phase1["n_folds"] == 1 and phase1["k"] == [5]
    assert t["phase 1: NPID on the dataset alone, weighted 5-NN on fold 1 (the paper reports no number)"][1] == \
        f"{pct(phase1['acc_mean'], 0)} (no number in the paper)"
    config = json.loads((tmp_path / "runs/pretrain/hornauer2021-dcase2013-phase1-npid/config.json").read_text())
    assert (config["hold_out_fold"], config["set_options"]) == ("1", {"dcase2013:folds": 2})
    # Fig. 4's reading: epoch 11 is beyond a 2-epoch smoke run, so the last epoch is shown and said so
    npid = summary(tmp_path, "finetune", "hornauer2021-dcase2013-npid")
    assert npid["n_folds"] == 2
    assert t["Fig. 4: DLS (NPID on the pool), all layers fine-tuned"][1] == \
        f"{pct(npid['last_acc_mean'], npid['last_acc_std'])} [last epoch; the paper's epoch 11 not reached] (paper ≈50)"
    assert "accuracy vs epoch" in (tmp_path / "runs/reproduce-hornauer2021/report/report.md").read_text().lower()


def test_zhou2019_rows_on_the_average_channel_and_the_quoted_baseline(tmp_path):
    extracted(tmp_path, "tut2018", L.make_tut(tmp_path / "tut"), "zhou2019", frames=0)
    out = reproduce(tmp_path, "zhou2019", "--epochs-scale", "0.01")
    t = table(out)
    assert t["Table 3: DCASE 2018 baseline [26] (quoted by the paper, not run)"] == ["quoted", "not run (paper 59.7)"]
    for row, name, paper in (("Table 1: AlexNet, random init", "alexnet-scratch", "59.5"),
                             ("Table 1: VGG-16, random init", "scratch", "61.9")):
        s = summary(tmp_path, "finetune", f"zhou2019-tut2018-{name}")
        assert t[row] == ["last epoch", f"{pct(s['last_acc_mean'], s['last_acc_std'])} (paper {paper})"]
        assert json.loads((tmp_path / f"runs/finetune/zhou2019-tut2018-{name}/config.json").read_text())[
            "input_channel_index"] == 2  # mid: the average channel
    assert "difference from the paper: Table 3's baseline (59.7)" in out


def test_lin2022_selected_epochs_and_k_by_cross_validation_on_gtzan_70_15_15(tmp_path):
    extracted(tmp_path, "gtzan", L.make_gtzan(tmp_path / "gtzan", per_genre=10), "lin2022", ratios="70/15/15")
    extracted(tmp_path, "fsd50k", L.make_fsd50k(tmp_path / "fsd50k"), "lin2022", augment_copies=3)
    out = reproduce(tmp_path, "lin2022", "--datasets", "gtzan", "--epochs-scale", "0.07")  # 2 fine-tuning epochs
    t = table(out)
    moco = summary(tmp_path, "finetune", "lin2022-gtzan-moco")
    assert moco["n_folds"] == 1 and moco["curve_selected_epoch"] in (1, 2)
    assert t["MoCo Fine Tune"] == ["epoch selected on validation",
                                   f"{pct(moco['curve_selected_acc_mean'], 0)} [epoch {moco['curve_selected_epoch']} on "
                                   f"val; last {pct(moco['last_acc_mean'], 0)}] (paper 57.5)"]
    knn = summary(tmp_path, "evaluate", "lin2022-gtzan-npid-knn")
    assert knn["k"] == [35, 200]
    assert t["NPID KNN (k by cross-validation)"][1] == \
        f"{pct(knn['acc_kcv_mean'], 0)} [k 35: {pct(knn['acc_mean'], 0)}] (paper 47.3)"
    linear = summary(tmp_path, "evaluate", "lin2022-gtzan-moco-linear")
    assert t["MoCo Freeze (frozen linear)"][1] == f"{pct(linear['acc_mean'], 0)} (paper 53.8)"
    assert np.isfinite(moco["best_mean_test_acc"])
    assert "views drawn from 4 stored copies of each clip" in out  # the waveform augmentation, stored
    for method in ("npid", "moco"):  # "a frequency and time mask" (Lin, L531) on each view
        config = json.loads((tmp_path / "runs" / "pretrain" / f"lin2022-fsd50k-{method}" / "config.json").read_text())
        assert (config["time_masks"], config["freq_masks"], config["spec_augment"]) == (1, 1, True)
    assert "difference from the paper" not in out
