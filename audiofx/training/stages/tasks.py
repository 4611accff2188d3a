"""What a set's labels make of training and scoring: single-label (one class per clip:
softmax, cross-entropy, accuracy) or multi-label (a set of classes per clip, FSD50K:
independent sigmoids, binary cross-entropy, mAP). The stages ask the task instead of
branching on the manifest's ``multilabel`` flag themselves."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from audiofx.training.stages import metrics

METRIC_NAMES = {"acc": "accuracy", "map": "mAP"}


@dataclass(frozen=True)
class Task:
    multilabel: bool = False

    @classmethod
    def of(cls, manifest: dict) -> "Task":
        return cls(bool(manifest.get("multilabel")))

    @property
    def metric(self) -> str:
        """The headline metric's key in metrics.jsonl and summaries: acc or map."""
        return "map" if self.multilabel else "acc"

    @property
    def score_names(self) -> tuple[str, ...]:
        """The keys ``score`` returns (averaged over folds in summaries)."""
        return ("map", "map_classes", "auc", "dprime") if self.multilabel else ("acc",)

    @property
    def metric_name(self) -> str:
        return METRIC_NAMES[self.metric]

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy on class indices or soft targets (mixup); binary cross-entropy on
        multi-hot (or mixed) targets, averaged over clips and classes."""
        if self.multilabel:
            return F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return F.cross_entropy(logits.float(), target)

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """What is scored and saved per clip: the logits (single-label: argmax is the class)
        or the sigmoid posteriors (multi-label: thresholded at 0.5, ranked for mAP)."""
        return torch.sigmoid(logits.float()) if self.multilabel else logits

    def posteriors(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-sample posteriors that late fusion averages: softmax or sigmoid."""
        return torch.sigmoid(logits.float()) if self.multilabel else torch.softmax(logits.float(), dim=1)

    def predicted(self, scores: np.ndarray) -> np.ndarray:
        """Predicted labels from outputs: the top class, or every class with posterior >= 0.5."""
        scores = np.asarray(scores)
        return scores >= 0.5 if self.multilabel else scores.argmax(1)

    def score(self, scores: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> dict[str, float]:
        """The headline metric (key ``self.metric``) and, multi-label, AUC and d' beside it."""
        scores, y = _numpy(scores), _numpy(y)
        if self.multilabel:
            return metrics.multilabel_scores(y, scores)
        return {"acc": metrics.accuracy(scores, y)}

    def headline(self, scores: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
        """The headline metric alone, equal to ``score(...)[self.metric]``: what every epoch
        logs and selects on. ROC AUC and d' (one sklearn call per class: 200 on FSD50K) are
        left to the final ``score``."""
        scores, y = _numpy(scores), _numpy(y)
        if self.multilabel:
            return metrics.mean_average_precision(
                metrics.average_precision_per_class(np.asarray(y, dtype=bool), np.asarray(scores, dtype=np.float64)))
        return metrics.accuracy(scores, y)

    def report(self, y_true: np.ndarray, scores: np.ndarray, classes: list[str]) -> dict:
        return metrics.per_class_report(y_true, self.predicted(scores), classes,
                                        scores=scores if self.multilabel else None)


def _numpy(t) -> np.ndarray:
    return t.detach().float().cpu().numpy() if isinstance(t, torch.Tensor) and t.is_floating_point() else \
        (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
