"""`audiofx report` on small real runs of the synthetic demo set: one NPID pretraining, a
scratch fine-tune over 5 folds, an NPID fine-tune of one fold and a weighted-kNN evaluation,
trained in-process with the tiny CNN; the report itself runs through the real CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from audiofx.pipeline.extract import ExtractRequest, extract
from audiofx.training.report.build import build_report, load_run, per_epoch, tsne_inputs
from audiofx.training.stages.evaluate import EvaluateConfig, evaluate
from audiofx.training.stages.finetune import FinetuneConfig, finetune
from audiofx.training.stages.pretrain import PretrainConfig, pretrain
from audiofx.training.stages.runs import Run
from tests.conftest import assert_one_line_error, run_cli, run_process

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
quiet = dict(say=lambda *a, **k: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("report")
    store, root = str(base / "features"), str(base / "runs")
    # 1 s clips of 50 frames: half the work of the demo's defaults, same 5 classes and folds
    extract(ExtractRequest(dataset="demo", root=base / "raw", store=store, overrides={"clip_seconds": 1.0, "frames": 50},
                           workers=1, progress=False), on_event=lambda m: None)
    common = dict(store=store, runs_root=root, progress=False)
    pretrain(PretrainConfig(method="npid", datasets=("demo",), arch="tiny", epochs=2, batch_size=32, name="npid",
                            **common), **quiet)
    finetune(FinetuneConfig(dataset="demo", init="scratch", arch="tiny", epochs=2, lr=3e-3, name="scratch", **common),
             **quiet)
    finetune(FinetuneConfig(dataset="demo", init="npid", fold="2", epochs=2, lr=3e-3, name="npid-ft", **common), **quiet)
    evaluate(EvaluateConfig(run="npid", dataset="demo", mode="knn", store=store, runs_root=root, name="npid-knn"),
             **quiet)
    paths = {"pretrain": base / "runs/pretrain/npid", "scratch": base / "runs/finetune/scratch",
             "npid-ft": base / "runs/finetune/npid-ft", "knn": base / "runs/evaluate/npid-knn"}
    return {**paths, "store": Path(store), "base": base}


@pytest.fixture(scope="module")
def report(runs) -> Path:
    out = runs["base"] / "report"
    proc = run_cli("report", *(str(runs[k]) for k in ("pretrain", "scratch", "npid-ft", "knn")), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"{out / 'report.md'}" in proc.stdout
    return out / "report.md"


def records(run: Path) -> list[dict]:
    return Run(run).metrics()


def summary(run: Path) -> dict:
    return Run(run).summary()


def section(text: str, heading_start: str) -> str:
    """The markdown from the heading that starts with `heading_start` to the next heading."""
    start = next(i for i, line in enumerate(text.splitlines()) if line.startswith(heading_start))
    lines = text.splitlines()[start + 1:]
    end = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
    return "\n".join(lines[:end])


def table_rows(text: str) -> dict[str, list[str]]:
    """First cell -> the other cells of every markdown table row."""
    out = {}
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            out[cells[0]] = cells[1:]
    return out


def test_every_figure_is_a_real_png_of_sensible_size_and_embedded(report):
    from PIL import Image

    out = report.parent
    text = report.read_text()
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    files = sorted(p.relative_to(out).as_posix() for p in (out / "figures").glob("*.png"))
    assert sorted(embedded) == files  # every figure embedded by a relative path, nothing dangling
    names = {Path(f).stem for f in files}
    assert names == {"accuracy-vs-epoch-demo", "loss-finetune", "loss-pretrain",
                     "confusion-finetune-scratch", "confusion-finetune-npid-ft", "confusion-evaluate-npid-knn",
                     "tsne-finetune-scratch", "tsne-finetune-npid-ft", "tsne-evaluate-npid-knn"}
    for name in files:
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        with Image.open(path) as im:
            width, height = im.size
            pixels = np.asarray(im.convert("L"), dtype=float)
        assert 500 <= width <= 3000 and 350 <= height <= 3000, (name, im.size)
        assert pixels.std() > 10, name  # something is drawn, not a blank canvas


def test_accuracy_table_equals_the_runs_summaries(runs, report):
    rows = table_rows(section(report.read_text(), "## Accuracy (%)"))
    assert rows["init / method"] == ["demo"]
    expected = {"scratch": (runs["scratch"], "last_acc"), "npid (fine-tuned)": (runs["npid-ft"], "last_acc"),
                "npid kNN": (runs["knn"], "acc")}
    assert set(rows) == {"init / method", *expected}
    for label, (run, metric) in expected.items():
        s = summary(run)
        match = re.fullmatch(r"([\d.]+) ± ([\d.]+) \((\d+)\)", rows[label][0])
        assert match, rows[label]
        assert float(match[1]) == round(100 * s[f"{metric}_mean"], 2)
        assert float(match[2]) == round(100 * s[f"{metric}_std"], 2)
        assert int(match[3]) == s["n_folds"]
    assert summary(runs["scratch"])["n_folds"] == 5 and summary(runs["npid-ft"])["n_folds"] == 1
    s = summary(runs["scratch"])  # here the best epoch (selected on the test fold) beats the last one
    assert round(s["best_acc_mean"], 4) != round(s["last_acc_mean"], 4)  # so the cell tells them apart
    assert f"{100 * s['best_acc_mean']:.2f}" not in rows["scratch"][0]
    assert "last-epoch" in report.read_text() and "best-epoch accuracy is not used" in report.read_text()


def test_per_class_tables_equal_per_class_json(runs, report):
    text = report.read_text()
    for key, heading in (("scratch", "## scratch on demo"), ("npid-ft", "## npid (fine-tuned) on demo"),
                         ("knn", "## npid kNN on demo")):
        expected = json.loads((runs[key] / "per_class.json").read_text())
        rows = table_rows(section(text, heading))
        for i, name in enumerate(expected["classes"]):
            p, r, f, support = rows[name]
            assert (float(p), float(r), float(f), int(support)) == (
                round(expected["precision"][i], 3), round(expected["recall"][i], 3), round(expected["f1"][i], 3),
                expected["support"][i])
        macro = rows["*macro average*"]
        assert float(macro[2]) == round(float(np.mean(expected["f1"])), 3)
        assert int(macro[3]) == np.array(expected["confusion"]).sum()


def test_accuracy_curve_is_the_mean_and_std_over_folds_per_epoch(runs):
    recs = records(runs["scratch"])
    curve = per_epoch(recs, "test_acc", "scratch")
    assert curve.label == "scratch (5 folds)" and list(curve.epochs) == [1, 2]
    for i, epoch in enumerate(curve.epochs):
        accs = [r["test_acc"] for r in recs if r["event"] == "epoch" and r["epoch"] == epoch]
        assert len(accs) == 5
        assert curve.mean[i] == pytest.approx(np.mean(accs)) and curve.std[i] == pytest.approx(np.std(accs, ddof=1))
    one = per_epoch(records(runs["npid-ft"]), "test_acc", "npid")
    assert one.label == "npid (1 fold)" and one.std is None  # no band from a single fold


def test_a_linear_probe_is_plotted_per_epoch_and_knn_is_not(runs, tmp_path):
    """A linear probe logs a test score per epoch, so its curve joins fine-tuning's; kNN has no
    epochs. Here the report has no fine-tuning run at all: the figure comes from the probe."""
    evaluate(EvaluateConfig(run="npid", dataset="demo", mode="linear", probe="sgd", linear_epochs=4, store=str(runs["store"]),
                            runs_root=str(runs["base"] / "runs"), name="npid-linear"), **quiet)
    probe = runs["base"] / "runs" / "evaluate" / "npid-linear"
    curve = per_epoch(records(probe), "test_acc", "npid linear")
    assert curve.label == "npid linear (5 folds)" and list(curve.epochs) == [1, 2, 3, 4]
    assert curve.mean[-1] == pytest.approx(summary(probe)["acc_mean"])  # the result is the last epoch's
    text = build_report([probe, runs["knn"]], tmp_path / "out", tsne=False).read_text()
    assert "![accuracy vs epoch on demo](figures/accuracy-vs-epoch-demo.png)" in text and "Linear rows" in text
    alone = build_report([runs["knn"]], tmp_path / "knn-only", tsne=False).read_text()
    assert "## Accuracy vs epoch" not in alone


def test_tsne_embeds_the_fold_with_the_fold_model_and_its_saved_predictions(runs):
    z, y_true, y_pred, classes, fold = tsne_inputs(load_run(runs["npid-ft"]), None)
    assert fold == "2" and z.shape == (40, 128) and len(classes) == 5
    saved = np.load(runs["npid-ft"] / "predictions" / "fold-2.npz")
    assert (y_true == saved["y_true"]).all() and (y_pred == saved["y_pred"]).all()
    # The embeddings are the fold model's own: its head maps them to the saved predictions.
    state = torch.load(runs["npid-ft"] / "checkpoints" / "fold-2.pt", weights_only=True)["states"]["model"]
    logits = torch.from_numpy(z) @ state["head.weight"].T + state["head.bias"]
    assert torch.allclose(logits, torch.from_numpy(saved["scores"]), atol=1e-4)
    z, y_true, y_pred, _, fold = tsne_inputs(load_run(runs["knn"]), None)  # the pretrained encoder's
    saved = np.load(runs["knn"] / "predictions" / "fold-1.npz")
    assert fold == "1" and z.shape == (40, 128) and (y_pred == saved["y_pred"]).all()


def test_without_the_store_tsne_is_skipped_with_a_note_and_out_defaults_to_data_reports(runs, report, tmp_path):
    assert report.read_text().count("![t-SNE") == 3
    gone = tmp_path / "moved-away"
    proc = run_cli("report", str(runs["scratch"]), str(runs["knn"]), "--store", str(gone), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    made = list((tmp_path / "data" / "reports").glob("*/report.md"))
    assert len(made) == 1
    text = made[0].read_text()
    assert "![t-SNE" not in text and not list(made[0].parent.glob("figures/tsne-*"))
    notes = [line for line in text.splitlines() if line.startswith("t-SNE skipped")]
    assert len(notes) == 2 and all(str(gone) in n for n in notes)
    assert len(list(made[0].parent.glob("figures/confusion-*.png"))) == 2  # the rest is still there
    proc = run_process("report", str(runs["scratch"]), "--no-tsne", "--out", str(tmp_path / "plain"))  # a real one
    assert proc.returncode == 0, proc.stderr
    assert "t-SNE" not in (tmp_path / "plain" / "report.md").read_text()


def test_a_bad_run_path_is_a_one_line_error_naming_it(runs, tmp_path):
    missing = tmp_path / "no-such-run"
    assert_one_line_error(run_cli("report", str(runs["scratch"]), str(missing), "--out", str(tmp_path / "r")),
                          str(missing), "does not exist")
    assert_one_line_error(run_cli("report", str(runs["base"] / "runs" / "finetune"), "--out", str(tmp_path / "r")),
                          str(runs["base"] / "runs" / "finetune"), "is not a run folder")
