"""Supervised fine-tuning with k-fold cross-validation on the official folds (Shin et al.
2021 after Palanisamy et al. 2020): for each test fold, train on the other folds and
evaluate on it after every epoch. The headline is the last-epoch accuracy; the best-epoch
accuracy is reported too, labelled as selected on the test fold (it is optimistic).

Zhou et al. 2019's options (any dataset): ``fragments`` cuts every clip into N time
fragments and ``channel_fusion`` makes every channel its own sample; both train on the
samples as independent examples with the clip's label and, at test, average the softmax
posteriors of a clip's samples, so accuracy and saved predictions are per clip. ``head``
picks the linear or the MLP-attention head (models.py)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from audiofx.errors import ConfigError
from audiofx.training.augment import Augment
from audiofx.training.data import FoldSet, InMemoryLoader, load_in_memory
from audiofx.training.device import autocast, prepare_model, seed_everything
from audiofx.training.distributed import Ranks, run_on_ranks, wrap
from audiofx.training.featureset import resolve_featureset, split_folds
from audiofx.training.fusion import expand_channels, fuse_posteriors, split_fragments
from audiofx.training.init import resolve_init
from audiofx.training.metrics import per_class_report
from audiofx.training.models import HEADS, Classifier, check_input_size
from audiofx.training.runs import Run, default_name, open_run, recipe


@dataclass
class FinetuneConfig:
    dataset: str
    init: str = "scratch"
    store: str = "data/features"
    preset: str = "shin2021"
    key: str | None = None
    arch: str | None = None  # default resnet50, or the pretrain run's arch
    weights: str | None = None  # ImageNet checkpoint file
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
    seed: int = 0
    device: str = "auto"
    runs_root: str = "data/runs"
    name: str | None = None
    resume: bool = False
    progress: bool = True

    def to_json(self) -> dict[str, Any]:
        return recipe(self)


def channel_stats(x: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of (N, C, F, T) float16 features, accumulated in float64 in
    chunks. Inputs are standardised with the training folds' statistics only."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    sq = torch.zeros_like(total)
    for i in range(0, x.shape[0], chunk):
        part = x[i:i + chunk].double()
        total += part.sum(dim=(0, 2, 3))
        sq += (part * part).sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    std = (sq / n - mean * mean).clamp_min(1e-12).sqrt()
    return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


@torch.no_grad()
def predict(model: torch.nn.Module, data, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
            batch_size: int = 64) -> torch.Tensor:
    """Logits of every sample of an in-memory set, in order."""
    from audiofx.training.evaluate import embed

    return embed(model, data.x, mean, std, device, batch_size).cpu()


def subset(data, mask: torch.Tensor):
    """The rows of an in-memory set selected by a boolean mask."""
    keep = mask.nonzero().flatten().tolist()
    return dataclasses.replace(
        data, x=data.x[mask], y=data.y[mask], index=data.index[mask],
        clips=[data.clips[i] for i in keep], fold_of=[data.fold_of[i] for i in keep],
    )


# The options added after the first runs, at their defaults: a run started before they existed
# has no such keys in its config.json and behaves exactly as these values, so it may resume.
_LATER_OPTIONS = {"fragments": 1, "channel_fusion": False, "head": "linear"}


def _config_for(cfg: FinetuneConfig, config: dict[str, Any]) -> dict[str, Any]:
    """The config to record or, on --resume, to compare with the run's config.json; the
    later options at their defaults are left out of the comparison with an older run."""
    old = Path(cfg.runs_root) / "finetune" / (cfg.name or "") / "config.json"
    if not (cfg.resume and cfg.name and old.is_file()):
        return config
    recorded = json.loads(old.read_text())
    return {k: v for k, v in config.items() if not (k in _LATER_OPTIONS and k not in recorded
                                                     and v == _LATER_OPTIONS[k])}


def standardise_(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(x - mean) / std in place, in chunks (computed in float32, stored in x's dtype)."""
    for i in range(0, x.shape[0], chunk):
        x[i:i + chunk] = ((x[i:i + chunk].float() - mean) / std).to(x.dtype)
    return x


