"""Frozen-encoder evaluation of a pretrained representation: a linear probe (stages/probe.py:
logistic regression on standardised embeddings, its penalty cross-validated on the training
folds; or the papers' SGD recipe) and weighted kNN (NPID's: k = 200, weights exp(sim / 0.07); any list of k,
the first the headline; and k chosen by cross-validation on the training folds), per fold,
with per-class precision / recall / F1 and a confusion matrix saved with the run. With one
training fold (DCASE 2013's official two, a train/test split such as ratios=80/0/20)
cross-validation leaves out stratified fifths of it instead of folds; a set with its own val
split (FSD50K, ratios=70/15/15) chooses on that split instead.

The encoder is frozen in eval mode and never receives gradients, so embeddings are computed
once and the probe trains on them; its weights are hashed before and after to prove it.
``--bn-stats clips`` first recomputes every BatchNorm's running statistics on the evaluated clips
(no labels, no gradient): a network at random init otherwise normalises with its initial
statistics (mean 0, variance 1, no normalisation at all) and a pretrained one with those of
its augmented views (docs/representations.md measures both).
Besides pretrained encoders, two references: ``--run random`` (the same network at random init)
and ``--run logmel`` (no network: the standardised log-mels pooled to a grid, SUPERB's FBANK
row), scored by the same protocol.

When the folds' features are over the memory budget, they are never loaded: one sequential
(unshuffled) streaming pass embeds every clip, in the same order and batches as from memory,
so the embeddings, and everything computed from them, are the same in both modes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audiofx.errors import ConfigError, StoreError
from audiofx.training.data.featuresets import (
    SKIPPED_HINT,
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
from audiofx.training.models.encoders import LogmelGrid, projection_from_state
from audiofx.training.models.published import NAMES as PUBLISHED_NAMES
from audiofx.training.runtime.device import pick_device, seed_everything
from audiofx.training.runtime.distributed import launched_ranks
from audiofx.training.stages.embedding import EMBED_BATCH, embed_rows, recompute_batchnorm
from audiofx.training.stages.knn import choose_k, cv_groups, knn_scores
from audiofx.training.stages.metrics import mean_std, per_class_markdown
from audiofx.training.stages.probe import (
    PROBES,
    choose_weight_decay,
    lbfgs_probe,
    sgd_probe,
)
from audiofx.training.stages.runs import Run, StageOptions, check_minimum, check_rates, default_name
from audiofx.training.stages.tasks import METRIC_NAMES, Task
from audiofx.training.stages.weights import (
    LOGMEL,
    RANDOM,
    RANDOM_ENCODER,
    SSL_METHODS,
    Init,
    pretrain_run_dir,
    resolve_init,
)

MODES = ("knn", "linear")
BN_STATS = ("carried", "clips")  # the encoder's own BatchNorm statistics, or the evaluated clips'


@dataclass
class EvaluateConfig(StageOptions):
    run: str  # a pretrain run: npid | simclr | moco (newest), METHOD:RUN, a run's name or folder, a checkpoint; random
    dataset: str | None = None  # None: the one dataset the pretrain run pooled (pooled_dataset)
    arch: str | None = None  # for random, or to insist on one (checkpoints record theirs or tell it by their shapes)
    weights: str | None = None  # the file of a named init (imagenet, imagenet-simclr, imagenet-moco)
    init_branch: str = "auto"  # a checkpoint's online or momentum network (models/checkpoints.py)
    mode: str = "knn"
    fold: str = "all"
    key: str | None = None
    set_options: dict[str, Any] = field(default_factory=dict)  # --set: the stored set extract made with these
    input_channel: str | None = None  # one stored channel (a source name or an index) as the input, repeated to 3
    k: int | tuple[int, ...] = 200  # several: each is reported, the first is the headline
    temperature: float = 0.07
    # backbone (pooled encoder features) or projection (the pretrain method's own space);
    # None: kNN on a pretrain run scores its projection (NPID's memory-bank space, where Wu et
    # al., Hornauer et al. and Lin vote), everything else the backbone
    space: str | None = None
    probe: str = "lbfgs"  # lbfgs (logistic regression to convergence) or sgd (Adam epochs); stages/probe.py
    linear_epochs: int = 100  # sgd
    linear_lr: float = 1e-3  # sgd
    linear_weight_decay: float | None = None  # None: lbfgs cross-validates it on the training folds; sgd 1e-6
    batch_size: int = 256
    bn_stats: str = "carried"  # BN_STATS


def state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def pooled_dataset(cfg: EvaluateConfig) -> str:
    """The dataset to score on when --dataset is not given: the one a pretrain run pooled
    (Hornauer et al.'s phase 1 pretrains and evaluates on each dataset alone)."""
    path = None if cfg.run in (RANDOM, LOGMEL) else pretrain_run_dir(cfg.run, cfg.runs_root, option="--run")
    pooled = list(json.loads((path / "config.json").read_text())["pool"]) if path else []  # {dataset: key}
    if len(pooled) != 1:
        which = (f"pretrain run {path.name} pooled {'+'.join(pooled)}" if path
                 else f"--run {cfg.run} names no pretrain run that records its dataset")
        raise ConfigError(f"evaluate needs --dataset: {which}", "pass --dataset, the labelled set to score on")
    return pooled[0]


def evaluate(cfg: EvaluateConfig, say=print) -> dict[str, Any]:
    cfg = replace(cfg, set_options=normal_set_options(cfg.set_options))
    if cfg.dataset is None:
        cfg = replace(cfg, dataset=pooled_dataset(cfg))
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown mode {cfg.mode!r}", f"use one of {', '.join(MODES)}")
    if cfg.bn_stats not in BN_STATS:
        raise ConfigError(f"unknown --bn-stats {cfg.bn_stats!r}", f"use one of {', '.join(BN_STATS)}")
    if cfg.probe not in PROBES:
        raise ConfigError(f"unknown --probe {cfg.probe!r}", f"use one of {', '.join(PROBES)}")
    check_rates(lr=cfg.linear_lr, weight_decay=cfg.linear_weight_decay)
    # as the CLI's ranges do, for scripts: 0 epochs would score an untrained probe
    check_minimum("--epochs", cfg.linear_epochs, 1)
    check_minimum("batch_size", cfg.batch_size, 1)
    ks = knn_ks(cfg.k)
    if launched_ranks() > 1:  # every rank would write one run folder
        raise ConfigError("evaluate runs in one process, not under torchrun",
                          "run it as audiofx evaluate ... (embedding a set once takes one device)")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    random_init = cfg.run == RANDOM  # the baseline: the same network at random init (seeded by --seed)
    inputs_only = cfg.run == LOGMEL  # the other reference: no network, the inputs themselves
    if inputs_only:
        given = [option for option, on in (("--arch", cfg.arch), ("--weights", cfg.weights),
                                           ("--space projection", cfg.space == "projection"),
                                           (f"--bn-stats {cfg.bn_stats}", cfg.bn_stats != "carried")) if on]
        if given:
            raise ConfigError(f"--run {LOGMEL} scores the log-mel inputs without a network: {given[0]} does not apply",
                              f"drop {given[0]}")
        init = Init(LOGMEL, LOGMEL, LOGMEL)
    else:
        init = resolve_init("scratch" if random_init else cfg.run, cfg.arch, cfg.runs_root,
                            Path(cfg.weights) if cfg.weights else None, option="--run", branch=cfg.init_branch)
    if init.kind == "scratch" and not random_init:
        raise ConfigError(f"--run {cfg.run!r} is not a pretrained representation",
                          f"pass {', '.join(PUBLISHED_NAMES)}, {', '.join(SSL_METHODS)}, METHOD:RUN, a run or a "
                          f"checkpoint (or {RANDOM} for the baseline)")
    source = f"{RANDOM} init" if random_init else "the log-mel inputs" if inputs_only else init.source
    key, manifest = resolve_featureset(cfg.store, cfg.dataset, cfg.preset, cfg.key, cfg.set_options)
    check_single_copy(manifest, cfg.dataset, "evaluate")
    task = Task.of(manifest)
    m = task.metric
    plan = split_folds(list(manifest["folds"]), cfg.fold)
    # A set with a validation split of its own (FSD50K's, GTZAN's 70/15/15) chooses k and the
    # probe's penalty on it; k-fold sets leave one training fold out at a time.
    val_fold = validation_fold(list(manifest["folds"]), plan)
    check_usable(manifest, cfg.dataset, plan, val_fold)
    folds = sorted({f for t, tr in plan for f in [t, *tr]} | ({val_fold} if val_fold else set()), key=fold_order)
    inputs = open_inputs([FoldSet(cfg.store, cfg.dataset, key, folds)], cfg.memory_budget_gb, device,
                         manifests=[manifest])
    space = _space(cfg, init)
    channel = input_channel(manifest, cfg.input_channel)
    encoder = (LogmelGrid() if inputs_only else init.build()).to(device)
    encoder.input_channel = channel  # before the run folder: an --arch that does not exist is refused first
    embedder = torch.nn.Sequential(encoder, projection_from_state(init.projection_state)).to(device) \
        if space == "projection" else encoder
    name = cfg.name or default_name(cfg.mode, f"{RANDOM}-{init.arch}" if random_init else Path(init.source).name,
                                    cfg.dataset)
    run = Run.create(cfg.runs_root, "evaluate", name, {**cfg.to_json(), "arch": init.arch, "key": key,
                                                       "source": source, "space": space, **init.record(),
                                                       "stage": "evaluate", "input_channel_index": channel,
                                                       "data_mode": inputs.mode.mode})
    what = (f"{source}, no network (each channel pooled to {' x '.join(map(str, LogmelGrid.GRID))})" if inputs_only
            else f"{source if random_init else init.describe()} ({init.arch}, {space} space)")
    say(f"evaluate {what} on {cfg.dataset} "
        f"({key}) by {cfg.mode}, {len(plan)} fold(s) on {device}, features {inputs.describe()} -> {run.path}")
    # Every clip embedded once (streaming: up to three passes over the store, the statistics
    # unless recorded, BatchNorm's with --bn-stats clips, then the embeddings); inputs
    # standardised with the statistics the encoder was pretrained with, when recorded.
    rows = inputs.folds(folds)
    if not len(rows):
        raise StoreError(f"{cfg.dataset} has no usable clip in fold(s) {', '.join(folds)}",
                         f"every clip there was skipped at extraction; {SKIPPED_HINT}")
    stats = init.input_stats
    if stats is not None and stats[0].shape[1] != int(manifest["shape"][0]):
        # pretrained on sets of another channel count (a 3-window stack, evaluated on one mel):
        # its statistics describe other channels, so the set's own standardise it
        say(f"note: {init.source} was pretrained on {stats[0].shape[1]}-channel features and {cfg.dataset}'s have "
            f"{manifest['shape'][0]}: inputs are standardised with the set's own statistics")
        stats = None
    mean, std = stats or rows.statistics()
    mean, std = mean.to(device), std.to(device)
    if cfg.bn_stats == "clips":
        layers = recompute_batchnorm(embedder, (b.x for b in rows.in_order(EMBED_BATCH)), mean, std, device)
        say(f"BatchNorm statistics of {layers} layer(s) recomputed on the {len(rows)} evaluated clips")
    if random_init:  # kept with the run (its statistics as scored): `audiofx report` embeds with it again
        run.save_checkpoint(RANDOM_ENCODER, {"encoder": encoder.state_dict()}, {"arch": init.arch})
    before = state_hash(embedder)
    z = embed_rows(embedder, rows, mean, std, device)
    y, clips, fold_list = rows.y.to(device), rows.clips, rows.fold_of
    del rows
    inputs.release()  # only the embeddings are needed from here on
    fold_of = np.array(fold_list)
    n_classes = len(manifest["classes"])
    per_fold, y_true, pooled = {}, [], []
    for test_fold, train_folds in plan:
        tr = torch.from_numpy(np.isin(fold_of, train_folds)).to(device)
        te = torch.from_numpy(fold_of == test_fold).to(device)
        if val_fold:  # selection data: the training rows and the validation split, which alone is held out
            sel = torch.from_numpy(np.isin(fold_of, [*train_folds, val_fold])).to(device)
            groups, held = fold_of[sel.cpu().numpy()], [val_fold]
        else:
            sel, groups, held = tr, cv_groups(train_folds, fold_of[tr.cpu().numpy()], y[tr], cfg.seed), None
        if cfg.mode == "knn":
            # Votes (multi-label: the weighted fraction of neighbours with each class, already in [0, 1]).
            by_k = {k: knn_scores(z[tr], y[tr], z[te], n_classes, k, cfg.temperature) for k in ks}
            scores = by_k[ks[0]]
            result = task.score(scores, y[te])
            if len(ks) > 1:
                result.update({f"{m}_k{k}": task.headline(v, y[te]) for k, v in by_k.items()})
            best_k, cv = choose_k(z[sel], y[sel], groups, n_classes, temperature=cfg.temperature, score=task.headline,
                                  held_out=held)
            if best_k is not None:  # else too few training clips to hold any out: no k by CV for this fold
                cv_scores = by_k[best_k] if best_k in by_k else \
                    knn_scores(z[tr], y[tr], z[te], n_classes, best_k, cfg.temperature)
                result.update({f"{m}_kcv": task.headline(cv_scores, y[te]), "k_cv": best_k, f"cv_{m}": cv})
        elif cfg.probe == "lbfgs":
            wd, cv = cfg.linear_weight_decay, None
            if wd is None:
                wd, cv = choose_weight_decay(z[sel], y[sel], groups, n_classes, task, held_out=held)
            scores = task.outputs(lbfgs_probe(z[tr], y[tr], z[te], n_classes, wd, task))
            result = {**task.score(scores, y[te]), "weight_decay": wd, **({"cv_weight_decay": cv} if cv else {})}
        else:  # the papers' recipe
            def log_epoch(epoch: int, loss: float, test_logits: torch.Tensor, fold: str = test_fold) -> None:
                # One line per epoch per fold, as the training stages write (the curve of the
                # probe; its result is the last epoch's, nothing is selected on the test fold).
                run.log({"event": "epoch", "fold": fold, "epoch": epoch, "train_loss": loss,
                         f"test_{m}": task.headline(task.outputs(test_logits), y[te])})

            wd = 1e-6 if cfg.linear_weight_decay is None else cfg.linear_weight_decay
            logits = sgd_probe(z[tr], y[tr], z[te], n_classes, cfg.linear_epochs, cfg.linear_lr, wd, cfg.batch_size,
                               cfg.seed, task, on_epoch=log_epoch)
            scores = task.outputs(logits)
            result = task.score(scores, y[te])
        per_fold[test_fold] = result
        scores_np = scores.float().cpu().numpy()
        run.save_predictions(test_fold, [c for c, f in zip(clips, fold_of) if f == test_fold],
                             y[te].cpu().numpy(), scores_np, task.predicted(scores_np))
        y_true.append(y[te].cpu().numpy())
        pooled.append(scores_np)
        # with the cross-validated score of every k or penalty the selection saw (keys as text)
        run.log({"event": "fold_done", "fold": test_fold, **result})
        say(f"fold {test_fold}: {cfg.mode} {task.metric_name} {100 * result[m]:.2f}%")
    unchanged = state_hash(embedder) == before
    # kNN with k chosen on each fold's training folds: a second, selection-free result
    by_cv = [f"{m}_kcv"] if all(f"{m}_kcv" in r for r in per_fold.values()) else []
    by_k = [f"{m}_k{k}" for k in ks] if cfg.mode == "knn" and len(ks) > 1 else []
    summary = {"mode": cfg.mode, "space": space, "metric": m, "folds": per_fold, "n_folds": len(per_fold),
               **({"k": list(ks)} if cfg.mode == "knn" else {}),
               **mean_std(per_fold, [*task.score_names, *by_k, *by_cv]),
               "encoder_unchanged": unchanged, "run": str(run.path)}
    report = task.report(np.concatenate(y_true), np.concatenate(pooled), manifest["classes"])
    run.write_text("per_class.json", json.dumps(report, indent=1))
    run.log({"event": "summary", **{k: v for k, v in summary.items() if k not in ("folds", "run")}})
    run.write_text("summary.md", _markdown(cfg, source, summary, report))
    if not unchanged:  # a bug, not a user error: the encoder must stay frozen
        raise RuntimeError("the encoder's weights changed during a frozen evaluation")
    return summary


def knn_ks(k: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """--k as a tuple of distinct k, the headline's first; each at least 1."""
    ks = (k,) if isinstance(k, int) else tuple(k)
    if not ks or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in ks) or len(set(ks)) != len(ks):
        raise ConfigError(f"--k {k!r} is not a list of distinct whole numbers of neighbours, 1 or more",
                          "e.g. --k 200 or --k 5,35,200")
    return ks


SPACES = ("backbone", "projection")


def _space(cfg: EvaluateConfig, init) -> str:
    """The embedding space scored: as asked, else the method's projection for kNN on a
    pretrain run that saved one, else the backbone."""
    if cfg.space is not None and cfg.space not in SPACES:
        raise ConfigError(f"unknown --space {cfg.space!r}", f"use one of {', '.join(SPACES)}")
    if cfg.space == "projection" and init.projection_state is None:
        raise ConfigError(f"--space projection: {init.source} holds no method projection (only audiofx pretrain runs "
                          "made since it was saved do)", "use --space backbone, or pass such a pretrain run")
    if cfg.space is not None:
        return cfg.space
    return "projection" if cfg.mode == "knn" and init.projection_state is not None else "backbone"


def _markdown(cfg: EvaluateConfig, source: str, s: dict[str, Any], report: dict[str, Any]) -> str:
    m = s["metric"]
    name = METRIC_NAMES[m]
    cv = f"{m}_kcv_mean" in s  # kNN, k also chosen by cross-validation on the training folds
    penalty_head, penalty_cells = _penalty_columns(name, s["folds"])
    ks = s.get("k", [])
    more = [(f"{name} (k {k})", f"{m}_k{k}") for k in ks[1:]]  # the first k is the headline's column
    head = f"{name} (k {ks[0]})" if ks else name
    how = f"{s['space']} space" + (f", {cfg.probe} probe" if cfg.mode == "linear" else "") \
        + (", BatchNorm statistics of the evaluated clips" if cfg.bn_stats == "clips" else "")
    lines = [f"# {cfg.mode} evaluation of {source} on {cfg.dataset} ({how})", "",
             f"| test fold | {head} |" + "".join(f" {h} |" for h, _ in more)
             + (f" {name}, k chosen on the training folds | k chosen |" if cv else "")
             + "".join(f" {h} |" for h in penalty_head),
             "|---|---|" + "---|" * len(more) + ("---|---|" if cv else "") + "---|" * len(penalty_head)]
    lines += [f"| {f} | {100 * r[m]:.2f} |" + "".join(f" {100 * r[key]:.2f} |" for _, key in more)
              + (f" {100 * r[f'{m}_kcv']:.2f} | {r['k_cv']} |" if cv else "")
              + "".join(f" {c} |" for c in penalty_cells[f]) for f, r in s["folds"].items()]
    folds = f"{s['n_folds']} fold{'s' if s['n_folds'] != 1 else ''}"
    lines += [f"| **mean ± std** ({folds}) | **{100 * s[f'{m}_mean']:.2f} ± {100 * s[f'{m}_std']:.2f}** |"
              + "".join(f" {100 * s[f'{key}_mean']:.2f} ± {100 * s[f'{key}_std']:.2f} |" for _, key in more)
              + (f" {100 * s[f'{m}_kcv_mean']:.2f} ± {100 * s[f'{m}_kcv_std']:.2f} | |" if cv else "")
              + " |" * len(penalty_head), "",
              *per_class_markdown(report), "", f"Encoder weights unchanged by the evaluation: {s['encoder_unchanged']}."]
    return "\n".join(lines) + "\n"


def _penalty_columns(name: str, folds: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, list[str]]]:
    """The probe's penalty chosen per fold, then what each candidate scored on that fold's
    training folds ("-" where a fold held nothing out); no columns when no fold chose one."""
    penalties = sorted({wd for r in folds.values() for wd in r.get("cv_weight_decay", {})})
    if not penalties:
        return [], {f: [] for f in folds}
    head = ["penalty chosen", *(f"{name} on the training folds, penalty {wd:g}" for wd in penalties)]
    cells = {f: [f"{r['weight_decay']:g}", *(f"{100 * r['cv_weight_decay'][wd]:.2f}" if wd in r.get("cv_weight_decay", {})
                                               else "-" for wd in penalties)] for f, r in folds.items()}
    return head, cells
