"""`audiofx report`: one markdown report with figures from several run folders, in the form
of the papers' tables and figures.

- an accuracy table: rows are inits (fine-tuning) or methods (frozen kNN / linear), columns
  are datasets, cells are mean ± std over test folds in percent with the fold count (mAP,
  named in the cell, for multi-label sets);
- accuracy-vs-epoch curves with a band of ±1 std across folds (Lin 2022, Figures 3.3-3.8);
- training-loss curves of fine-tuning and pretraining (Shin 2021, Figure 6);
- per run: a confusion matrix, a per-class precision / recall / F1 table (Lin, Table 3.3)
  and a t-SNE of the encoder's embeddings of one test fold (Shin, Figure 7; Lin, Figure 3.5);
  multi-label runs get the per-class table with each class's AP, and neither of the figures
  that need one class per clip.

Everything but the t-SNE comes from what the runs wrote (metrics.jsonl, per_class.json,
predictions/); the t-SNE needs the run's checkpoint and its features from the store, and is
skipped, with a line saying why, when either is gone.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audiofx.errors import AudiofxError, ConfigError
from audiofx.pipeline.location import Location, is_remote
from audiofx.training.data.featuresets import FoldSet, fold_order
from audiofx.training.data.memory import load_in_memory
from audiofx.training.data.statistics import channel_stats
from audiofx.training.models.encoders import Classifier, LogmelGrid, build_encoder
from audiofx.training.report import plots
from audiofx.training.runtime.device import autocast, pick_device
from audiofx.training.stages.embedding import EMBED_BATCH, embed, recompute_batchnorm
from audiofx.training.stages.fusion import fuse_posteriors, mean_per_clip, zhou_samples
from audiofx.training.stages.metrics import per_class_markdown
from audiofx.training.stages.runs import STAGES, Headline, Run, headline
from audiofx.training.stages.weights import LOGMEL, RANDOM, SSL_METHODS, Init, random_encoder_file, resolve_init

TSNE_MAX_CLIPS = 2000  # t-SNE is O(n log n) but slow in absolute terms; larger folds are subsampled
MODE_NAMES = {"knn": "kNN", "linear": "linear"}


@dataclass
class RunData:
    """A run folder as the report sees it."""

    path: Path
    stage: str
    config: dict[str, Any]
    records: list[dict[str, Any]]
    label: str = ""  # the row of the accuracy table
    slug: str = ""  # unique file-name part for its figures
    per_class: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def summary(self) -> dict[str, Any] | None:
        return next((r for r in reversed(self.records) if r.get("event") == "summary"), None)

    @property
    def dataset(self) -> str:
        if self.stage == "pretrain":
            return ", ".join(self.config.get("pool") or self.config.get("datasets") or [])
        return self.config["dataset"]

    def headline(self) -> Headline:
        """The headline score (accuracy, or mAP for multi-label sets): last epoch for fine-tuning."""
        return headline(self.summary)

    @property
    def multilabel(self) -> bool:
        return self.stage != "pretrain" and self.headline().metric == "map"


# -- reading runs ----------------------------------------------------------------------------

def load_run(path: Path) -> RunData:
    path = Path(path)
    hint = "pass run folders such as data/runs/finetune/<name> or data/runs/evaluate/<name>"
    if not path.exists():
        raise ConfigError(f"run {path} does not exist", hint)
    if not path.is_dir() or not (path / "config.json").is_file():
        why = "it is a file" if not path.is_dir() else "it has no config.json"
        raise ConfigError(f"{path} is not a run folder ({why})", hint)
    per_class = path / "per_class.json"
    try:
        config = json.loads((path / "config.json").read_text())
        records = Run(path).metrics()
        per_class_report = json.loads(per_class.read_text()) if per_class.is_file() else None
    except ValueError as err:
        raise ConfigError(f"run {path} has a damaged config.json, metrics.jsonl or per_class.json ({err})",
                          hint) from None
    stage = config.get("stage") or path.parent.name
    if stage not in STAGES:
        raise ConfigError(f"{path} is not a run folder (unknown stage {stage!r})", hint)
    data = RunData(path, stage, config, records)
    if stage in ("finetune", "evaluate") and data.summary is None:
        raise ConfigError(f"run {path} has no summary yet", "let the run finish (or --resume it), or leave it out")
    if stage == "pretrain" and not any(r.get("event") == "epoch" for r in records):
        raise ConfigError(f"pretrain run {path} has no epoch logged yet", "let it train, or leave it out")
    if per_class_report is not None:
        data.per_class = per_class_report
    data.label = row_label(data)
    return data


def pretrain_dir(run: RunData) -> Path | None:
    """The pretrain run (or checkpoint file) an evaluate run used: its recorded source, or a
    run of that name beside it when the runs root was moved or given as a relative path."""
    if run.config.get("run") == RANDOM:  # evaluate's baseline keeps its random encoder
        own = random_encoder_file(run.path)
        return own if own.is_file() else None
    source = Path(run.config.get("source", ""))
    if source.exists() and str(source) not in ("", "."):
        return source
    beside = run.path.parents[1] / "pretrain" / source.name
    return beside if source.name and beside.exists() else None


def _method_of(run: RunData) -> str:
    if run.config.get("run") == RANDOM:
        return "random init"
    if run.config.get("run") == LOGMEL:
        return "log-mel inputs"
    source = pretrain_dir(run)
    if source is not None and (source / "config.json").is_file():
        return json.loads((source / "config.json").read_text()).get("method", source.name)
    spec = str(run.config.get("run", ""))
    return spec.split(":")[0] if spec.split(":")[0] in SSL_METHODS else Path(spec or run.config.get("source", "?")).stem


def row_label(run: RunData) -> str:
    """The row of the accuracy table: 'scratch', 'imagenet', 'npid (fine-tuned)', 'npid kNN'."""
    cfg = run.config
    if run.stage == "finetune":
        init = str(cfg.get("init", "?"))
        if init in ("scratch", "imagenet"):
            return init
        method = init.split(":")[0]
        return f"{method if method in SSL_METHODS else Path(init).stem} (fine-tuned)"
    if run.stage == "evaluate":
        return f"{_method_of(run)} {MODE_NAMES.get(cfg.get('mode'), cfg.get('mode'))}"
    return str(cfg.get("method", "?"))


def _disambiguate(runs: list[RunData]) -> None:
    """Two runs with one row label on one dataset (two scratch runs of different archs) get
    their run names appended, so no table cell holds two results."""
    seen: dict[tuple[str, str], int] = {}
    for r in runs:
        if r.stage != "pretrain":
            seen[(r.label, r.dataset)] = seen.get((r.label, r.dataset), 0) + 1
    clash = {label for (label, _), n in seen.items() if n > 1}
    for r in runs:
        if r.label in clash and r.stage != "pretrain":
            r.label = f"{r.label} [{r.name}]"
    used: set[str] = set()
    for r in runs:
        base = _safe(f"{r.stage}-{r.name}")
        slug, i = base, 2
        while slug in used:
            slug, i = f"{base}-{i}", i + 1
        used.add(slug)
        r.slug = slug


# -- tables ----------------------------------------------------------------------------------

def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def accuracy_table(runs: list[RunData]) -> list[str]:
    """Markdown rows: init/method x dataset, mean ± std (folds) of the headline score;
    a score other than accuracy (mAP of a multi-label set) is named in its cell."""
    scored = [r for r in runs if r.stage in ("finetune", "evaluate")]
    datasets = _ordered(r.dataset for r in scored)
    labels = _ordered(r.label for r in scored)
    cells = {}
    for r in scored:
        h = r.headline()
        name = "" if h.metric == "acc" else f"{h.metric_name} "
        cells[(r.label, r.dataset)] = f"{name}{h.text()} ({h.folds})"
    lines = ["| init / method | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    lines += [f"| {label} | " + " | ".join(cells.get((label, d), "–") for d in datasets) + " |" for label in labels]
    return lines


def runs_table(runs: list[RunData]) -> list[str]:
    lines = ["| run | stage | dataset | init / method | arch | epochs | features | folder |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        cfg = r.config
        if r.stage == "pretrain":
            what, key = cfg.get("method", "?"), ", ".join((cfg.get("pool") or {}).values())
            epochs = cfg.get("epochs", "")
        elif r.stage == "finetune":
            what, key, epochs = str(cfg.get("init", "?")), cfg.get("key", ""), cfg.get("epochs", "")
            source = Path(str(cfg.get("init_source", what)))
            if what not in ("scratch", "imagenet") and source.name != what:
                what = f"{what} ({source.name})"  # which pretrain run or file
        else:
            source = pretrain_dir(r) or Path(str(cfg.get("source", "?")))
            method = _method_of(r)
            what = f"{MODE_NAMES.get(cfg.get('mode'), cfg.get('mode'))} of {method}"
            what += f" ({source.name})" if source.name != method and cfg.get("run") not in (RANDOM, LOGMEL) else ""
            key = cfg.get("key", "")
            epochs = cfg.get("linear_epochs", "") if cfg.get("mode") == "linear" else "–"
        lines.append(f"| {r.name} | {r.stage} | {r.dataset} | {what} | {cfg.get('arch', '?')} | {epochs} | {key} | "
                     f"`{r.path}` |")
    return lines


# -- curves ----------------------------------------------------------------------------------

def per_epoch(records: list[dict[str, Any]], metric: str, label: str) -> plots.Curve | None:
    """Mean and std (ddof=1) over folds of a per-epoch metric of a fine-tune run (or the one
    series of a pretrain run). A resumed run's repeated epoch keeps its last record."""
    by_fold: dict[str, dict[int, float]] = {}
    for r in records:
        if r.get("event") == "epoch" and r.get(metric) is not None:
            by_fold.setdefault(str(r.get("fold", "")), {})[int(r["epoch"])] = float(r[metric])
    if not by_fold:
        return None
    epochs = sorted({e for f in by_fold.values() for e in f})
    values = [[f[e] for f in by_fold.values() if e in f] for e in epochs]
    mean = np.array([np.mean(v) for v in values])
    std = np.array([np.std(v, ddof=1) if len(v) > 1 else np.nan for v in values])
    folds = len(by_fold)
    if any("fold" in r for r in records):  # fine-tuning: say over how many folds
        label = f"{label} ({folds} fold{'s' if folds != 1 else ''})"
    return plots.Curve(label, np.array(epochs), mean, std if folds > 1 else None)