def zhou_samples(data, fragments: int, channel_fusion: bool, stats=None):
    """A set's clips as Zhou et al.'s samples: ``(samples, clip_index, loop_stats, stats)``.

    Fragments first (``split_fragments``), then channels (``expand_channels``); every sample
    carries its clip's label and ``clip_index[k]`` is the clip (row of ``data``) of sample k.
    ``stats`` are the training set's per-channel (mean, std), computed here when None (the
    training set itself, over its fragments). With channel fusion a sample's 3 channels are
    copies of one source channel, so inputs are standardised here, before the expansion, with
    that source channel's statistics, and the returned (mean, std) for the training loop are
    (0, 1); otherwise they are the per-channel statistics, applied per batch as usual.
    ``stats`` (the per-channel statistics) are returned too, for the test set and the checkpoint.
    """
    x, clip_index = split_fragments(data.x, fragments)
    mean, std = stats if stats is not None else channel_stats(x)
    loop_stats = (mean, std)
    if channel_fusion:
        # The subset is this fold's own copy, and split_fragments copies when fragments > 1:
        # clone only when x is still the caller's tensor, then standardise in place (float16).
        x = standardise_(x.clone() if x is data.x else x, mean, std)
        x, channel_index = expand_channels(x)
        clip_index = clip_index[channel_index]
        loop_stats = (torch.zeros(1, 1, 1, 1, device=x.device), torch.ones(1, 1, 1, 1, device=x.device))
    rows = clip_index.tolist()
    samples = dataclasses.replace(
        data, x=x, y=data.y[clip_index.to(data.y.device)], index=torch.arange(len(rows), device=data.index.device),
        clips=[data.clips[i] for i in rows], fold_of=[data.fold_of[i] for i in rows],
    )
    return samples, clip_index, loop_stats, (mean, std)


