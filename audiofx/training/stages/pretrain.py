"""Self-supervised pretraining on the unlabeled pool of cached features (labels never read).

The pool defaults to every dataset with complete features (of the preset) in the store, all
folds, as in Hornauer et al. (NPID over all datasets combined). Datasets with longer clips
are cut into segments of the shortest clip length (GTZAN's 1500 frames become six samples of
250), so one batch can mix datasets and no audio is thrown away.

The pool comes through the one door from the store (``data.inputs``): held in memory when its
raw size fits the memory budget, streamed from the store otherwise, with the same samples
and pool indices (so NPID's memory bank means the same in both). The mode changes the batch
order, so config.json records it and a resumed run keeps it.

The methods are the registry's (``models/ssl``); this driver knows none by name: each
declares its defaults, its own options (``Method.options``), how it resolves them and what
two identical views mean for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audiofx.config import FeatureConfig
from audiofx.errors import ConfigError, StoreError
from audiofx.training.data.featuresets import (
    FoldSet,
    check_usable,
    normal_set_options,
    pool_datasets,
    split_folds,
    stored_copies,
    validation_fold,
)
from audiofx.training.data.inputs import open_inputs
from audiofx.training.data.memory import InMemoryData
from audiofx.training.data.mode import MODE_MEMORY
from audiofx.training.data.statistics import fold_copies
from audiofx.training.models.augment import Augment
from audiofx.training.models.encoders import ARCHS, check_input_size
from audiofx.training.models.ssl import METHODS, Method, method_options
from audiofx.training.runtime.device import autocast, prepare_model, seed_everything
from audiofx.training.runtime.distributed import Ranks, average_batchnorm_statistics, run_on_ranks, wrap
from audiofx.training.stages.embedding import embed
from audiofx.training.stages.epochs import optimiser_states, restore_optimiser_states, train_epoch
from audiofx.training.stages.knn import knn_scores
from audiofx.training.stages.runs import (TrainingOptions, check_maximum, check_minimum, check_rates, default_name,
                                          open_run, recorded_config)
from audiofx.training.stages.tasks import Task
from audiofx.training.stages.weights import resolve_init


@dataclass
class PretrainConfig(TrainingOptions):
    method: str = "npid"
    datasets: tuple[str, ...] = ()  # empty: every dataset in the store
    set_options: dict[str, Any] = field(default_factory=dict)  # --set: which stored set of each dataset (pool_overrides)
    hold_out_fold: str | None = None  # a fold of every pooled dataset left out (the test fold of a per-dataset protocol)
    arch: str | None = None  # default: the --init weights' arch, else resnet50
    init: str = "scratch"  # where the encoder starts (stages/weights.py): scratch, imagenet..., a run, a file
    weights: str | None = None  # the file of a named init (imagenet, imagenet-simclr, imagenet-moco)
    init_branch: str = "auto"  # a checkpoint's online or momentum network (models/checkpoints.py)
    epochs: int = 200
    batch_size: int = 64
    lr: float | None = None  # default: the method's
    weight_decay: float | None = None
    temperature: float | None = None  # default: the method's (its constructor's)
    # The views: each augmentation switchable (the defaults are what every run did before
    # they were options; mixup is not offered, as it needs labels or a loss that mixes them).
    time_crop: int | None = None  # frames of a random crop per view (None: the whole clip)
    time_shift: int | None = None  # circular shift of up to N frames (None: a quarter of the view's frames)
    freq_shift: int = 0  # shift along the mel bins of up to N bins (a pitch-like shift); 0 is off
    resized_crop: float = 0.0  # a random region of at least this share of bins and frames, resized back; 0 is off
    gain_db: float = 0.0  # a random level of up to this many dB either way per view; 0 is off
    eq_db: float = 0.0  # a random equaliser of up to this many dB either way per band and view; 0 is off
    spec_augment: bool = True
    time_masks: int = 2
    freq_masks: int = 2
    # The methods' own options by name (NPID's nce_k, MoCo's bn_splits: Method.options); one
    # left out has its default. config.json records every method's at the top level.
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The recipe, with every method's options in place of ``options`` (another method's at
        their defaults), as config.json has always recorded them."""
        out: dict[str, Any] = {}
        for key, value in super().to_json().items():
            if key == "options":
                out.update({o.name: value.get(o.name, o.default) for _, o in method_options()})
            else:
                out[key] = value
        return out

    def own_options(self) -> dict[str, Any]:
        """This method's options, as given or at their defaults."""
        return {o.name: self.options.get(o.name, o.default) for o in METHODS[self.method].options}


