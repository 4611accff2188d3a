"""Supervised fine-tuning with k-fold cross-validation on the official folds (Shin et al.
2021 after Palanisamy et al. 2020): for each test fold, train on the other folds and
evaluate on it after every epoch. The headline is the last-epoch score; the best-epoch
score is reported too, labelled as selected on the test fold (it is optimistic). A set with
an official validation split that neither trains nor tests (FSD50K's val, GTZAN's 70/15/15)
is scored every epoch as well, or ``val_split`` carves a stratified seeded share out of each
test fold's training folds; then the test score of the epoch the validation split selects is
reported beside them, per fold and at the epoch with the best validation score averaged over
folds (an honest form of Lin 2022's "best average validation accuracy", which selects on the
held-out folds themselves).

Single-label sets train with cross-entropy and are scored by accuracy; multi-label sets
(FSD50K) train with binary cross-entropy on independent sigmoids and are scored by mAP, with
ROC AUC and d' beside it (tasks.py, metrics.py).

Zhou et al. 2019's options (any dataset): ``fragments`` cuts every clip into N time
fragments and ``channel_fusion`` makes every channel its own sample; both train on the
samples as independent examples with the clip's label and, at test, average the posteriors
(softmax, or sigmoid for multi-label sets) of a clip's samples, so scores and saved
predictions are per clip. ``head`` picks the linear or the MLP-attention head
(models/encoders.py).

Data come through the one door from the store (``data.inputs``): the folds are held in
memory when their features fit the memory budget (``memory_budget_gb``; by default half the
free memory where the data would live), else the training folds of each test fold are
streamed from the store (shuffled by (seed, epoch) like the in-memory loader), with their
per-channel statistics from one sequential pass; the test fold and the validation split,
each a fraction of the set, are always in memory. The mode is recorded in config.json: it
changes the batch order, so two runs compare only within one mode.

``--resume --epochs N`` may extend a run to more epochs than it was started with: the step
decay does not depend on the total, so the result is the run N epochs would have given.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audiofx.errors import ConfigError
from audiofx.training.data.featuresets import (
    FoldSet,
    check_single_copy,
    check_usable,
    fold_order,
    input_channel,
    normal_set_options,
    resolve_featureset,
    split_folds,
    validation_fold,
)
from audiofx.training.data.inputs import open_inputs
from audiofx.training.data.memory import hold_out
from audiofx.training.data.mode import MODE_MEMORY
from audiofx.training.models.augment import Augment
from audiofx.training.models.encoders import HEADS, Classifier, check_input_size
from audiofx.training.runtime.device import autocast, prepare_model, seed_everything
from audiofx.training.runtime.distributed import Ranks, run_on_ranks, wrap
from audiofx.training.stages.embedding import embed
from audiofx.training.stages.epochs import optimiser_states, restore_optimiser_states, train_epoch
from audiofx.training.stages.fusion import fuse_posteriors, zhou_samples
from audiofx.training.stages.metrics import mean_std
from audiofx.training.stages.runs import (Run, TrainingOptions, check_minimum, check_rates, default_name, open_run,
                                         recorded_config)
from audiofx.training.stages.tasks import METRIC_NAMES, Task
from audiofx.training.stages.weights import resolve_init


@dataclass
class FinetuneConfig(TrainingOptions):
    dataset: str
    init: str = "scratch"
    key: str | None = None
    set_options: dict[str, Any] = field(default_factory=dict)  # --set: the stored set extract made with these
    arch: str | None = None  # default resnet50, or the pretrain run's arch
    weights: str | None = None  # the file of a named init (imagenet, imagenet-simclr, imagenet-moco)
    init_branch: str = "auto"  # a checkpoint's online or momentum network (models/checkpoints.py)
    fold: str = "all"
    epochs: int = 70
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-3
    lr_step: int = 30  # step decay x gamma every lr_step epochs
    lr_gamma: float = 0.1
    augment: Augment = field(default_factory=Augment)
    fragments: int = 1  # Zhou et al.: N time fragments per clip, posteriors averaged per clip
    channel_fusion: bool = False  # Zhou et al.: one sample per channel (left/right/mid), posteriors averaged
    head: str = "linear"  # linear (GAP + linear) or mlp-attn
    input_channel: str | None = None  # one stored channel (a source name or an index) as the input, repeated to 3
    val_split: float = 0.0  # a share of the training folds held out to select epochs on (sets without a val split)


@torch.no_grad()
def predict(model: torch.nn.Module, data, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
            batch_size: int = 64) -> torch.Tensor:
    """Logits of every sample of an in-memory set, in order."""
    return embed(model, data.x, mean, std, device, batch_size).cpu()


# The options added after the first runs, at the values runs started before them behaved as
# (no such key in their config.json): such a run may resume with them at these values.
_LATER_OPTIONS = {"fragments": 1, "channel_fusion": False, "head": "linear", "data_mode": MODE_MEMORY,
                  "init_branch": "auto", "set_options": {}, "input_channel": None, "input_channel_index": None,
                  "val_split": 0.0,
                  "augment": {"resized_crop": 0.0, "gain_db": 0.0, "eq_db": 0.0, "per_db": 1.0}}


def summarize(per_fold: dict[str, dict[str, float]], metric: str = "acc") -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; 0 for one fold) over folds of every score
    the folds report (last_*, best_*, and selected_* / val_* with a validation split)."""
    names = [k for k in next(iter(per_fold.values()), {}) if not k.endswith("_epoch")]
    return {"metric": metric, "folds": per_fold, "n_folds": len(per_fold), **mean_std(per_fold, names)}


