"""Weighted k-nearest-neighbour classification on L2-normalised embeddings (Wu et al. 2018,
as in NPID's evaluation): each of the k most similar training samples votes for its class
with weight exp(similarity / temperature)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def knn_scores(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, n_classes: int,
               k: int = 200, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """(M, n_classes) vote scores for M test embeddings against N training embeddings."""
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test.shape[0], chunk):  # bound the (chunk, N) similarity matrix
        sim = test[start:start + chunk] @ train.T
        top, idx = sim.topk(k, dim=1)
        weights = (top / temperature).exp()
        votes = torch.zeros(sim.shape[0], n_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], weights)
        out.append(votes)
    return torch.cat(out)


def choose_k(train: torch.Tensor, labels: torch.Tensor, groups: np.ndarray, n_classes: int,
             candidates: tuple[int, ...] = (1, 5, 10, 20, 50, 100, 200), temperature: float = 0.07) -> tuple[int, dict[int, float]]:
    """k chosen by cross-validation on the training folds only: leave one training fold out,
    predict it from the others, average the accuracy; ties go to the smaller k."""
    acc = {}
    folds = np.unique(groups)
    for k in candidates:
        hits, total = 0, 0
        for fold in folds:
            held = torch.from_numpy(groups == fold)
            if held.all() or not held.any():
                continue
            scores = knn_scores(train[~held], labels[~held], train[held], n_classes, k, temperature)
            hits += int((scores.argmax(1) == labels[held]).sum())
            total += int(held.sum())
        acc[k] = hits / total if total else 0.0
    best = max(candidates, key=lambda k: (acc[k], -k))
    return best, acc
