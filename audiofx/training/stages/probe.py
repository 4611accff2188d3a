"""The linear probe on frozen embeddings: what a representation separates linearly.

The embeddings are standardised with the training folds' mean and standard deviation per
dimension (pooled features after a ReLU are small, skewed and of very different scales;
unstandardised, a probe measures its optimiser more than the features). Then:

- ``lbfgs`` (the default, single-label sets): multinomial logistic regression solved to
  convergence by scikit-learn's L-BFGS, a convex problem with one optimum, so no learning
  rate or epoch budget to tune. Its L2 strength (``weight_decay``, the same lambda as an
  optimiser's: the penalty lambda/2 ||W||^2 beside the mean loss) is chosen by cross-validation
  on the training folds (leave one training fold out, as kNN's k) unless given;
- ``sgd`` (the papers' recipe, and multi-label sets): a linear layer trained with Adam for
  ``epochs`` epochs on a cosine schedule, logging each epoch; the test fold is never used to
  select anything.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch

from audiofx.training.stages.tasks import Task

PROBES = ("lbfgs", "sgd")
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # cross-validated unless --weight-decay is given
MAX_ITER = 1000  # L-BFGS iterations; it stops earlier once converged


def standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Each of ``train, *others`` standardised with ``train``'s per-dimension statistics."""
    mean = train.float().mean(0, keepdim=True)
    std = train.float().std(0, keepdim=True).clamp_min(1e-6)
    return [(t.float() - mean) / std for t in (train, *others)]


def _logistic(train: np.ndarray, y: np.ndarray, weight_decay: float, seed: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    # sklearn minimises ||W||^2 / 2 + C * sum(loss): C = 1 / (lambda * n) is lambda per sample
    model = LogisticRegression(C=1.0 / (weight_decay * len(train)), max_iter=MAX_ITER, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the iteration cap is a cap, not an error
        return model.fit(train, y)


def _scores(model, test: np.ndarray, n_classes: int) -> np.ndarray:
    """(M, n_classes) logits, with a very low score for classes the training folds lack."""
    out = np.full((len(test), n_classes), -1e9, dtype=np.float32)
    logits = model.decision_function(test)
    if logits.ndim == 1:  # two classes: sklearn gives one column, the second class's margin
        logits = np.stack([-logits / 2, logits / 2], axis=1)
    out[:, model.classes_] = logits
    return out


def choose_weight_decay(train: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int,
                        candidates: tuple[float, ...] = WEIGHT_DECAYS) -> tuple[float, dict[float, float]]:
    """lambda chosen on the training folds only: leave one training fold out, accuracy weighted
    by fold size; ties go to the stronger penalty."""
    totals, counted = dict.fromkeys(candidates, 0.0), 0
    for fold in np.unique(groups):
        held = groups == fold
        if held.all() or len(np.unique(y[~held])) < 2:
            continue
        a, b = standardise(torch.from_numpy(train[~held]), torch.from_numpy(train[held]))
        for wd in candidates:
            model = _logistic(a.numpy(), y[~held], wd, seed)
            totals[wd] += float((model.predict(b.numpy()) == y[held]).sum())
        counted += int(held.sum())
    acc = {wd: totals[wd] / counted if counted else 0.0 for wd in candidates}
    return max(candidates, key=lambda wd: (acc[wd], wd)), acc


def lbfgs_probe(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, n_classes: int,
                weight_decay: float, seed: int) -> torch.Tensor:
    """Test logits of logistic regression fitted on the standardised training embeddings."""
    a, b = standardise(train.cpu(), test.cpu())
    model = _logistic(a.numpy(), y_train.cpu().numpy(), weight_decay, seed)
    return torch.from_numpy(_scores(model, b.numpy(), n_classes)).to(test.device)


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