# -- t-SNE -----------------------------------------------------------------------------------

class Skip(Exception):
    """Why a run gets no t-SNE (shown in the report instead of the figure)."""


def _load_fold(run: RunData, fold: str, store: str | None, device):
    store = store or run.config.get("store", "data/features")
    if not is_remote(store) and not Location(store).path.exists():
        raise Skip(f"its feature store {store} does not exist (pass --store to read the features from another copy)")
    try:
        return load_in_memory(FoldSet(store, run.config["dataset"], run.config["key"], [fold]), device=device)
    except (AudiofxError, OSError, KeyError) as err:
        why = err.message if isinstance(err, AudiofxError) else f"{type(err).__name__}: {err}"
        raise Skip(f"its features (fold {fold} of {run.config['dataset']}/{run.config['key']}) could not be read from "
                   f"store {store}: {why} (pass --store to read them from another copy)") from None


def tsne_inputs(run: RunData, store: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], str]:
    """(embeddings, y_true, y_pred, classes, fold) of the first test fold of a run, one row
    per clip: the fine-tuned encoder of that fold, or the evaluated pretrained encoder.
    Predictions are the saved ones; a fine-tune run that saved none for the fold's clips gets
    its model's own."""
    if run.multilabel:
        raise Skip("a t-SNE is coloured by one class per clip, and clips of a multi-label set have several")
    handle = Run(run.path)
    predictions = handle.predictions()
    device = pick_device("auto")
    if run.stage == "finetune":
        folds = sorted((p.stem.removeprefix("fold-") for p in (run.path / "checkpoints").glob("fold-*.pt")), key=fold_order)
        if not folds:
            raise Skip("the run has no fold checkpoint (checkpoints/fold-<k>.pt)")
        fold = next((f for f in folds if f in predictions), folds[0])
        data = _load_fold(run, fold, store, device)
        y_pred = _saved_labels(predictions.get(fold), data.clips)
        z, own = _finetuned_embeddings(run, handle.load_checkpoint(f"fold-{fold}"), data, device)
        y_pred = own if y_pred is None else y_pred
    else:
        if not predictions:
            raise Skip("the run saved no predictions (predictions/fold-<k>.npz)")
        fold = sorted(predictions, key=fold_order)[0]
        if run.config.get("run") == LOGMEL:  # no network: the inputs pooled, as evaluate scored them
            encoder, input_stats = LogmelGrid(), None
        else:
            init = _evaluated_init(run)
            encoder, input_stats = init.build(), init.input_stats
        encoder = encoder.to(device)
        encoder.input_channel = run.config.get("input_channel_index")
        data = _load_fold(run, fold, store, device)
        y_pred = _saved_labels(predictions[fold], data.clips)
        if y_pred is None:
            raise Skip(f"the saved predictions of fold {fold} do not match the clips in the store")
        stats = input_stats if input_stats and input_stats[0].shape[1] == data.x.shape[1] else None
        mean, std = stats or channel_stats(data.x)  # evaluate's own choice
        if run.config.get("bn_stats") == "clips" and run.config.get("run") != RANDOM:
            # as evaluate did (on this fold's clips; the random encoder was kept with its statistics)
            recompute_batchnorm(encoder, (data.x[i:i + EMBED_BATCH] for i in range(0, len(data.x), EMBED_BATCH)),
                                mean.to(device), std.to(device), device)
        z = embed(encoder, data.x, mean.to(device), std.to(device), device)
    return z.float().cpu().numpy(), data.y.cpu().numpy(), y_pred, data.classes, fold


