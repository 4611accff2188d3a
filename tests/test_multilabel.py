"""Multi-label sets (FSD50K): metrics against hand computations, kNN votes and late fusion
against direct formulas, and the chain (extract, finetune, evaluate, compare, report) on a
learnable FSD50K-layout fixture through the real CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audiofx.training.stages.fusion import fuse_posteriors
from audiofx.training.stages.knn import choose_k, knn_scores
from audiofx.training.stages.metrics import multilabel_scores, per_class_report
from audiofx.training.stages.runs import Run
from audiofx.training.stages.tasks import Task
from tests.conftest import TINY, run_cli, run_process
from tests.layouts import make_fsd50k_learnable


def test_map_auc_and_dprime_against_hand_computation():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)
    s = np.array([[0.9, 0.2, 0.1], [0.3, 0.8, 0.4], [0.4, 0.1, 0.3], [0.5, 0.6, 0.2]])
    # class 0: ranking 0.9(+) 0.5(-) 0.4(+) 0.3(-): precision at the hits 1 and 2/3 -> AP 5/6
    # class 1: ranking 0.8(+) 0.6(-) 0.2(-) 0.1(+): hits at ranks 1 and 4 -> AP (1 + 2/4) / 2 = 3/4
    # class 2 has no positive clip: no AP, and no AUC; left out of both averages.
    out = multilabel_scores(y, s)
    assert out["map"] == pytest.approx((5 / 6 + 3 / 4) / 2) and out["map_classes"] == 2
    # AUC: class 0 pairs (+,-): (0.9>0.5, 0.9>0.3, 0.4<0.5, 0.4>0.3) -> 3/4; class 1: (0.8 > 0.6, 0.8 > 0.2,
    # 0.1 < 0.6, 0.1 < 0.2) -> 2/4.
    assert out["auc"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    from scipy.stats import norm

    assert out["dprime"] == pytest.approx(math.sqrt(2) * norm.ppf(0.625))
    report = per_class_report(y, s >= 0.5, ["a", "b", "c"], scores=s)
    assert report["average_precision"] == [pytest.approx(5 / 6), pytest.approx(3 / 4), None]
    assert report["support"] == [2, 2, 0] and "confusion" not in report
    assert report["precision"][1] == pytest.approx(1 / 2) and report["recall"][0] == pytest.approx(1 / 2)


def test_task_loss_outputs_and_predictions():
    logits = torch.tensor([[2.0, -1.0, 0.0], [-3.0, 0.5, 1.0]])
    target = torch.tensor([[True, False, True], [False, False, True]])
    task = Task(multilabel=True)
    p = torch.sigmoid(logits)
    manual = -(target * p.log() + (~target) * (1 - p).log()).mean()
    assert task.loss(logits, target).item() == pytest.approx(manual.item(), rel=1e-6)
    assert torch.allclose(task.outputs(logits), p)
    assert (task.predicted(p.numpy()) == (p >= 0.5).numpy()).all()
    single = Task()
    assert torch.equal(single.outputs(logits), logits) and (single.predicted(logits.numpy()) == [0, 2]).all()
    assert single.loss(logits, torch.tensor([0, 2])).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([0, 2])).item())
    # the per-epoch headline is the final score's, without AUC and d'
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)
    s = np.array([[0.9, 0.2, 0.6], [0.4, 0.3, 0.1], [0.3, 0.8, 0.2], [0.5, 0.1, 0.3]])
    assert task.headline(s, y) == task.score(s, y)["map"] == pytest.approx((3 / 4 + 1 + 1) / 3)  # class 0: positives ranked 1st and 4th
    assert single.headline(logits, torch.tensor([0, 1])) == single.score(logits, torch.tensor([0, 1]))["acc"] == 0.5


def test_multilabel_knn_votes_are_the_weighted_share_of_neighbours():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(30, 8, generator=g), torch.randn(5, 8, generator=g)
    labels = torch.rand(30, 4, generator=g) > 0.6
    got = knn_scores(train, labels, test, 4, k=7, temperature=0.1)
    sim = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    for i in range(5):  # the direct formula, one test row at a time
        top, idx = sim[i].topk(7)
        w = (top / 0.1).exp()
        assert torch.allclose(got[i], (w[:, None] * labels[idx].float()).sum(0) / w.sum(), atol=1e-5)
    assert bool(((got >= 0) & (got <= 1)).all())


def test_choose_k_matches_searching_every_k_separately():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(60, 6, generator=g)
    y = torch.randint(0, 3, (60,), generator=g)
    groups = np.repeat(np.arange(3), 20)
    best, acc = choose_k(z, y, groups, 3, candidates=(1, 3, 9, 27))
    for k in (1, 3, 9, 27):  # leave-one-fold-out accuracy, pooled over the held-out clips
        hits = 0
        for f in range(3):
            held = torch.from_numpy(groups == f)
            hits += int((knn_scores(z[~held], y[~held], z[held], 3, k).argmax(1) == y[held]).sum())
        assert acc[k] == pytest.approx(hits / 60)
    assert acc[best] == max(acc.values()) and best == min(k for k in acc if acc[k] == acc[best])


def test_late_fusion_of_a_multilabel_set_averages_sigmoids():
    logits = torch.tensor([[0.0, 2.0], [2.0, -2.0], [1.0, 1.0]])
    fused = fuse_posteriors(logits, torch.tensor([0, 0, 1]), 2, multilabel=True)
    s = torch.sigmoid(logits)
    assert torch.allclose(fused, torch.stack([(s[0] + s[1]) / 2, s[2]]))


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("fsd")
    make_fsd50k_learnable(base / "raw")
    proc = run_process("extract", "--dataset", "fsd50k", "--root", str(base / "raw"), "--store",
                       str(base / "features"), "--set", "clip_seconds=1", "--set", "frames=100", "--workers", "1",
                       "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return base


def _chance_map(y: np.ndarray) -> float:
    """The mAP of scores that know nothing: each class's AP is its prevalence."""
    return float(y.mean(axis=0)[y.any(axis=0)].mean())