def _check_counts(cfg: FinetuneConfig) -> None:
    """Refuse the counts that the CLI's ranges refuse, for callers of the stage that do not pass
    through it (recipes, scripts): 0 epochs would fail after the run folder is made, a negative
    mask count would act as 0 and be recorded as given. lr_step is a recipe's, without a flag."""
    a = cfg.augment
    for flag, value, minimum in (("--epochs", cfg.epochs, 1), ("--batch-size", cfg.batch_size, 1),
                                 ("lr_step", cfg.lr_step, 1), ("--time-masks", a.time_masks, 0),
                                 ("--freq-masks", a.freq_masks, 0), ("--time-shift", a.time_shift, 0),
                                 ("freq_shift", a.freq_shift, 0), ("time_width", a.time_width, 0),
                                 ("freq_width", a.freq_width, 0)):
        check_minimum(flag, value, minimum)


def finetune(cfg: FinetuneConfig, say=print) -> dict[str, Any]:
    return run_on_ranks(_finetune, dataclasses.replace(cfg, set_options=normal_set_options(cfg.set_options)), say)


def _finetune(cfg: FinetuneConfig, ranks: Ranks, device: torch.device, say) -> dict[str, Any]:
    key, manifest = resolve_featureset(cfg.store, cfg.dataset, cfg.preset, cfg.key, cfg.set_options)
    check_single_copy(manifest, cfg.dataset, "finetune")
    task = Task.of(manifest)
    # Checked here because the data load below may take minutes; the layers check again.
    if cfg.head not in HEADS:
        raise ConfigError(f"unknown head {cfg.head!r}", f"use one of {', '.join(HEADS)}")
    if cfg.fragments < 1:
        raise ConfigError(f"--fragments must be at least 1, got {cfg.fragments}", "pass 1 (whole clips) or more")
    _check_counts(cfg)
    check_rates(lr=cfg.lr, weight_decay=cfg.weight_decay, mixup=cfg.augment.mixup, lr_gamma=cfg.lr_gamma)
    if not 0 <= cfg.val_split < 1:
        raise ConfigError(f"--val-split must be a share of the training folds from 0 to below 1, got {cfg.val_split}",
                          "e.g. --val-split 0.15 (0: none)")
    init = resolve_init(cfg.init, cfg.arch, cfg.runs_root, Path(cfg.weights) if cfg.weights else None,
                        branch=cfg.init_branch)
    _, bins, frames = (int(v) for v in manifest["shape"])
    if frames // cfg.fragments < 1:
        raise ConfigError(f"cannot cut {frames} frames into {cfg.fragments} fragments", f"use --fragments {frames} or fewer")
    check_input_size(init.arch, bins, frames // cfg.fragments)  # before loading anything
    crop = cfg.augment.time_crop
    if crop is not None:  # training samples are cropped; the test clips are not
        if not 1 <= crop <= frames // cfg.fragments:
            raise ConfigError(f"--time-crop {crop} is not within the {frames // cfg.fragments} frames of a training "
                              "sample", f"use --time-crop 1 to {frames // cfg.fragments}")
        check_input_size(init.arch, bins, crop, crop=True)
    channel = input_channel(manifest, cfg.input_channel)
    if channel is not None and cfg.channel_fusion:
        raise ConfigError("--input-channel and --channel-fusion both say which channels the network sees",
                          "give one of them")
    plan = split_folds(list(manifest["folds"]), cfg.fold)
    val_fold = validation_fold(list(manifest["folds"]), plan)
    check_usable(manifest, cfg.dataset, plan, val_fold)
    all_folds = sorted({f for t, train in plan for f in [t, *train]} | ({val_fold} if val_fold else set()), key=fold_order)
    name = cfg.name or default_name(cfg.init.replace(":", "-").replace("/", "_")[:40], cfg.dataset)
    recorded = recorded_config(cfg.runs_root, "finetune", name, cfg.resume)
    # Zhou et al.'s options cut and copy the training set in memory, so they refuse to stream.
    zhou = (f"--fragments {cfg.fragments}" if cfg.fragments > 1 else "--channel-fusion") \
        if cfg.fragments > 1 or cfg.channel_fusion else None
    carve = bool(cfg.val_split) and val_fold is None  # a set with its own validation split keeps it
    inputs = open_inputs([FoldSet(cfg.store, cfg.dataset, key, all_folds)], cfg.memory_budget_gb, device, ranks=ranks,
                         recorded=recorded, manifests=[manifest],
                         needs_memory=zhou or (f"--val-split {cfg.val_split}" if carve else None))
    # The mode is recorded: it changes the batch order, so a resume must keep it.
    config = {**cfg.to_json(), "arch": init.arch, "key": key, **init.record(recorded), "stage": "finetune",
              "data_mode": inputs.mode.mode, "input_channel_index": channel}
    # --resume --epochs N with N larger than the run's: the step schedule does not depend on
    # the total, so the extended run is the run that N epochs would have been from the start.
    run = open_run(ranks, cfg.runs_root, "finetune", name, config, cfg.resume, extendable=("epochs",),
                   later=_LATER_OPTIONS)
    say(f"finetune {cfg.dataset} ({key}) from {init.kind} ({init.describe()}), {init.arch}{_zhou_note(cfg)}, "
        f"{len(plan)} fold(s), {cfg.epochs} epochs on {device}{f' x {ranks.world} ranks' if ranks.active else ''}"
        f"{f', epochs selected on {val_fold}' if val_fold else ''}"
        f"{f', epochs selected on {cfg.val_split:g} of the training folds held out' if carve else ''}"
        f", features {inputs.describe()} -> {run.path}")

    # The training folds of each test fold come through the door (streamed, or rows of the set
    # in memory); the test fold and the validation split, each a fraction of the set, are in memory.
    val = inputs.resident([val_fold]) if val_fold else None
    n_classes = len(manifest["classes"])
    done = {r["fold"]: r for r in run.metrics() if r.get("event") == "fold_done"}
    extended = [f for f, r in done.items() if _fold_epochs(run, f, r) < cfg.epochs]
    if extended:  # their results (and the run's summary) are made again after the new epochs
        run.drop_records(lambda r: r.get("event") == "summary" or (r.get("event") == "fold_done" and r["fold"] in extended))
        say(f"extending fold(s) {', '.join(sorted(extended, key=fold_order))} to {cfg.epochs} epochs")
    per_fold: dict[str, dict[str, float]] = {}
    for test_fold, train_folds in plan:
        if test_fold in done and test_fold not in extended:
            per_fold[test_fold] = {k: v for k, v in done[test_fold].items() if k not in ("event", "fold", "epochs")}
            say(f"fold {test_fold}: already done (last {task.metric_name} "
                f"{100 * per_fold[test_fold][f'last_{task.metric}']:.2f}%)")
            continue
        train = inputs.folds(sorted(train_folds, key=fold_order))
        test = inputs.resident([test_fold])
        fold_val = val
        if carve:  # the same rows on every resume: a seeded split of the same training rows
            train, fold_val = hold_out(train, cfg.val_split, cfg.seed)
        per_fold[test_fold] = _train_fold(cfg, init, run, task, train, test, fold_val, n_classes, test_fold, device,
                                          ranks, say, channel)
    summary = {**summarize(per_fold, task.metric), **curve_selection(run.metrics(), [t for t, _ in plan], task.metric)}
    predictions = run.predictions()
    if ranks.main and predictions:  # last-epoch predictions of every test fold, pooled
        report = task.report(np.concatenate([p["y_true"] for p in predictions.values()]),
                             np.concatenate([p["scores"] for p in predictions.values()]), manifest["classes"])
        run.write_text("per_class.json", json.dumps(report, indent=1))
    run.log({"event": "summary", **{k: v for k, v in summary.items() if k != "folds"}})
    run.write_text("summary.md", summary_markdown(cfg, init.arch, key, summary,
                                                  val_fold or (f"held-out {cfg.val_split:g}" if carve else None)))
    summary["run"] = str(run.path)
    return summary


def curve_selection(records: list[dict[str, Any]], folds: list[str], metric: str = "acc") -> dict[str, Any]:
    """Selection on the validation curve averaged over folds: the epoch whose validation score,
    averaged over the test folds' runs, is best (the earliest on ties), and the test scores
    there (mean and ddof=1 std over folds); beside it, the best of the averaged test curve,
    which is what a "best average validation accuracy" on the held-out folds themselves
    reports (optimistic). Empty without a validation curve for every fold."""
    val, test = {}, {}
    for r in records:
        if r.get("event") == "epoch" and r.get("fold") in folds and f"val_{metric}" in r:
            val.setdefault(r["fold"], {})[r["epoch"]] = r[f"val_{metric}"]
            test.setdefault(r["fold"], {})[r["epoch"]] = r[f"test_{metric}"]
    if set(val) != set(folds):
        return {}
    epochs = sorted(set.intersection(*(set(v) for v in val.values())))
    if not epochs:
        return {}
    v = np.array([[val[f][e] for e in epochs] for f in folds], dtype=float)
    t = np.array([[test[f][e] for e in epochs] for f in folds], dtype=float)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an epoch of NaN scores (no positive): never chosen
        mean_val, mean_test = np.nanmean(v, axis=0), np.nanmean(t, axis=0)
    chosen = _best(mean_val.tolist())
    at = t[:, chosen]
    return {f"curve_selected_{metric}_mean": float(np.mean(at)),
            f"curve_selected_{metric}_std": float(np.std(at, ddof=1)) if len(at) > 1 else 0.0,
            "curve_selected_epoch": epochs[chosen], f"best_mean_val_{metric}": float(mean_val[chosen]),
            f"best_mean_test_{metric}": float(np.nanmax(mean_test))}


def _fold_epochs(run: Run, fold: str, record: dict[str, Any]) -> int:
    """How many epochs a finished fold trained: its fold_done record says so; records of runs
    made before extension existed do not, and their checkpoint does."""
    if "epochs" in record:
        return int(record["epochs"])
    ckpt = run.load_checkpoint(f"fold-{fold}")
    return int(ckpt["meta"]["epoch"]) + 1 if ckpt else 0


def _zhou_note(cfg: FinetuneConfig) -> str:
    """What the printed and written summaries say about the non-default Zhou et al. options."""
    parts = [f"{cfg.head} head"] if cfg.head != "linear" else []
    parts += [f"input channel {cfg.input_channel} alone"] if cfg.input_channel is not None else []
    parts += [f"{cfg.fragments} fragments"] if cfg.fragments > 1 else []
    parts += ["channel fusion"] if cfg.channel_fusion else []
    fused = "; posteriors averaged per clip" if cfg.fragments > 1 or cfg.channel_fusion else ""
    return f" ({', '.join(parts)}{fused})" if parts else ""


def _train_fold(cfg, init, run: Run, task: Task, train, test, val, n_classes: int, fold: str, device, ranks: Ranks,
                say, channel: int | None = None) -> dict[str, float]:
    seed_everything(cfg.seed)
    encoder = init.build()
    encoder.input_channel = channel
    model = prepare_model(Classifier(encoder, n_classes, head=cfg.head), device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    y_test = test.y.cpu()  # per clip, whatever the samples are
    test_clips, test_index, val_index = test.clips, None, None
    y_val = val.y.cpu() if val is not None else None
    n_test, n_val = len(test.clips), len(val.clips) if val is not None else 0
    tag = f"fold-{fold}"
    ckpt = run.load_checkpoint(tag) if cfg.resume else None
    if cfg.fragments == 1 and not cfg.channel_fusion:  # whole clips
        # A resume takes them from the checkpoint (the same numbers; streamed, one pass fewer).
        mean, std = ((ckpt["states"]["mean"].to(device), ckpt["states"]["std"].to(device))
                     if ckpt and "mean" in ckpt["states"] else train.statistics(ranks))
        saved_stats = (mean, std)
    else:  # samples are fragments and/or channels (in memory); test predictions are fused back per clip
        train, _, (mean, std), saved_stats = zhou_samples(train, cfg.fragments, cfg.channel_fusion)
        test, test_index, _, _ = zhou_samples(test, cfg.fragments, cfg.channel_fusion, stats=saved_stats)
        if val is not None:
            val, val_index, _, _ = zhou_samples(val, cfg.fragments, cfg.channel_fusion, stats=saved_stats)

    def outputs(samples, index, n_clips: int) -> torch.Tensor:
        """Per-clip outputs of a set: logits / sigmoid posteriors, or fused posteriors."""
        logits = predict(model, samples, mean, std, device)
        if index is None:
            return task.outputs(logits)
        return fuse_posteriors(logits, index.cpu(), n_clips, task.multilabel)

    m = task.metric
    start, history, val_history = 0, [], []
    if ckpt:
        model.load_state_dict(ckpt["states"]["model"])
        restore_optimiser_states(ckpt["states"], opt, sched)
        start, history = ckpt["meta"]["epoch"] + 1, ckpt["meta"]["history"]
        val_history = ckpt["meta"].get("val_history", [])
        say(f"fold {fold}: resuming after epoch {start}")
    if cfg.resume:  # epochs logged after the checkpoint (a kill between the two) are done again
        run.drop_records(lambda r: r.get("event") == "epoch" and r.get("fold") == fold and r["epoch"] > start)
    # Either loader's order depends only on (seed, epoch): a resumed run sees the same batches.
    loader = train.loader(cfg.batch_size, shuffle=True, drop_last=False, seed=cfg.seed, ranks=ranks)
    trained = wrap(model, ranks, device)  # DDP averages gradients across ranks; `model` stays the plain module
    augment = dataclasses.replace(cfg.augment, n_classes=n_classes)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def loss_of(batch) -> tuple[torch.Tensor, int]:
        x = (batch.x.to(device).float() - mean) / std
        x, target = augment(x, batch.y.to(device), generator=gen)
        with autocast(device):
            logits = trained(x)
        return task.loss(logits, target), x.shape[0]

    scores = None
    for epoch in range(start, cfg.epochs):
        model.train()
        trained_pass = train_epoch(loader, epoch, cfg.seed, gen, opt, loss_of,
                                   desc=f"fold {fold} epoch {epoch + 1}/{cfg.epochs}", stage="finetune",
                                   progress=cfg.progress and ranks.main, rank=ranks.rank)
        sched.step()
        scores = outputs(test, test_index, n_test)
        history.append(task.headline(scores, y_test))
        record = {"event": "epoch", "fold": fold, "epoch": epoch + 1, "train_loss": trained_pass.loss,
                  f"test_{m}": history[-1]}
        if val is not None:
            val_history.append(task.headline(outputs(val, val_index, n_val), y_val))
            record[f"val_{m}"] = val_history[-1]
        # The line first, then the checkpoint: a kill between the two redoes this epoch and its line.
        run.log({**record, "lr": sched.get_last_lr()[0], "seconds": trained_pass.seconds()})
        run.save_checkpoint(tag, {"model": model.state_dict(), **optimiser_states(opt, sched),
                                  "mean": saved_stats[0].cpu(), "std": saved_stats[1].cpu()},
                            {"epoch": epoch, "history": history, "val_history": val_history, "arch": init.arch,
                             "fold": fold})
    if scores is None:  # resumed after its last epoch (killed before the fold was recorded)
        scores = outputs(test, test_index, n_test)
    final = task.score(scores, y_test)  # the headline and, multi-label, AUC and d' beside it
    run.save_predictions(fold, test_clips, y_test.numpy(), scores.numpy(), task.predicted(scores.numpy()))
    last = {f"last_{k}": v for k, v in final.items()}
    best = _best(history)  # NaN (a test split without a positive of any class) never wins
    result = {**last, f"best_{m}": history[best], "best_epoch": best + 1}
    if val_history:  # the epoch the validation split selects, and its test score: a fair selection
        chosen = _best(val_history)
        result.update({f"val_{m}": val_history[chosen], f"selected_{m}": history[chosen], "selected_epoch": chosen + 1})
    run.log({"event": "fold_done", "fold": fold, "epochs": cfg.epochs, **result})
    say(f"fold {fold}: last-epoch {task.metric_name} {100 * result[f'last_{m}']:.2f}%, best {100 * result[f'best_{m}']:.2f}% "
        f"(epoch {result['best_epoch']}, selected on the test fold)"
        + (f", {100 * result[f'selected_{m}']:.2f}% at epoch {result['selected_epoch']} selected on the validation "
           "split" if val_history else ""))
    return result


def _best(values: list[float]) -> int:
    """Index of the highest value, the earliest on ties; NaNs never win."""
    finite = [(v, -i) for i, v in enumerate(values) if v == v]
    return -max(finite)[1] if finite else len(values) - 1


def summary_markdown(cfg: FinetuneConfig, arch: str, key: str, s: dict[str, Any], val_fold: str | None = None) -> str:
    m = s.get("metric", "acc")
    name = METRIC_NAMES[m]
    selected = f"selected_{m}_mean" in s

    def pct(v: float) -> str:
        return f"{100 * v:.2f}"

    head = f"| test fold | last-epoch {name} | best-epoch {name}* | best epoch |"
    head += f" {val_fold}-selected {name} | selected epoch |" if selected else ""
    lines = [f"# finetune {cfg.dataset} from {cfg.init}", "",
             f"{arch}{_zhou_note(cfg)}, {cfg.epochs} epochs, batch {cfg.batch_size}, Adam lr {cfg.lr}, weight decay {cfg.weight_decay}, "
             f"features {key}", "", head, "|---" * head.count(" |") + "|"]
    for fold, r in s["folds"].items():
        row = f"| {fold} | {pct(r[f'last_{m}'])} | {pct(r[f'best_{m}'])} | {r['best_epoch']} |"
        row += f" {pct(r[f'selected_{m}'])} | {r['selected_epoch']} |" if selected else ""
        lines.append(row)
    row = (f"| **mean ± std** ({s['n_folds']} fold{'s' if s['n_folds'] != 1 else ''}) | **{pct(s[f'last_{m}_mean'])} ± {pct(s[f'last_{m}_std'])}** "
           f"| {pct(s[f'best_{m}_mean'])} ± {pct(s[f'best_{m}_std'])} | |")
    row += f" {pct(s[f'selected_{m}_mean'])} ± {pct(s[f'selected_{m}_std'])} | |" if selected else ""
    lines.append(row)
    if "last_dprime_mean" in s:
        lines += ["", f"Last epoch, mean over folds: macro ROC AUC {s['last_auc_mean']:.3f}, d' {s['last_dprime_mean']:.3f}; "
                      f"mAP averages the classes with a positive clip in the test split."]
    lines += ["", f"*best-epoch {name} is selected on the test fold and therefore optimistic; the headline is the "
              f"last-epoch {name}. Standard deviation is over folds (ddof=1)."]
    if selected:
        lines += [f"The {val_fold}-selected column takes each fold's epoch with the best {name} on the {val_fold} split "
                  "(which is never trained on) and reports its test score: a fair model selection."]
    if f"curve_selected_{m}_mean" in s:
        lines += ["", f"At the epoch with the best {name} on the {val_fold} split averaged over folds (epoch "
                      f"{s['curve_selected_epoch']}: {pct(s[f'best_mean_val_{m}'])} there): test {name} "
                      f"**{pct(s[f'curve_selected_{m}_mean'])} ± {pct(s[f'curve_selected_{m}_std'])}**. The best "
                      f"epoch of the test {name} averaged over folds, selected on the test folds themselves "
                      f"(optimistic), is {pct(s[f'best_mean_test_{m}'])}."]
    return "\n".join(lines) + "\n"
