"""Weighted k-nearest-neighbour classification on L2-normalised embeddings (Wu et al. 2018,
as in NPID's evaluation): each of the k most similar training samples votes for its class
with weight exp(similarity / temperature). For multi-label sets every neighbour votes for
each class it carries, and a clip's score for a class is the weighted fraction of its
neighbours that carry it (in [0, 1], so scores rank across clips for mAP)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _neighbours(train: torch.Tensor, test: torch.Tensor, k: int, chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(similarities, indices) of each test row's k most similar training rows, most similar
    first, in chunks of test rows (bounding the (chunk, N) similarity matrix)."""
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float(), dim=1)
    k = min(k, train.shape[0])
    for start in range(0, test.shape[0], chunk):
        yield (test[start:start + chunk] @ train.T).topk(k, dim=1)


def _votes(top: torch.Tensor, idx: torch.Tensor, train_labels: torch.Tensor, n_classes: int,
           temperature: float) -> torch.Tensor:
    weights = (top / temperature).exp()
    if train_labels.dim() == 2:  # multi-hot: weighted fraction of neighbours with each class
        votes = torch.einsum("mk,mkc->mc", weights, train_labels[idx].float())
        return votes / weights.sum(1, keepdim=True)
    votes = torch.zeros(top.shape[0], n_classes, device=top.device)
    return votes.scatter_add_(1, train_labels[idx], weights)


def knn_scores(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, n_classes: int,
               k: int = 200, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """(M, n_classes) vote scores for M test embeddings against N training embeddings;
    ``train_labels`` (N,) class indices or (N, n_classes) multi-hot."""
    return torch.cat([_votes(top, idx, train_labels, n_classes, temperature)
                      for top, idx in _neighbours(train, test, k, chunk)])


def _accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    return float((scores.argmax(1) == labels).float().mean())


# The k tried by cross-validation: a grid dense enough to find the K of each paper's own search
# (Lin 2022: 18 to 200) within a few percent of it.
K_CANDIDATES = (1, 2, 3, 5, 7, 10, 15, 20, 25, 35, 50, 70, 100, 150, 200)


def cv_groups(train_folds: list[str], fold_of: np.ndarray, labels: torch.Tensor, seed: int = 0,
              splits: int = 5) -> np.ndarray:
    """The groups that cross-validation on the training rows leaves out one at a time: their
    folds when there are several; for one training fold (DCASE 2013's official two, a
    train/test split without val) ``splits`` stratified seeded parts of it (plain parts for
    multi-label rows, or when a class has fewer rows than parts)."""
    if len(train_folds) > 1:
        return fold_of
    from sklearn.model_selection import KFold, StratifiedKFold

    y = labels.cpu().numpy()
    n = len(y)
    if n < 2:  # nothing to leave out: one group, which cross-validation skips
        return np.zeros(n, dtype=int)
    splits = max(2, min(splits, n))
    counts = np.bincount(y) if y.ndim == 1 else np.zeros(1)
    stratify = y.ndim == 1 and counts[counts > 0].min() >= splits
    splitter = (StratifiedKFold if stratify else KFold)(n_splits=splits, shuffle=True, random_state=seed)
    groups = np.zeros(n, dtype=int)
    for i, (_, held) in enumerate(splitter.split(np.zeros(n), y if stratify else None)):
        groups[held] = i
    return groups


def choose_k(train: torch.Tensor, labels: torch.Tensor, groups: np.ndarray, n_classes: int,
             candidates: tuple[int, ...] = K_CANDIDATES, temperature: float = 0.07,
             score: Callable[[torch.Tensor, torch.Tensor], float] = _accuracy, chunk: int = 1024,
             held_out: Sequence[Any] | None = None) -> tuple[int | None, dict[int, float]]:
    """k chosen by cross-validation on the training folds only: leave one training fold out,
    predict it from the others, average ``score`` (accuracy; mAP for multi-label sets) over
    the held-out folds weighted by their size; ties go to the smaller k. The neighbours are
    searched once per held-out fold for the largest k; smaller k take a prefix of them.
    (None, {}) when no group could be held out (too few training rows): nothing was chosen."""
    totals = dict.fromkeys(candidates, 0.0)
    counted = 0
    for fold in (np.unique(groups) if held_out is None else held_out):
        held = torch.from_numpy(groups == fold).to(train.device)
        if held.all() or not held.any():
            continue
        n = int(held.sum())
        neighbours = list(_neighbours(train[~held], train[held], max(candidates), chunk))
        for k in candidates:
            scores = torch.cat([_votes(top[:, :k], idx[:, :k], labels[~held], n_classes, temperature)
                                for top, idx in neighbours])
            totals[k] += score(scores, labels[held]) * n
        counted += n
    if not counted:
        return None, {}
    acc = {k: totals[k] / counted for k in candidates}
    best = max(candidates, key=lambda k: (acc[k], -k))
    return best, acc