def test_finetune_on_a_multilabel_set_learns_and_selects_on_val(chain):
    store, runs = str(chain / "features"), str(chain / "runs")
    proc = run_cli("finetune", "--dataset", "fsd50k", "--store", store, "--runs", runs, "--epochs", "5",
                   "--lr", "3e-3", "--name", "ml", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "mAP over 1 fold(s)" in proc.stdout and "validation split selects" in proc.stdout
    run = chain / "runs" / "finetune" / "ml"
    records = Run(run).metrics()
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4, 5] and {r["fold"] for r in epochs} == {"eval"}
    done = next(r for r in records if r["event"] == "fold_done")
    val = [r["val_map"] for r in epochs]
    chosen = int(np.argmax(val))  # the earliest best val epoch selects the reported test score
    assert done["selected_epoch"] == chosen + 1 and done["selected_map"] == epochs[chosen]["test_map"]
    assert done["last_map"] == epochs[-1]["test_map"] and done["best_map"] == max(r["test_map"] for r in epochs)
    saved = np.load(run / "predictions" / "fold-eval.npz")
    y, scores = saved["y_true"], saved["scores"]
    assert y.dtype == bool and y.shape == (24, 4) and scores.shape == (24, 4)
    assert (saved["y_pred"] == (scores >= 0.5)).all()
    assert done["last_map"] == pytest.approx(multilabel_scores(y, scores)["map"])
    assert done["last_map"] > _chance_map(y) + 0.3  # chance is ~0.4 here: a wide margin
    report = json.loads((run / "per_class.json").read_text())
    assert report["multilabel"] and len(report["average_precision"]) == 4 and "confusion" not in report
    summary = (run / "summary.md").read_text()
    assert "val-selected mAP" in summary and "| eval |" in summary


def test_evaluate_compare_and_report_on_a_multilabel_set(chain):
    store, runs = str(chain / "features"), str(chain / "runs")
    proc = run_cli("pretrain", "--method", "npid", "--datasets", "fsd50k", "--store", store, "--runs", runs,
                   "--epochs", "1", "--batch-size", "16", "--name", "np", *TINY)
    assert proc.returncode == 0, proc.stderr
    # Monitoring on a multi-label pool: kNN mAP on FSD50K's val split, voted by its train split.
    assert "kNN mAP" in proc.stdout and "on fsd50k val split (monitoring only)" in proc.stdout
    epoch = next(r for r in Run(chain / "runs" / "pretrain" / "np").metrics() if r["event"] == "epoch")
    assert 0 < epoch["knn_map"] <= 1 and epoch["knn_fold"] == "val split" and "knn_acc" not in epoch
    for mode in ("knn", "linear"):
        proc = run_cli("evaluate", "--run", "npid", "--dataset", "fsd50k", "--store", store, "--runs", runs,
                       "--mode", mode, "--name", mode)
        assert proc.returncode == 0, proc.stderr
        assert f"{mode} mAP over 1 fold(s)" in proc.stdout
        run = chain / "runs" / "evaluate" / mode
        saved = np.load(run / "predictions" / "fold-eval.npz")
        summary = Run(run).summary()
        assert summary["metric"] == "map" and summary["encoder_unchanged"]
        assert summary["map_mean"] == pytest.approx(multilabel_scores(saved["y_true"], saved["scores"])["map"])
        assert summary["map_mean"] > _chance_map(saved["y_true"]) + 0.2
        assert bool(((saved["scores"] >= 0) & (saved["scores"] <= 1)).all())  # shares of neighbours, sigmoids
    proc = run_process("compare", f"{runs}/evaluate/knn", f"{runs}/evaluate/linear")
    assert proc.returncode == 0, proc.stderr
    assert "score % (mean ± std)" in proc.stdout and proc.stdout.count("mAP ") == 2
    proc = run_cli("report", f"{runs}/evaluate/knn", f"{runs}/pretrain/np", "--out", str(chain / "report"))
    assert proc.returncode == 0, proc.stderr
    text = (chain / "report" / "report.md").read_text()
    assert "## Results (%)" in text and "| npid kNN | mAP " in text and "| AP |" in text
    assert "t-SNE skipped: a t-SNE is coloured by one class per clip" in text and "confusion" not in text
    assert (chain / "report" / "figures" / "loss-pretrain.png").is_file() and "weighted-kNN score" in text