def pretrain(cfg: PretrainConfig, say=print) -> dict[str, Any]:
    cfg = replace(cfg, set_options=normal_set_options(cfg.set_options))
    check_options(cfg, recorded_config(cfg.runs_root, "pretrain", cfg.name, cfg.resume))
    return run_on_ranks(_pretrain, cfg, say)


def _pretrain(cfg: PretrainConfig, ranks: Ranks, device: torch.device, say) -> dict[str, Any]:
    seed_everything(cfg.seed)
    method_cls = METHODS[cfg.method]
    init = resolve_init(cfg.init, cfg.arch, cfg.runs_root, Path(cfg.weights) if cfg.weights else None,
                        branch=cfg.init_branch)  # the file is read and checked before any data
    cfg = replace(cfg, arch=init.arch)
    if init.kind != "scratch":
        say(f"init: {init.kind} ({init.describe()}), {init.arch}")
    sets = pool_datasets(cfg.store, cfg.preset, cfg.datasets, say, cfg.set_options)  # (dataset, key, manifest)
    if cfg.hold_out_fold is not None:
        sets = _without_fold(sets, cfg.hold_out_fold)
    copies = _stored_copies(sets)  # > 1: each view is a random one of a clip's stored augmented copies
    foldsets = [FoldSet(cfg.store, ds, key, list(m["folds"])) for ds, key, m in sets]
    frames = min(int(m["shape"][-1]) for *_, m in sets)
    bins = int(sets[0][2]["shape"][-2])
    _check_views(cfg, frames, bins, copies)
    name = cfg.name or default_name(cfg.method, cfg.arch)
    recorded = recorded_config(cfg.runs_root, "pretrain", name, cfg.resume)
    cfg = replace(cfg, options={**cfg.options, **method_cls.resolve(cfg.own_options(), cfg.batch_size, recorded)})
    _refuse_extension(cfg, recorded, name)
    inputs = open_inputs(foldsets, cfg.memory_budget_gb, device, ranks=ranks, recorded=recorded,
                         manifests=[m for *_, m in sets])
    say(f"data: {inputs.describe()}")
    # The run folder is made (or checked, on --resume) before the pool is read: a resume with
    # other settings fails at once, not after minutes of loading.
    settings = {**cfg.to_json(), **(init.record(recorded) if init.kind != "scratch" else {}), "stage": "pretrain",
                "data_mode": inputs.mode.mode,
                "pool": {ds: key for ds, key, _ in sets}}
    run = open_run(ranks, cfg.runs_root, "pretrain", name, settings, cfg.resume,
                   later={"data_mode": MODE_MEMORY, **_recorded_before(method_cls)})
    choice = _monitor_choice(sets)
    ckpt = run.load_checkpoint("last") if cfg.resume else None
    # The loss of the last epoch done: what a resume with no epoch left to train reports.
    done = ckpt["meta"]["epoch"] + 1 if ckpt else 0
    last_loss = next((r["loss"] for r in run.metrics() if r.get("event") == "epoch" and r["epoch"] == done), math.nan)
    if done >= cfg.epochs and run.checkpoint_path("final").is_file() and (run.path / "summary.md").is_file():
        # Finished: its final.pt stays as it is (the newest run of a method is found by it).
        say(f"resuming after epoch {cfg.epochs}: the run has finished, nothing left to do")
        return {"run": str(run.path), "loss": last_loss, "data_mode": inputs.mode.mode}
    monitored = FoldSet(cfg.store, choice["dataset"], choice["key"], [choice["held"], *choice["train"]]) \
        if choice else None
    pool = inputs.pool(frames, keep=monitored)
    if copies > 1 and pool.kept is not None:  # the monitor scores the clips themselves: copy 0 alone is kept
        pool.kept = replace(pool.kept, x=pool.kept.x[:, :pool.kept.x.shape[1] // copies].clone())
    if pool.not_kept:
        say(f"no kNN monitoring: {pool.not_kept}")
    loader = pool.loader(cfg.batch_size, seed=cfg.seed, ranks=ranks)
    n = len(pool)
    # The pool's statistics: a resume takes them from the checkpoint in either mode (summed
    # again in another order, over another rank count when streaming, they could differ in the
    # last bit); otherwise from the pool, in one streaming pass shared by the ranks when it is
    # streamed (each reads a share; the sums are added), so all ranks standardise alike.
    if ckpt and "mean" in ckpt["states"]:
        mean, std = ckpt["states"]["mean"].to(device), ckpt["states"]["std"].to(device)
    else:
        mean, std = fold_copies(*pool.statistics(ranks), copies)  # one copy's channels
    held = f" without fold {cfg.hold_out_fold}" if cfg.hold_out_fold is not None else ""
    held += f", views drawn from {copies} stored copies of each clip" if copies > 1 else ""
    say(f"pretrain {cfg.method} on {', '.join(ds for ds, *_ in sets)}{held} ({n} samples of {frames} frames), "
        f"{cfg.arch}, {cfg.epochs} epochs on {device} -> {run.path}")
    for note in method_cls.notes(cfg.own_options(), n):
        say(f"note: {note}")

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    kwargs: dict[str, Any] = {"temperature": cfg.temperature} if cfg.temperature else {}
    # the method copies the encoder it is given (MoCo's key encoder), so it gets the init's weights
    method = prepare_model(method_cls(init.build(), n, torch.Generator().manual_seed(cfg.seed), **kwargs,
                                      **cfg.own_options()), device)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr or method_cls.default_lr, momentum=0.9,
                          weight_decay=method_cls.default_weight_decay if cfg.weight_decay is None else cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    start = 0
    if ckpt:
        method.load_state_dict(ckpt["states"]["method"])
        restore_optimiser_states(ckpt["states"], opt, sched)
        start = ckpt["meta"]["epoch"] + 1
        say(f"resuming after epoch {start}")
    if cfg.resume:  # epochs logged after the checkpoint (a kill between the two) are done again
        run.drop_records(lambda r: r.get("event") == "epoch" and r["epoch"] > start)
    monitor = _monitor_split(choice, pool.kept) if pool.kept is not None else None
    # Buffers are not broadcast from rank 0 at every forward: the methods keep the memory bank
    # and the queue in step themselves, and BatchNorm statistics are averaged once an epoch.
    trained = wrap(method, ranks, device, broadcast_buffers=False)

    # the pool's sets share one power (pool_datasets)
    power = FeatureConfig.from_dict(sets[0][2]["feature_config"]).power
    views = _views(cfg, frames, bins, per_db=db_in_inputs(power, std))

    # A method that contrasts two views of each clip asks for them in turn: the second takes
    # another stored copy than the first (two views of one copy differ only by their masks).
    first_copies: list[torch.Tensor] = []

    def view(batch: torch.Tensor) -> torch.Tensor:
        if copies > 1:  # one of each clip's stored copies, drawn per sample
            other = first_copies.pop() if first_copies else None
            batch, taken = pick_copies(batch, copies, gen, other)
            if other is None and method_cls.contrasts_views:
                first_copies.append(taken)
        return views(batch, None, gen)[0]  # on whole batches on the device

    stored_mean, stored_std = mean.repeat(1, copies, 1, 1), std.repeat(1, copies, 1, 1)  # every copy alike

    def loss_of(batch) -> tuple[torch.Tensor, int]:
        xb = (batch.x.to(device).float() - stored_mean) / stored_std
        with autocast(device):
            return trained(xb, batch.index.to(device), view, gen), xb.shape[0]

    loss_value = last_loss
    for epoch in range(start, cfg.epochs):
        method.train()
        trained_pass = train_epoch(loader, epoch, cfg.seed, gen, opt, loss_of, after_step=method.after_step,
                                   desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", stage="pretrain",
                                   progress=cfg.progress and ranks.main, rank=ranks.rank)
        sched.step()
        average_batchnorm_statistics(method, ranks)
        loss_value = trained_pass.loss
        record = {"event": "epoch", "epoch": epoch + 1, "loss": loss_value, "lr": sched.get_last_lr()[0],
                  "seconds": trained_pass.seconds()}
        if monitor:
            task = monitor["task"]
            # evaluate's default space for a pretrain run: the method's projection (stages/evaluate.py)
            record[f"knn_{task.metric}"] = _monitor_knn(torch.nn.Sequential(method.encoder, method.projection),
                                                       monitor, mean, std, device)
            record.update(knn_dataset=monitor["dataset"], knn_fold=monitor["fold"])
        run.log(record)  # then the checkpoint: a kill between the two redoes this epoch and its line
        run.save_checkpoint("last", {"method": method.state_dict(), **optimiser_states(opt, sched),
                                     "mean": mean.cpu(), "std": std.cpu()},
                            {"epoch": epoch, "arch": cfg.arch, "method": cfg.method})
        say(f"epoch {epoch + 1}: loss {loss_value:.4f}" +
            (f", kNN {monitor['task'].metric_name} {100 * record[f'knn_{task.metric}']:.1f}% on {monitor['dataset']} "
             f"{monitor['fold']} (monitoring only)" if monitor else ""))
    # the projection too: evaluate's kNN scores the space the method trained, as the papers did
    run.save_checkpoint("final", {"encoder": method.encoder.state_dict(), "projection": method.projection.state_dict(),
                                  "mean": mean.cpu(), "std": std.cpu()},
                        {"arch": cfg.arch, "method": cfg.method, "epochs": cfg.epochs})
    run.write_text("summary.md", f"# pretrain {cfg.method}\n\n{cfg.arch}, {cfg.epochs} epochs on "
                                 f"{', '.join(ds for ds, *_ in sets)} ({n} samples); final loss {loss_value:.4f}\n")
    return {"run": str(run.path), "loss": loss_value, "samples": n, "data_mode": inputs.mode.mode}


def db_in_inputs(power: float, std: torch.Tensor) -> torch.Tensor:
    """What one dB of level adds to the standardised inputs, per channel: the store holds natural
    logs of |X|^power, so a dB (a power ratio of 10^0.1) adds power / 2 * ln(10) / 10 to them,
    which standardising divides by each channel's standard deviation."""
    return power / 2 * math.log(10) / 10 / std


def _views(cfg: PretrainConfig, frames: int, bins: int, per_db: float | torch.Tensor = 1.0) -> Augment:
    """The random view of a batch every method trains on: a time crop, a circular time shift
    (by default up to a quarter of the view's frames: the crop's, or the sample's) and
    SpecAugment masks of up to a tenth of the view's frames and an eighth of the mel bins,
    each switchable; a level and an equaliser of ``--gain-db`` and ``--eq-db`` (``per_db``:
    what a dB adds to the standardised inputs)."""
    length = cfg.time_crop or frames
    return Augment(spec_augment=cfg.spec_augment, time_masks=cfg.time_masks, time_width=max(1, length // 10),
                   freq_masks=cfg.freq_masks, freq_width=max(1, bins // 8), time_crop=cfg.time_crop,
                   time_shift=length // 4 if cfg.time_shift is None else cfg.time_shift, freq_shift=cfg.freq_shift,
                   resized_crop=cfg.resized_crop, gain_db=cfg.gain_db, eq_db=cfg.eq_db, per_db=per_db)


def _check_views(cfg: PretrainConfig, frames: int, bins: int, copies: int = 1) -> None:
    """Refuse, before a run folder is made, a crop that does not fit the pool's samples or the
    network, and two identical views for a method that contrasts two (the positive would be
    trivially the closest: nothing is learned; stored augmented copies make views differ)."""
    if cfg.time_crop is not None:
        if cfg.time_crop > frames:
            raise ConfigError(f"--time-crop {cfg.time_crop} is longer than the pool's samples ({frames} frames)",
                              f"use --time-crop {frames} or less")
        check_input_size(cfg.arch, bins, cfg.time_crop, crop=True)
    if METHODS[cfg.method].contrasts_views and copies == 1 and not _views(cfg, frames, bins).changes(frames):
        raise ConfigError(f"{cfg.method} contrasts two random views of each clip, but every augmentation is off",
                          "give --time-masks or --freq-masks above 0 (with --spec-augment), --time-shift, "
                          "--gain-db or --eq-db above 0, or a --time-crop shorter than the clips")


def check_options(cfg: PretrainConfig, recorded: dict[str, Any] | None = None) -> None:
    """Refuse options that cannot work, before anything is read: an unknown method or network,
    an option of another method set to other than its default (or, on a resume, than the
    run recorded: runs made before this check may hold one), a value below its minimum."""
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}", f"use one of {', '.join(METHODS)}")
    if cfg.arch is not None and cfg.arch not in ARCHS:
        raise ConfigError(f"unknown architecture {cfg.arch!r}", f"use one of {', '.join(ARCHS)}")
    check_rates(lr=cfg.lr, weight_decay=cfg.weight_decay, temperature=cfg.temperature)
    _check_counts(cfg)
    owners = {o.name: (m, o) for m, o in method_options()}
    for name, value in cfg.options.items():
        if name not in owners:
            raise ConfigError(f"unknown pretraining option {name!r}",
                              f"the methods' options are {', '.join(owners)}")
        owner, option = owners[name]
        if owner.name != cfg.method:
            if value != option.default and value != (recorded or {}).get(name, option.default):
                raise ConfigError(f"{option.flag} is {owner.title}'s ({option.what}), not {cfg.method}'s",
                                  f"drop {option.flag}, or use --method {owner.name}")
        else:
            if option.minimum is not None:
                check_minimum(option.flag, value, option.minimum)
            if option.maximum is not None:
                check_maximum(option.flag, value, option.maximum)


def _check_counts(cfg: PretrainConfig) -> None:
    """Refuse the counts and sizes (epochs, batch, the views') that the CLI's ranges refuse,
    for callers of the stage that do not pass through it (scripts, benchmarks): a negative
    mask count would act as 0 and be recorded as given."""
    for flag, value, minimum in (("--epochs", cfg.epochs, 1), ("--batch-size", cfg.batch_size, 1),
                                 ("--time-masks", cfg.time_masks, 0), ("--freq-masks", cfg.freq_masks, 0),
                                 ("--freq-shift", cfg.freq_shift, 0), ("--time-shift", cfg.time_shift, 0),
                                 ("--time-crop", cfg.time_crop, 1), ("--gain-db", cfg.gain_db, 0),
                                 ("--eq-db", cfg.eq_db, 0)):
        check_minimum(flag, value, minimum)
    if not 0 <= cfg.resized_crop <= 1:
        raise ConfigError(f"--resized-crop must be between 0 and 1, got {cfg.resized_crop}",
                          "pass a share of the bins and frames, 0 (off) to 1")


def _recorded_before(method: type[Method]) -> dict[str, Any]:
    """The settings runs recorded before they were options ran with, for ``Run.create``'s
    ``later``: the default views; the method's own options at what the method says (MoCo: one
    BatchNorm group), every other method's at their defaults."""
    views = {"time_crop": None, "time_shift": None, "freq_shift": 0, "spec_augment": True, "time_masks": 2,
             "freq_masks": 2, "resized_crop": 0.0, "gain_db": 0.0, "eq_db": 0.0}
    starts = {"init": "scratch", "weights": None, "init_branch": "auto"}
    pool = {"set_options": {}, "hold_out_fold": None}
    return {**views, **starts, **pool, **{o.name: o.recorded_before if owner is method else o.default for owner, o in method_options()}}


def _without_fold(sets: list[tuple[str, str, dict]], fold: str) -> list[tuple[str, str, dict]]:
    """The pool without ``fold`` of each dataset (its manifest's folds without it, so the loaders
    and the kNN monitor never read it): Hornauer et al.'s phase 1 pretrains on the training
    folds of the fold it scores. Every pooled dataset must have that fold and another."""
    out = []
    for ds, key, manifest in sets:
        folds = list(manifest["folds"])
        if fold not in folds or len(folds) < 2:
            raise ConfigError(f"--hold-out-fold {fold}: {ds} ({key}) has folds {', '.join(folds)}",
                              "name a fold every pooled dataset has, beside at least one other")
        out.append((ds, key, {**manifest, "folds": {f: v for f, v in manifest["folds"].items() if f != fold}}))
    return out


def _refuse_extension(cfg: PretrainConfig, recorded: dict[str, Any] | None, name: str) -> None:
    """Fine-tuning runs may be extended with --resume --epochs N; pretraining runs may not: the
    cosine schedule is laid out over the planned epochs, so N more epochs would not be the
    run N epochs would have been (its rate has already decayed to zero)."""
    planned = (recorded or {}).get("epochs")
    if isinstance(planned, int) and cfg.epochs > planned:
        raise ConfigError(f"pretrain run {Path(cfg.runs_root) / 'pretrain' / name} was planned for {planned} epochs; "
                          f"its cosine learning-rate schedule ends there, so it cannot be extended to {cfg.epochs}",
                          f"start a new run with --epochs {cfg.epochs}, or fine-tune from this one")


def _monitor_choice(sets: list[tuple[str, str, dict]]) -> dict[str, Any] | None:
    """A labelled dataset of the pool and a split of it held out for a weighted-kNN score each
    epoch (accuracy, or mAP for a multi-label set), voted by its training folds: the first
    of numbered folds with usable clips on both sides, or the validation split of named splits
    (FSD50K's val; else, or when it has no usable clip, their test split). Monitoring only:
    nothing is selected with it."""
    for ds, key, manifest in sets:
        folds = list(manifest["folds"])
        try:
            plan = split_folds(folds, "all")
        except StoreError:
            continue
        val = validation_fold(folds, plan)
        for held, train_folds in ([(val, plan[0][1])] if val else []) + plan:
            try:
                check_usable(manifest, ds, [(held, train_folds)])
            except StoreError:  # a fold of skipped clips only: try the next
                continue
            if train_folds:
                return {"dataset": ds, "key": key, "manifest": manifest, "held": held, "train": train_folds}
    return None


def _monitor_split(choice: dict[str, Any], d: InMemoryData) -> dict[str, Any]:
    """The rows of ``d`` (the chosen dataset, in memory) that monitoring embeds, and which of
    them are held out."""
    held, manifest = choice["held"], choice["manifest"]
    fold_of = np.array(d.fold_of)
    rows = torch.from_numpy(np.flatnonzero(np.isin(fold_of, [held, *choice["train"]]))).to(d.x.device)
    test = torch.from_numpy(fold_of == held).to(d.x.device)[rows]
    return {"dataset": choice["dataset"], "fold": f"fold {held}" if held.isdigit() else f"{held} split", "rows": rows,
            "x": d.x, "y": d.y, "test": test, "classes": len(manifest["classes"]), "task": Task.of(manifest)}


def _stored_copies(sets: list[tuple[str, str, dict]]) -> int:
    """Copies of each clip the pooled sets store (one number for all: a view is one copy)."""
    found = {ds: stored_copies(m) for ds, _, m in sets}
    if len(set(found.values())) > 1:
        raise ConfigError("the pooled sets store different numbers of copies of each clip: "
                          + ", ".join(f"{ds} {k}" for ds, k in found.items()),
                          "pool sets extracted with the same --set augment_copies (pretrain --set augment_copies=N)")
    return next(iter(found.values()))


def pick_copies(x: torch.Tensor, copies: int, generator: torch.Generator,
                other: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, copies * C, F, T) -> (B, C, F, T): for each sample one of its stored copies, drawn
    uniformly from ``generator``; with ``other`` (the copies a first view of the same batch
    took), another copy than that one, uniformly among the rest. Returns the views and the
    copies taken."""
    b, kc, f, t = x.shape
    if other is None:
        which = torch.randint(copies, (b,), generator=generator, device=generator.device).to(x.device)
    else:
        step = torch.randint(1, copies, (b,), generator=generator, device=generator.device).to(x.device)
        which = (other + step) % copies
    return x.view(b, copies, kc // copies, f, t)[torch.arange(b, device=x.device), which], which


@torch.no_grad()
def _monitor_knn(encoder, monitor, mean, std, device) -> float:
    rows, test, task = monitor["rows"], monitor["test"], monitor["task"]
    # Embedded in slices of the held-out and training rows: indexing the whole set at once
    # would copy it (FSD50K's is ~10 GB).
    z = torch.cat([embed(encoder, monitor["x"][rows[i:i + 512]], mean, std, device) for i in range(0, len(rows), 512)])
    y = monitor["y"][rows]
    scores = knn_scores(z[~test], y[~test], z[test], monitor["classes"], k=200)
    return task.headline(scores, y[test])
