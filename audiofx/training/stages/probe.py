"""The linear probe on frozen embeddings: what a representation separates linearly.

The embeddings are standardised with the training folds' mean and standard deviation per
dimension (pooled features after a ReLU are small, skewed and of very different scales;
unstandardised, a probe measures its optimiser more than the features). Then:

- ``lbfgs`` (the default): logistic regression (softmax, or one sigmoid per class for
  multi-label sets) solved to convergence, full batch, by torch's L-BFGS with a strong-Wolfe
  line search: a convex problem with one optimum, so no learning rate or epoch budget to
  tune, on the GPU when there is one. It agrees with scikit-learn's LogisticRegression on
  the same data (tested) and runs several times faster here. Its L2 strength
  (``weight_decay``: the penalty lambda/2 ||W||^2 beside the mean loss, as an optimiser's weight
  decay) is chosen by cross-validation on the training folds (leave one training fold out,
  as kNN's k; the penalties from strongest to weakest, each fit starting from the last)
  unless given;
- ``sgd`` (the papers' recipe): a linear layer trained with Adam for ``epochs`` epochs on a
  cosine schedule, logging each epoch; the test fold is never used to select anything.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from audiofx.training.stages.tasks import Task

PROBES = ("lbfgs", "sgd")
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # cross-validated unless --weight-decay is given
DEFAULT_WEIGHT_DECAY = 1e-2  # when nothing can be held out (a training split of one clip)
MAX_ITER = 1000  # L-BFGS iterations; it stops earlier once converged


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Each of ``train, *others`` standardised with ``train``'s per-dimension statistics."""
    mean = train.float().mean(0, keepdim=True)
    std = train.float().std(0, keepdim=True).clamp_min(1e-6)
    return [(t.float() - mean) / std for t in (train, *others)]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float, task: Task = Task(),
                 start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) minimising the mean loss + lambda/2 ||W||^2 on ``x`` (already standardised);
    ``start``: a solution to begin from (a warm start along a path of penalties)."""
    W = torch.zeros(x.shape[1], n_classes, device=x.device) if start is None else start[0].clone()
    b = torch.zeros(n_classes, device=x.device) if start is None else start[1].clone()
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=MAX_ITER, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = task.loss(x @ W + b, y) + weight_decay / 2 * (W * W).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach(), b.detach()


def choose_weight_decay(train: torch.Tensor, y: torch.Tensor, groups: np.ndarray, n_classes: int,
                        task: Task = Task(), candidates: tuple[float, ...] = WEIGHT_DECAYS,
                        held_out: Sequence[Any] | None = None) -> tuple[float, dict[float, float]]:
    """lambda chosen on the training folds only: leave one training fold out (or only the
    ``held_out`` groups: a validation split), the headline score (accuracy, mAP) weighted by
    fold size; ties go to the stronger penalty."""
    totals, counted = dict.fromkeys(candidates, 0.0), 0
    for fold in (np.unique(groups) if held_out is None else held_out):
        held = torch.from_numpy(groups == fold).to(train.device)
        if held.all() or not held.any():
            continue
        a, b = standardise(train[~held], train[held])
        solution = None
        for wd in sorted(candidates, reverse=True):  # strongest penalty first, each fit warm-starting the next
            solution = fit_logistic(a, y[~held], n_classes, wd, task, solution)
            totals[wd] += task.headline(task.outputs(b @ solution[0] + solution[1]), y[held]) * int(held.sum())
        counted += int(held.sum())
    if not counted:
        return DEFAULT_WEIGHT_DECAY, {}
    acc = {wd: totals[wd] / counted for wd in candidates}
    return max(candidates, key=lambda wd: (acc[wd], wd)), acc


def lbfgs_probe(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, n_classes: int,
                weight_decay: float, task: Task = Task()) -> torch.Tensor:
    """Test logits of logistic regression fitted on the standardised training embeddings."""
    a, b = standardise(train, test)
    W, bias = fit_logistic(a, y_train, n_classes, weight_decay, task)
    return b @ W + bias


def sgd_probe(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, n_classes: int, epochs: int,
              lr: float, weight_decay: float, batch_size: int, seed: int, task: Task = Task(),
              on_epoch: Callable[[int, float, torch.Tensor], None] | None = None) -> torch.Tensor:
    """A linear layer trained on the standardised embeddings; test logits. After each epoch
    ``on_epoch(epoch, mean training loss, test logits)`` (to log; nothing is selected)."""
    train, test = standardise(train, test)
    g = torch.Generator(device=train.device).manual_seed(seed)
    head = torch.nn.Linear(train.shape[1], n_classes).to(train.device)
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        perm = torch.randperm(train.shape[0], generator=g, device=train.device)
        total = torch.zeros((), device=train.device)  # summed on the device: no sync per batch
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = task.loss(head(train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        sched.step()
        if on_epoch:
            with torch.no_grad():
                on_epoch(epoch + 1, float(total) / len(perm), head(test))
    with torch.no_grad():
        return head(test)
