"""Frozen-encoder evaluation of a pretrained representation: a linear probe (Lin 2022, MoCo's
recipe) and weighted kNN (NPID's: k = 200, weights exp(sim / 0.07), plus k chosen by
cross-validation on the training folds), per fold, with per-class precision / recall / F1
and a confusion matrix saved with the run.

The encoder is frozen in eval mode and never receives gradients, so embeddings are computed
once and the probe trains on them; its weights are hashed before and after to prove it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from audiofx.errors import ConfigError
from audiofx.training.data import FoldSet, load_in_memory
from audiofx.training.device import autocast, pick_device, seed_everything
from audiofx.training.featureset import resolve_featureset, split_folds
from audiofx.training.finetune import channel_stats
from audiofx.training.init import resolve_init
from audiofx.training.knn import choose_k, knn_scores
from audiofx.training.metrics import per_class_report
from audiofx.training.runs import Run, default_name

MODES = ("knn", "linear")


@dataclass
class EvaluateConfig:
    run: str  # a pretrain run: npid | simclr | moco (newest), METHOD:RUN, or a checkpoint path
    dataset: str
    mode: str = "knn"
    fold: str = "all"
    store: str = "data/features"
    preset: str = "shin2021"
    key: str | None = None
    k: int = 200
    temperature: float = 0.07
    linear_epochs: int = 100
    linear_lr: float = 1e-3
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    runs_root: str = "data/runs"
    name: str | None = None


def state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def embed(encoder: torch.nn.Module, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device, batch: int = 128) -> torch.Tensor:
    encoder.eval()
    out = []
    for i in range(0, x.shape[0], batch):
        with autocast(device):
            out.append(encoder((x[i:i + batch].to(device).float() - mean) / std).float())
    return torch.cat(out)


def linear_probe(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, n_classes: int, epochs: int,
                 lr: float, batch_size: int, seed: int) -> torch.Tensor:
    """Train only a linear classifier on frozen embeddings; return test logits."""
    g = torch.Generator(device=train.device).manual_seed(seed)
    head = torch.nn.Linear(train.shape[1], n_classes).to(train.device)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        perm = torch.randperm(train.shape[0], generator=g, device=train.device)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(head(train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        return head(test)


def evaluate(cfg: EvaluateConfig, say=print) -> dict[str, Any]:
    if cfg.mode not in MODES:
        raise ConfigError(f"unknown mode {cfg.mode!r}", f"use one of {', '.join(MODES)}")
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    init = resolve_init(cfg.run, None, cfg.runs_root)
    if init.kind not in ("pretrain", "file"):
        raise ConfigError(f"--run {cfg.run!r} is not a pretrained representation", "pass npid, simclr, moco or METHOD:RUN")
    key, manifest = resolve_featureset(cfg.store, cfg.dataset, cfg.preset, cfg.key)
    if manifest["multilabel"]:
        raise ConfigError(f"{cfg.dataset} is multi-label; evaluate covers single-label datasets so far", "pick another dataset")
    plan = split_folds(list(manifest["folds"]), cfg.fold)
    name = cfg.name or default_name(cfg.mode, Path(init.source).name, cfg.dataset)
    run = Run.create(cfg.runs_root, "evaluate", name, {**dataclasses.asdict(cfg), "arch": init.arch, "key": key,
                                                       "source": init.source, "stage": "evaluate"})
    encoder = init.build().to(device)
    before = state_hash(encoder)
    folds = sorted({f for t, tr in plan for f in [t, *tr]})
    data = load_in_memory(FoldSet(cfg.store, cfg.dataset, key, folds), device=device)
    fold_of = np.array(data.fold_of)
    # Inputs standardised with the statistics the encoder was pretrained with, when recorded.
    mean, std = init.input_stats or channel_stats(data.x)
    mean, std = mean.to(device), std.to(device)
    z = embed(encoder, data.x, mean, std, device)
    y = data.y.to(device)
    n_classes = len(manifest["classes"])
    per_fold, y_true, y_pred = {}, [], []
    for test_fold, train_folds in plan:
        tr = torch.from_numpy(np.isin(fold_of, train_folds)).to(device)
        te = torch.from_numpy(fold_of == test_fold).to(device)
        if cfg.mode == "knn":
            scores = knn_scores(z[tr], y[tr], z[te], n_classes, cfg.k, cfg.temperature)
            if len(train_folds) > 1:
                best_k, cv = choose_k(z[tr].cpu(), y[tr].cpu(), fold_of[tr.cpu().numpy()], n_classes,
                                      temperature=cfg.temperature)
            else:  # one training fold (TUT/TAU, FSD50K splits): nothing to cross-validate k on
                best_k, cv = cfg.k, {}
            cv_scores = knn_scores(z[tr], y[tr], z[te], n_classes, best_k, cfg.temperature)
            result = {"acc": _acc(scores, y[te]), f"acc_k{best_k}_cv": _acc(cv_scores, y[te]), "k_cv": best_k,
                      "cv_acc": cv}
        else:
            logits = linear_probe(z[tr], y[tr], z[te], n_classes, cfg.linear_epochs, cfg.linear_lr, cfg.batch_size,
                                  cfg.seed)
            scores, result = logits, {"acc": _acc(logits, y[te])}
        per_fold[test_fold] = result
        run.save_predictions(test_fold, [c for c, f in zip(data.clips, fold_of) if f == test_fold],
                             y[te].cpu().numpy(), scores.float().cpu().numpy())
        y_true.append(y[te].cpu().numpy())
        y_pred.append(scores.argmax(1).cpu().numpy())
        run.log({"event": "fold_done", "fold": test_fold, **{k: v for k, v in result.items() if k != "cv_acc"}})
        say(f"fold {test_fold}: {cfg.mode} accuracy {100 * result['acc']:.2f}%")
    unchanged = state_hash(encoder) == before
    accs = np.array([r["acc"] for r in per_fold.values()])
    summary = {"mode": cfg.mode, "folds": per_fold, "n_folds": len(per_fold), "acc_mean": float(accs.mean()),
               "acc_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0, "encoder_unchanged": unchanged,
               "run": str(run.path)}
    report = per_class_report(np.concatenate(y_true), np.concatenate(y_pred), manifest["classes"])
    run.write_text("per_class.json", json.dumps(report, indent=1))
    run.log({"event": "summary", **{k: v for k, v in summary.items() if k not in ("folds", "run")}})
    run.write_text("summary.md", _markdown(cfg, init, summary, report))
    if not unchanged:  # a bug, not a user error: the encoder must stay frozen
        raise RuntimeError("the encoder's weights changed during a frozen evaluation")
    return summary


def _acc(scores: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores.argmax(1) == y).float().mean())


def _markdown(cfg: EvaluateConfig, init, s: dict[str, Any], report: dict[str, Any]) -> str:
    lines = [f"# {cfg.mode} evaluation of {init.source} on {cfg.dataset}", "",
             "| test fold | accuracy |", "|---|---|"]
    lines += [f"| {f} | {100 * r['acc']:.2f} |" for f, r in s["folds"].items()]
    lines += [f"| **mean ± std** ({s['n_folds']} folds) | **{100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f}** |", "",
              "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for i, c in enumerate(report["classes"]):
        lines.append(f"| {c} | {report['precision'][i]:.3f} | {report['recall'][i]:.3f} | {report['f1'][i]:.3f} | "
                     f"{report['support'][i]} |")
    lines += ["", f"Encoder weights unchanged by the evaluation: {s['encoder_unchanged']}."]
    return "\n".join(lines) + "\n"