def _evaluated_init(run: RunData) -> Init:
    """The pretrained (or kept random) encoder an evaluate run scored, or Skip saying why not."""
    source = pretrain_dir(run)
    if source is None:
        raise Skip(f"its pretrained encoder {run.config.get('source')} is gone")
    ckpt_path = source / "checkpoints" / "final.pt" if source.is_dir() else source
    if not ckpt_path.is_file():
        raise Skip(f"its pretrained encoder has no checkpoint {ckpt_path}")
    return resolve_init(str(ckpt_path), run.config.get("arch"))


def _saved_labels(saved: dict[str, np.ndarray] | None, clips: list[str]) -> np.ndarray | None:
    """The saved predicted class of every clip, in ``clips``' order; None when a clip has none."""
    if saved is None:
        return None
    by_clip = dict(zip(saved["clip"].tolist(), saved["y_pred"].tolist()))
    return np.array([by_clip[c] for c in clips]) if all(c in by_clip for c in clips) else None


def _finetuned_embeddings(run: RunData, ckpt: dict[str, Any], data, device):
    """Encoder embeddings of a fold's clips with the fold's fine-tuned model (a Classifier,
    rebuilt from the checkpoint's arch, the run's head and the set's class count), fed as
    fine-tuning fed it, and the model's own predicted classes, from one pass. Runs with Zhou
    et al.'s fragments or channel fusion embed every sample and average the embeddings of
    each clip, as their predictions average the samples' posteriors."""
    cfg, states = run.config, ckpt["states"]
    encoder = build_encoder(ckpt["meta"].get("arch") or cfg["arch"])
    encoder.input_channel = cfg.get("input_channel_index")
    model = Classifier(encoder, len(data.classes), head=cfg.get("head", "linear"))
    model.load_state_dict(states["model"])
    model.to(device).eval()
    mean, std = states["mean"].to(device), states["std"].to(device)
    fragments, fusion = int(cfg.get("fragments", 1)), bool(cfg.get("channel_fusion", False))
    samples, clip_index = data, None
    if fragments > 1 or fusion:
        samples, clip_index, (mean, std), _ = zhou_samples(data, fragments, fusion, stats=(mean, std))
        mean, std = mean.to(device), std.to(device)
    zs, logits = [], []
    with torch.no_grad():
        for i in range(0, samples.x.shape[0], 128):
            with autocast(device):
                fmap = model.encoder.features((samples.x[i:i + 128].to(device).float() - mean) / std)
                z = model.encoder.pool(fmap).flatten(1)
                out = model.head(z) if model.head_kind == "linear" else model.head(fmap)
            zs.append(z.float())
            logits.append(out.float())
    z, out = torch.cat(zs), torch.cat(logits)
    if clip_index is None:
        return z, out.argmax(1).cpu().numpy()
    return mean_per_clip(z, clip_index, len(data)), fuse_posteriors(out, clip_index, len(data)).argmax(1).cpu().numpy()


