"""Self-supervised pretraining on the unlabeled pool of cached features (labels never read).

The pool defaults to every dataset with complete features (of the preset) in the store, all
folds, as in Hornauer et al. (NPID over all datasets combined). Datasets with longer clips
are cut into segments of the shortest clip length (GTZAN's 1500 frames become six samples of
250), so one batch can mix datasets and no audio is thrown away.

Two data modes, as for fine-tuning: the pool is held in memory when its raw size fits the
memory budget (default: half of the free memory where the data would live), and streamed
from the store otherwise (``pool.PoolLoader``: same samples, same pool indices, so NPID's
memory bank means the same in both). The mode changes the batch order, so config.json
records it and a resumed run keeps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from audiofx.config import resolve_feature_config
from audiofx.errors import ConfigError, StoreError
from audiofx.pipeline.datasets import get_adapter
from audiofx.pipeline.store import FeatureStore
from audiofx.training.augment import Augment
from audiofx.training.data import (
    MODE_MEMORY,
    FoldSet,
    InMemoryData,
    InMemoryLoader,
    budget_bytes,
    choose_mode,
    load_in_memory,
)
from audiofx.training.device import autocast, prepare_model, seed_everything
from audiofx.training.distributed import Ranks, average_batchnorm_statistics, run_on_ranks, wrap
from audiofx.training.featureset import (
    SKIPPED_HINT,
    check_usable,
    resolve_featureset,
    split_folds,
    usable_clips,
    validation_fold,
)
from audiofx.training.finetune import channel_stats
from audiofx.training.knn import knn_scores
from audiofx.training.loop import optimiser_states, restore_optimiser_states, train_epoch
from audiofx.training.models import ARCHS, build_encoder, check_input_size
from audiofx.training.pool import PoolLoader, load_pool, pool_channel_stats
from audiofx.training.runs import TrainingOptions, default_name, open_run, recorded_config
from audiofx.training.tasks import Task
from audiofx.training.ssl.methods import METHODS


@dataclass
class PretrainConfig(TrainingOptions):
    method: str = "npid"
    datasets: tuple[str, ...] = ()  # empty: every dataset in the store
    arch: str = "resnet50"
    epochs: int = 200
    batch_size: int = 64
    lr: float | None = None  # default: the method's
    weight_decay: float | None = None
    nce_k: int = 64  # NPID noise samples (0: full softmax)
    temperature: float | None = None  # default: the method's (NPID 0.4, SimCLR 0.5, MoCo 0.2)
    # The views: each augmentation switchable (the defaults are what every run did before
    # they were options; mixup is not offered, as it needs labels or a loss that mixes them).
    time_crop: int | None = None  # frames of a random crop per view (None: the whole clip)
    time_shift: int | None = None  # circular shift of up to N frames (None: a quarter of the view's frames)
    spec_augment: bool = True
    time_masks: int = 2
    freq_masks: int = 2
    bn_splits: int | None = None  # MoCo: BatchNorm groups, keys shuffled across them (None: moco_bn_splits)


# NCE stands in for NPID's softmax when K << N; past N / NCE_K_SHARE noise samples a run is told.
NCE_K_SHARE = 10
# The most BatchNorm groups MoCo makes by default (the MoCo paper's 8 GPUs; the authors' one-GPU notebook).
MOCO_BN_SPLITS = 8


def pool_datasets(store: str, preset: str, wanted: tuple[str, ...], say=print) -> list[tuple[str, str, dict]]:
    """(dataset, key, manifest) of every dataset in the pool: the named ones (of one size), or
    by default every dataset with usable clips in the store whose features have the preset's
    channels and mel bins, or the most common ones when none has (one network takes them all
    in one batch; the number of frames may differ)."""
    names = list(wanted) or sorted({ds for ds, _, _ in FeatureStore(store).groups()})
    out = []
    for ds in names:
        try:
            key, manifest = resolve_featureset(store, ds, preset)
            if not any(usable_clips(manifest, f) for f in manifest["folds"]):
                clips = sum(int(m["clips"]) for m in manifest["folds"].values())
                raise StoreError(f"{ds} ({key}) has no usable clip: all {clips} were skipped at extraction",
                                 f"{SKIPPED_HINT}, or leave it out of --datasets")
            out.append((ds, key, manifest))
        except StoreError:
            if wanted:
                raise
    if not out:
        raise StoreError(f"no complete {preset} features with usable clips in store {store} to pretrain on",
                         "extract some first: audiofx extract --dataset demo")
    shapes = {ds: tuple(int(v) for v in m["shape"][:2]) for ds, _, m in out}  # (channels, mel bins)
    if wanted and len(set(shapes.values())) > 1:
        raise StoreError("the datasets to pretrain on have features of different sizes: "
                         + ", ".join(f"{ds} {c} x {b} bins" for ds, (c, b) in shapes.items()),
                         "name sets extracted with the same channels and mel bins in --datasets")
    if not wanted and len(set(shapes.values())) > 1:
        # The preset's size when a set has it (sets extracted with --set overrides are found too,
        # as resolve_featureset finds them), else the most common (the first on ties).
        c, b, _ = resolve_feature_config(get_adapter(out[0][0]).defaults, preset).shape
        sizes = list(shapes.values())
        keep = (c, b) if (c, b) in sizes else max(sizes, key=sizes.count)
        other = [ds for ds, shape in shapes.items() if shape != keep]
        say(f"left out of the pool (features not {keep[0]} x {keep[1]} bins like the rest): "
            + ", ".join(f"{ds} ({shapes[ds][0]} x {shapes[ds][1]})" for ds in other))
        out = [entry for entry in out if entry[0] not in other]
    return out


def pretrain(cfg: PretrainConfig, say=print) -> dict[str, Any]:
    check_options(cfg)
    return run_on_ranks(_pretrain, cfg, say)


def _pretrain(cfg: PretrainConfig, ranks: Ranks, device: torch.device, say) -> dict[str, Any]:
    seed_everything(cfg.seed)
    pool = pool_datasets(cfg.store, cfg.preset, cfg.datasets, say)
    foldsets = [FoldSet(cfg.store, ds, key, list(m["folds"])) for ds, key, m in pool]
    frames = min(int(m["shape"][-1]) for *_, m in pool)
    bins = int(pool[0][2]["shape"][-2])
    _check_views(cfg, frames, bins)
    name = cfg.name or default_name(cfg.method, cfg.arch)
    recorded = recorded_config(cfg.runs_root, "pretrain", name, cfg.resume)
    if cfg.method == "moco" and cfg.bn_splits is None:
        # The groups used are recorded, not "the default"; a resume keeps the recorded ones
        # (one, for runs recorded before the option existed).
        cfg = replace(cfg, bn_splits=recorded.get("bn_splits", 1) if recorded else moco_bn_splits(cfg))
    _refuse_extension(cfg, recorded, name)
    data_mode = choose_mode(sum(fs.raw_bytes(m) for fs, (*_, m) in zip(foldsets, pool)),
                            budget_bytes(cfg.memory_budget_gb), device, recorded=recorded, ranks=ranks)
    mode, budget = data_mode.mode, data_mode.budget
    say(f"data: {data_mode.describe()}")
    # The run folder is made (or checked, on --resume) before the pool is read: a resume with
    # other settings fails at once, not after minutes of loading.
    settings = {**cfg.to_json(), "stage": "pretrain", "data_mode": mode, "pool": {ds: key for ds, key, _ in pool}}
    # runs from before streaming have no data_mode: they were in memory; nor the views' options
    # and MoCo's BatchNorm groups: they had the default views, and MoCo one group
    before = {"time_crop": None, "time_shift": None, "spec_augment": True, "time_masks": 2, "freq_masks": 2,
              "bn_splits": 1 if cfg.method == "moco" else None}
    run = open_run(ranks, cfg.runs_root, "pretrain", name, settings, cfg.resume, later={"data_mode": MODE_MEMORY, **before})
    choice = _monitor_choice(pool)
    ckpt = run.load_checkpoint("last") if cfg.resume else None
    # The loss of the last epoch done: what a resume with no epoch left to train reports.
    done = ckpt["meta"]["epoch"] + 1 if ckpt else 0
    last_loss = next((r["loss"] for r in run.metrics() if r.get("event") == "epoch" and r["epoch"] == done), math.nan)
    if done >= cfg.epochs and run.checkpoint_path("final").is_file() and (run.path / "summary.md").is_file():
        # Finished: its final.pt stays as it is (the newest run of a method is found by it).
        say(f"resuming after epoch {cfg.epochs}: the run has finished, nothing left to do")
        return {"run": str(run.path), "loss": last_loss, "data_mode": mode}
    if mode == MODE_MEMORY:
        monitored = [ds for ds, *_ in pool].index(choice["dataset"]) if choice else None
        x, monitor_data = load_pool(foldsets, frames, device=device, keep=monitored)
        n = x.shape[0]
        data = InMemoryData(x=x, y=torch.zeros(n, dtype=torch.long, device=x.device),
                            index=torch.arange(n, device=x.device), clips=[""] * n, fold_of=[""] * n)
        loader = InMemoryLoader(data, cfg.batch_size, shuffle=True, drop_last=n > cfg.batch_size * ranks.world,
                                seed=cfg.seed, rank=ranks.rank, world_size=ranks.world)
    else:
        # Every sample once per epoch (no drop_last: the tail batches are short instead).
        loader = PoolLoader(foldsets, frames, cfg.batch_size, shuffle=True, seed=cfg.seed, rank=ranks.rank,
                            world_size=ranks.world, device=device)
        n = loader.n
        monitor_data = _monitor_load(cfg, choice, budget, device, say) if choice else None
    # The pool's statistics: a resume takes them from the checkpoint in either mode (summed
    # again in another order, over another rank count when streaming, they could differ in the
    # last bit); otherwise from the pool in memory, or from one streaming pass shared by the
    # ranks (each reads a share; the sums are added), so all ranks standardise alike.
    if ckpt and "mean" in ckpt["states"]:
        mean, std = ckpt["states"]["mean"].to(device), ckpt["states"]["std"].to(device)
    elif mode == MODE_MEMORY:
        mean, std = channel_stats(x)
    else:
        mean, std = pool_channel_stats(foldsets, frames, device=device, ranks=ranks)
    say(f"pretrain {cfg.method} on {', '.join(ds for ds, *_ in pool)} ({n} samples of {frames} frames), "
        f"{cfg.arch}, {cfg.epochs} epochs on {device} -> {run.path}")
    if cfg.method == "npid" and cfg.nce_k * NCE_K_SHARE > n:  # measured on the demo: docs/architecture.md
        say(f"note: NCE's {cfg.nce_k} noise samples are over 1/{NCE_K_SHARE} of the {n} in the pool; NCE "
            "approximates the softmax only for K much smaller than N, and --nce-k 0 (the exact softmax) is cheap here")

    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    method_cls = METHODS[cfg.method]
    kwargs: dict[str, Any] = {"temperature": cfg.temperature} if cfg.temperature else {}
    if cfg.method == "npid":
        kwargs["k"] = cfg.nce_k
    if cfg.method == "moco":
        kwargs["bn_splits"] = cfg.bn_splits
    method = prepare_model(method_cls(build_encoder(cfg.arch), n, torch.Generator().manual_seed(cfg.seed), **kwargs), device)
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
    monitor = _monitor_split(choice, monitor_data) if monitor_data is not None else None
    # Buffers are not broadcast from rank 0 at every forward: the methods keep the memory bank
    # and the queue in step themselves, and BatchNorm statistics are averaged once an epoch.
    trained = wrap(method, ranks, device, broadcast_buffers=False)

    views = _views(cfg, frames, bins)

    def view(batch: torch.Tensor) -> torch.Tensor:
        return views(batch, None, gen)[0]  # on whole batches on the device

    def loss_of(batch) -> tuple[torch.Tensor, int]:
        xb = (batch.x.to(device).float() - mean) / std
        with autocast(device):
            return trained(xb, batch.index.to(device), view, gen), xb.shape[0]

    loss_value = last_loss
    for epoch in range(start, cfg.epochs):
        method.train()
        trained_pass = train_epoch(loader, epoch, cfg.seed, gen, opt, loss_of, after_step=method.after_step,
                                   desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}",
                                   progress=cfg.progress and ranks.main, rank=ranks.rank)
        sched.step()
        average_batchnorm_statistics(method, ranks)
        loss_value = trained_pass.loss
        record = {"event": "epoch", "epoch": epoch + 1, "loss": loss_value, "lr": sched.get_last_lr()[0],
                  "seconds": trained_pass.seconds()}
        if monitor:
            task = monitor["task"]
            record[f"knn_{task.metric}"] = _monitor_knn(method.encoder, monitor, mean, std, device)
            record.update(knn_dataset=monitor["dataset"], knn_fold=monitor["fold"])
        run.log(record)  # then the checkpoint: a kill between the two redoes this epoch and its line
        run.save_checkpoint("last", {"method": method.state_dict(), **optimiser_states(opt, sched),
                                     "mean": mean.cpu(), "std": std.cpu()},
                            {"epoch": epoch, "arch": cfg.arch, "method": cfg.method})
        say(f"epoch {epoch + 1}: loss {loss_value:.4f}" +
            (f", kNN {monitor['task'].metric_name} {100 * record[f'knn_{task.metric}']:.1f}% on {monitor['dataset']} "
             f"{monitor['fold']} (monitoring only)" if monitor else ""))
    run.save_checkpoint("final", {"encoder": method.encoder.state_dict(), "mean": mean.cpu(), "std": std.cpu()},
                        {"arch": cfg.arch, "method": cfg.method, "epochs": cfg.epochs})
    run.write_text("summary.md", f"# pretrain {cfg.method}\n\n{cfg.arch}, {cfg.epochs} epochs on "
                                 f"{', '.join(ds for ds, *_ in pool)} ({n} samples); final loss {loss_value:.4f}\n")
    return {"run": str(run.path), "loss": loss_value, "samples": n, "data_mode": mode}


def _views(cfg: PretrainConfig, frames: int, bins: int) -> Augment:
    """The random view of a batch every method trains on: a time crop, a circular time shift
    (by default up to a quarter of the view's frames: the crop's, or the sample's) and
    SpecAugment masks of up to a tenth of the view's frames and an eighth of the mel bins,
    each switchable."""
    length = cfg.time_crop or frames
    return Augment(spec_augment=cfg.spec_augment, time_masks=cfg.time_masks, time_width=max(1, length // 10),
                   freq_masks=cfg.freq_masks, freq_width=max(1, bins // 8), time_crop=cfg.time_crop,
                   time_shift=length // 4 if cfg.time_shift is None else cfg.time_shift)


def _check_views(cfg: PretrainConfig, frames: int, bins: int) -> None:
    """Refuse, before a run folder is made, a crop that does not fit the pool's samples or the
    network, and two identical views for the contrastive methods (the positive would be
    trivially the closest: nothing is learned)."""
    if cfg.time_crop is not None:
        if cfg.time_crop > frames:
            raise ConfigError(f"--time-crop {cfg.time_crop} is longer than the pool's samples ({frames} frames)",
                              f"use --time-crop {frames} or less")
        check_input_size(cfg.arch, bins, cfg.time_crop, crop=True)
    if cfg.method in ("simclr", "moco") and not _views(cfg, frames, bins).changes(frames):
        raise ConfigError(f"{cfg.method} contrasts two random views of each clip, but every augmentation is off",
                          "give --time-masks or --freq-masks above 0 (with --spec-augment), --time-shift above 0, "
                          "or a --time-crop shorter than the clips")


def moco_bn_splits(cfg: PretrainConfig) -> int:
    """MoCo's default BatchNorm groups per device: one per 16 clips of the batch, at least 2
    (the key shuffle needs two) and at most 8 (the MoCo paper's GPUs and the authors' one-GPU
    notebook); BatchNorm grows noisy below ~16 samples (Wu & He 2018), so batches under 32
    get two smaller groups."""
    return min(MOCO_BN_SPLITS, max(2, cfg.batch_size // 16))


def check_options(cfg: PretrainConfig) -> None:
    """Refuse options that cannot work, before anything is read."""
    if cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r}", f"use one of {', '.join(METHODS)}")
    if cfg.arch not in ARCHS:
        raise ConfigError(f"unknown architecture {cfg.arch!r}", f"use one of {', '.join(ARCHS)}")
    if cfg.bn_splits is not None and cfg.method != "moco":
        raise ConfigError(f"--bn-splits is MoCo's (its BatchNorm groups), not {cfg.method}'s",
                          "drop --bn-splits, or use --method moco")


def _refuse_extension(cfg: PretrainConfig, recorded: dict[str, Any] | None, name: str) -> None:
    """Fine-tuning runs may be extended with --resume --epochs N; pretraining runs may not: the
    cosine schedule is laid out over the planned epochs, so N more epochs would not be the
    run N epochs would have been (its rate has already decayed to zero)."""
    planned = (recorded or {}).get("epochs")
    if isinstance(planned, int) and cfg.epochs > planned:
        raise ConfigError(f"pretrain run {Path(cfg.runs_root) / 'pretrain' / name} was planned for {planned} epochs; "
                          f"its cosine learning-rate schedule ends there, so it cannot be extended to {cfg.epochs}",
                          f"start a new run with --epochs {cfg.epochs}, or fine-tune from this one")


def _monitor_choice(pool: list[tuple[str, str, dict]]) -> dict[str, Any] | None:
    """A labelled dataset of the pool and a split of it held out for a weighted-kNN score each
    epoch (accuracy, or mAP for a multi-label set), voted by its training folds: the first
    of numbered folds with usable clips on both sides, or the validation split of named splits
    (FSD50K's val; else, or when it has no usable clip, their test split). Monitoring only:
    nothing is selected with it."""
    for ds, key, manifest in pool:
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


def _monitor_load(cfg: PretrainConfig, choice: dict[str, Any], budget: int, device: torch.device, say):
    """Streaming mode: the monitoring dataset's held-out and training folds in memory, when
    they fit the budget on their own; else None (no monitoring), said why."""
    fs = FoldSet(cfg.store, choice["dataset"], choice["key"], [choice["held"], *choice["train"]])
    size = fs.raw_bytes(choice["manifest"])
    if size > budget:
        say(f"no kNN monitoring: {choice['dataset']}'s folds for it take {size / 1e9:.2f} GB, "
            f"over the memory budget of {budget / 1e9:.2f} GB")
        return None
    return load_in_memory(fs, device=device)


def _monitor_split(choice: dict[str, Any], d: InMemoryData) -> dict[str, Any]:
    """The rows of ``d`` (the chosen dataset, in memory) that monitoring embeds, and which of
    them are held out."""
    held, manifest = choice["held"], choice["manifest"]
    fold_of = np.array(d.fold_of)
    rows = torch.from_numpy(np.flatnonzero(np.isin(fold_of, [held, *choice["train"]]))).to(d.x.device)
    test = torch.from_numpy(fold_of == held).to(d.x.device)[rows]
    return {"dataset": choice["dataset"], "fold": f"fold {held}" if held.isdigit() else f"{held} split", "rows": rows,
            "x": d.x, "y": d.y, "test": test, "classes": len(manifest["classes"]), "task": Task.of(manifest)}


@torch.no_grad()
def _monitor_knn(encoder, monitor, mean, std, device) -> float:
    from audiofx.training.evaluate import embed

    rows, test, task = monitor["rows"], monitor["test"], monitor["task"]
    # Embedded in slices of the held-out and training rows: indexing the whole set at once
    # would copy it (FSD50K's is ~10 GB).
    z = torch.cat([embed(encoder, monitor["x"][rows[i:i + 512]], mean, std, device) for i in range(0, len(rows), 512)])
    y = monitor["y"][rows]
    scores = knn_scores(z[~test], y[~test], z[test], monitor["classes"], k=200)
    return task.headline(scores, y[test])