def summarize(per_fold: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; 0 for one fold) over folds."""
    out: dict[str, Any] = {"folds": per_fold, "n_folds": len(per_fold)}
    for metric in ("last_acc", "best_acc"):
        values = np.array([f[metric] for f in per_fold.values()], dtype=float)
        out[f"{metric}_mean"] = float(values.mean())
        out[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def finetune(cfg: FinetuneConfig, say=print) -> dict[str, Any]:
    return run_on_ranks(_finetune, cfg, say)


def _finetune(cfg: FinetuneConfig, ranks: Ranks, device: torch.device, say) -> dict[str, Any]:
    key, manifest = resolve_featureset(cfg.store, cfg.dataset, cfg.preset, cfg.key)
    if manifest["multilabel"]:
        raise ConfigError(f"{cfg.dataset} is multi-label; fine-tuning covers single-label datasets so far",
                          "use it for pretraining (audiofx pretrain --datasets fsd50k)")
    if cfg.head not in HEADS:
        raise ConfigError(f"unknown head {cfg.head!r}", f"use one of {', '.join(HEADS)}")
    if cfg.fragments < 1:
        raise ConfigError(f"--fragments must be at least 1, got {cfg.fragments}", "pass 1 (whole clips) or more")
    init = resolve_init(cfg.init, cfg.arch, cfg.runs_root, Path(cfg.weights) if cfg.weights else None)
    _, bins, frames = (int(v) for v in manifest["shape"])
    if frames // cfg.fragments < 1:
        raise ConfigError(f"cannot cut {frames} frames into {cfg.fragments} fragments", f"use --fragments {frames} or fewer")
    check_input_size(init.arch, bins, frames // cfg.fragments)  # before loading anything
    plan = split_folds(list(manifest["folds"]), cfg.fold)
    name = cfg.name or default_name(cfg.init.replace(":", "-").replace("/", "_")[:40], cfg.dataset)
    config = {**cfg.to_json(), "arch": init.arch, "key": key, "init_source": init.source, "stage": "finetune"}
    run = open_run(ranks, cfg.runs_root, "finetune", name, _config_for(cfg, config), cfg.resume)
    say(f"finetune {cfg.dataset} ({key}) from {init.kind} ({init.source}), {init.arch}{_zhou_note(cfg)}, "
        f"{len(plan)} fold(s), {cfg.epochs} epochs on {device}{f' x {ranks.world} ranks' if ranks.active else ''} "
        f"-> {run.path}")

    all_folds = sorted({f for t, train in plan for f in [t, *train]}, key=lambda f: (not f.isdigit(), f.zfill(4)))
    data = load_in_memory(FoldSet(cfg.store, cfg.dataset, key, all_folds), device=device)
    fold_of = np.array(data.fold_of)
    n_classes = len(manifest["classes"])
    done = {r["fold"]: r for r in run.metrics() if r.get("event") == "fold_done"}
    per_fold: dict[str, dict[str, float]] = {}
    for test_fold, train_folds in plan:
        if test_fold in done:
            per_fold[test_fold] = {k: done[test_fold][k] for k in ("last_acc", "best_acc", "best_epoch")}
            say(f"fold {test_fold}: already done (last {100 * per_fold[test_fold]['last_acc']:.2f}%)")
            continue
        train = subset(data, torch.from_numpy(np.isin(fold_of, train_folds)))
        test = subset(data, torch.from_numpy(fold_of == test_fold))
        per_fold[test_fold] = _train_fold(cfg, init, run, train, test, n_classes, test_fold, device, ranks, say)
    summary = summarize(per_fold)
    predictions = run.predictions()
    if ranks.main and predictions:  # last-epoch predictions of every test fold, pooled
        report = per_class_report(np.concatenate([p["y_true"] for p in predictions.values()]),
                                  np.concatenate([p["y_pred"] for p in predictions.values()]), manifest["classes"])
        run.write_text("per_class.json", json.dumps(report, indent=1))
    run.log({"event": "summary", **{k: v for k, v in summary.items() if k != "folds"}})
    run.write_text("summary.md", summary_markdown(cfg, init.arch, key, summary))
    summary["run"] = str(run.path)
    return summary


def _zhou_note(cfg: FinetuneConfig) -> str:
    """What the printed and written summaries say about the non-default Zhou et al. options."""
    parts = [f"{cfg.head} head"] if cfg.head != "linear" else []
    parts += [f"{cfg.fragments} fragments"] if cfg.fragments > 1 else []
    parts += ["channel fusion"] if cfg.channel_fusion else []
    fused = "; posteriors averaged per clip" if cfg.fragments > 1 or cfg.channel_fusion else ""
    return f" ({', '.join(parts)}{fused})" if parts else ""


def _train_fold(cfg, init, run: Run, train, test, n_classes: int, fold: str, device, ranks: Ranks, say) -> dict[str, float]:
    from tqdm import tqdm

    seed_everything(cfg.seed)
    model = prepare_model(Classifier(init.build(), n_classes, head=cfg.head), device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    y_test = test.y.cpu()  # per clip, whatever the samples are
    test_clips, test_index = test.clips, None
    if cfg.fragments == 1 and not cfg.channel_fusion:  # whole clips: the original path, unchanged
        mean, std = channel_stats(train.x)
        saved_stats = (mean, std)
    else:  # samples are fragments and/or channels; test predictions are fused back per clip
        train, _, (mean, std), saved_stats = zhou_samples(train, cfg.fragments, cfg.channel_fusion)
        test, test_index, _, _ = zhou_samples(test, cfg.fragments, cfg.channel_fusion, stats=saved_stats)
    start, best, history = 0, (-1.0, -1), []
    tag = f"fold-{fold}"
    ckpt = run.load_checkpoint(tag) if cfg.resume else None
    if ckpt:
        model.load_state_dict(ckpt["states"]["model"])
        opt.load_state_dict(ckpt["states"]["optimizer"])
        sched.load_state_dict(ckpt["states"]["scheduler"])
        torch.set_rng_state(ckpt["states"]["rng"])
        start, history = ckpt["meta"]["epoch"] + 1, ckpt["meta"]["history"]
        best = max(((a, e) for e, a in enumerate(history)), default=best)
        # Epochs logged after the checkpoint (a kill between the two) are done again.
        run.drop_records(lambda r: r.get("event") == "epoch" and r.get("fold") == fold and r["epoch"] > start)
        say(f"fold {fold}: resuming after epoch {start}")
    loader = InMemoryLoader(train, cfg.batch_size, shuffle=True, drop_last=False, seed=cfg.seed, rank=ranks.rank,
                            world_size=ranks.world)
    trained = wrap(model, ranks, device)  # DDP averages gradients across ranks; `model` stays the plain module
    augment = dataclasses.replace(cfg.augment, n_classes=n_classes)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    for epoch in range(start, cfg.epochs):
        model.train()
        loader.set_epoch(epoch)
        gen.manual_seed(cfg.seed * 100003 + epoch)
        seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
        bar = tqdm(loader, desc=f"fold {fold} epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False,
                   disable=not cfg.progress or not ranks.main)
        for batch in bar:
            x = (batch.x.to(device).float() - mean) / std
            x, target = augment(x, batch.y.to(device), generator=gen)
            with autocast(device):
                logits = trained(x)
            loss = F.cross_entropy(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += x.shape[0]
            loss_sum += loss.item() * x.shape[0]
            bar.set_postfix(samples_s=f"{seen / (time.perf_counter() - t0):.0f}", loss=f"{loss_sum / seen:.3f}")
        sched.step()
        scores = predict(model, test, mean, std, device)
        if test_index is not None:  # mean softmax posterior of each clip's fragments x channels
            scores = fuse_posteriors(scores, test_index.cpu(), len(test_clips))
        acc = float((scores.argmax(1) == y_test).float().mean())
        history.append(acc)
        if acc > best[0]:
            best = (acc, epoch)
        run.save_checkpoint(tag, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                  "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
                                  "mean": saved_stats[0].cpu(), "std": saved_stats[1].cpu()},
                            {"epoch": epoch, "history": history, "arch": init.arch, "fold": fold})
        run.log({"event": "epoch", "fold": fold, "epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                 "test_acc": acc, "lr": sched.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 2)})
    if start < cfg.epochs:  # a fold resumed after its last epoch has its predictions already
        run.save_predictions(fold, test_clips, y_test.numpy(), scores.numpy())
    result = {"last_acc": history[-1], "best_acc": best[0], "best_epoch": best[1] + 1}
    run.log({"event": "fold_done", "fold": fold, **result})
    say(f"fold {fold}: last-epoch {100 * result['last_acc']:.2f}%, best {100 * result['best_acc']:.2f}% "
        f"(epoch {result['best_epoch']}, selected on the test fold)")
    return result


def summary_markdown(cfg: FinetuneConfig, arch: str, key: str, s: dict[str, Any]) -> str:
    lines = [f"# finetune {cfg.dataset} from {cfg.init}", "",
             f"{arch}{_zhou_note(cfg)}, {cfg.epochs} epochs, batch {cfg.batch_size}, Adam lr {cfg.lr}, weight decay {cfg.weight_decay}, "
             f"features {key}", "",
             "| test fold | last-epoch acc | best-epoch acc* | best epoch |", "|---|---|---|---|"]
    for fold, r in s["folds"].items():
        lines.append(f"| {fold} | {100 * r['last_acc']:.2f} | {100 * r['best_acc']:.2f} | {r['best_epoch']} |")
    lines.append(f"| **mean ± std** ({s['n_folds']} folds) | **{100 * s['last_acc_mean']:.2f} ± {100 * s['last_acc_std']:.2f}** "
                 f"| {100 * s['best_acc_mean']:.2f} ± {100 * s['best_acc_std']:.2f} | |")
    lines += ["", "*best-epoch accuracy is selected on the test fold and therefore optimistic; the headline is the "
              "last-epoch accuracy. Standard deviation is over folds (ddof=1)."]
    return "\n".join(lines) + "\n"