def tsne_2d(z: np.ndarray, seed: int = 0) -> tuple[np.ndarray, float]:
    """2-D t-SNE of embeddings (cosine distance, as the kNN evaluation uses). Perplexity is
    30 or (n - 1) / 3 for small folds: sklearn needs it below the sample count, and a
    perplexity near n makes every point a neighbour of every other."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (len(z) - 1) / 3))
    xy = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed).fit_transform(z)
    return xy, perplexity


def tsne_section(run: RunData, store: str | None, figures: Path, say: Callable[[str], None]) -> list[str]:
    try:
        z, y_true, y_pred, classes, fold = tsne_inputs(run, store)
    except Skip as why:
        say(f"t-SNE of {run.name} skipped: {why}")
        return [f"t-SNE skipped: {why}."]
    n_all = len(z)
    if n_all < 5:
        return [f"t-SNE skipped: test fold {fold} has only {n_all} clips."]
    keep = np.arange(n_all)
    if n_all > TSNE_MAX_CLIPS:
        keep = np.sort(np.random.default_rng(0).choice(n_all, TSNE_MAX_CLIPS, replace=False))
    say(f"t-SNE of {run.name}: test fold {fold}, {len(keep)} clips")
    xy, perplexity = tsne_2d(z[keep])
    title = f"t-SNE of the encoder's embeddings: {run.label} on {run.dataset}, test fold {fold}"
    path = plots.tsne_figure(xy, y_true[keep], y_pred[keep], classes, title, figures / f"tsne-{run.slug}.png")
    sub = f" ({len(keep)} of {n_all} clips drawn at random)" if len(keep) < n_all else f" ({n_all} clips)"
    return [f"![t-SNE of {run.name}]({path.parent.name}/{path.name})", "",
            f"t-SNE (cosine distance, perplexity {perplexity:.0f}) of the encoder's embeddings of test fold {fold}{sub}, "
            "coloured by true class (left) and by predicted class (right; crosses are misclassified)."
            + (" Each clip's embedding is the mean of its samples' (fragments / channels), as its prediction fuses them."
               if int(run.config.get("fragments", 1)) > 1 or run.config.get("channel_fusion") else "")]


# -- the report ------------------------------------------------------------------------------

def build_report(runs: list[Path], out: Path, store: str | None = None, tsne: bool = True,
                 say: Callable[[str], None] | None = None) -> Path:
    """Write out/report.md and its figures (out/figures/*.png) from run folders; returns the
    markdown's path. ``store`` overrides the store recorded in the runs (for the t-SNE)."""
    say = say or (lambda message: None)
    if not runs:
        raise ConfigError("no runs to report on", "pass one or more run folders")
    unique = {Path(p).resolve(): Path(p) for p in runs}  # a run named twice is reported once
    data = [load_run(p) for p in unique.values()]
    _disambiguate(data)
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for stale in figures.glob("*.png"):  # figures of an earlier report into the same folder
        stale.unlink()

    def img(path: Path, alt: str) -> str:
        return f"![{alt}]({path.relative_to(out).as_posix()})"

    scored = [r for r in data if r.stage in ("finetune", "evaluate")]
    finetunes = [r for r in data if r.stage == "finetune"]
    pretrains = [r for r in data if r.stage == "pretrain"]
    # Runs with a test score per epoch: fine-tuning, and linear probes (kNN has no epochs;
    # probes evaluated before they logged epochs have none either).
    probes = [r for r in data if r.stage == "evaluate" and any(x.get("event") == "epoch" for x in r.records)]
    curved = finetunes + probes
    md = ["# audiofx report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from {len(data)} run(s).", "",
          "## Runs", "", *runs_table(data), ""]
    multilabel = any(r.multilabel for r in scored)
    what = "score" if multilabel else "accuracy"
    if scored:
        md += ["## Accuracy (%)" if not multilabel else "## Results (%)", "", *accuracy_table(scored), "",
               "Mean ± standard deviation over test folds (ddof=1; 0 for one fold), fold count in brackets. "
               f"Fine-tuning rows give the **last-epoch** {what} of each fold. The best-epoch {what} is not used: "
               "it is selected on the test fold and therefore optimistic (each run's summary.md lists it). kNN and "
               "linear rows evaluate a frozen pretrained encoder."
               + (" Multi-label sets are scored by mAP (macro mean average precision), named in their cells."
                  if multilabel else ""), ""]
    if curved:
        md += ["## Accuracy vs epoch" if not multilabel else "## Test score vs epoch", ""]
        for dataset in _ordered(r.dataset for r in curved):
            runs_of = [r for r in curved if r.dataset == dataset]
            h = runs_of[0].headline()
            curves = [c for r in runs_of if (c := per_epoch(r.records, f"test_{h.metric}", r.label))]
            if curves:
                path = plots.curves_figure(curves, f"test {h.metric_name} vs epoch on {dataset} (mean ± 1 std over folds)",
                                           f"test {h.metric_name} (%)", figures / f"accuracy-vs-epoch-{_safe(dataset)}.png",
                                           percent=True)
                md += [img(path, f"{h.metric_name} vs epoch on {dataset}"), ""]
        md += [f"Mean test {what} over folds after each epoch; the band is ±1 standard deviation across folds."
               + (" Linear rows: the linear probe on the frozen encoder, after each of its epochs." if probes else ""),
               ""]
    if finetunes or pretrains:
        md += ["## Training loss", ""]
        if finetunes:
            curves = [c for r in finetunes if (c := per_epoch(r.records, "train_loss", f"{r.label} on {r.dataset}"))]
            if curves:
                path = plots.curves_figure(curves, "fine-tuning training loss (mean ± 1 std over folds)",
                                           "cross-entropy loss" + (" (binary for multi-label sets)" if multilabel else ""),
                                           figures / "loss-finetune.png")
                md += [img(path, "fine-tuning loss"), ""]
        if pretrains:
            losses = [c for r in pretrains if (c := per_epoch(r.records, "loss", _pretrain_label(r)))]
            knn = [c for r in pretrains for key in ("knn_acc", "knn_map")
                   if (c := per_epoch(r.records, key, _pretrain_label(r, knn=True)))]
            path = plots.pretrain_figure(losses, knn, figures / "loss-pretrain.png")
            md += [img(path, "pretraining loss"), "",
                   "Pretraining loss per epoch" + (" and the weighted-kNN score (accuracy; mAP for a multi-label set) "
                                                   "on a held-out split of a labelled dataset of the pool, logged for "
                                                   "monitoring only (nothing is selected with it)." if knn else "."), ""]
    for r in scored:
        md += [f"## {r.label} on {r.dataset} (`{r.stage}/{r.name}`)", ""]
        h = r.headline()
        n = h.folds
        md += [f"{'Accuracy' if h.metric == 'acc' else h.metric_name} {h.text()}% over {n} fold(s)"
               + (" (last epoch)." if r.stage == "finetune" else "."), ""]
        pooled = "last-epoch predictions" if r.stage == "finetune" else "predictions"
        if r.per_class and "confusion" not in r.per_class:  # multi-label: no confusion matrix
            score = "sigmoid posterior" if r.stage == "finetune" or r.config.get("mode") == "linear" else \
                "weighted share of neighbours carrying it"
            md += [f"Per-class scores of the {pooled} pooled over the test folds: a class is predicted when its {score} "
                   "is at least 0.5, and its AP ranks all clips by that score.", "", *per_class_markdown(r.per_class), ""]
        elif r.per_class:
            path = plots.confusion_figure(np.array(r.per_class["confusion"]), r.per_class["classes"],
                                          f"{r.label} on {r.dataset}: confusion matrix ({pooled} of {n} test "
                                          f"fold{'s' if n != 1 else ''})",
                                          figures / f"confusion-{r.slug}.png")
            md += [img(path, f"confusion matrix of {r.name}"), "",
                   f"Confusion matrix of the {pooled} pooled over the test folds (rows: true class; colours normalised "
                   "per row).", "", *per_class_markdown(r.per_class), ""]
        else:
            md += ["No per_class.json in this run (made before per-class reports): no confusion matrix or per-class "
                   "table.", ""]
        if tsne:
            md += [*tsne_section(r, store, figures, say), ""]
    path = out / "report.md"
    path.write_text("\n".join(md).rstrip() + "\n")
    return path


def _pretrain_label(run: RunData, knn: bool = False) -> str:
    """'npid on demo', plus the run name when it is not just the method, and for the
    monitoring curve the dataset whose first fold it measures."""
    text = f"{run.label} on {run.dataset}" + (f" [{run.name}]" if run.name != run.label else "")
    record = next((r for r in run.records if r.get("knn_dataset")), None)
    if not (knn and record):
        return text
    name = "mAP" if "knn_map" in record else "accuracy"
    return f"{text}: kNN {name} on {record['knn_dataset']} {record.get('knn_fold', '(first fold)')}"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)
