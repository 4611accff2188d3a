"""Classification metrics shared by the fine-tune and evaluation stages and the report."""

from __future__ import annotations

from typing import Any

import numpy as np


def per_class_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(classes)))
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "classes": classes,
        "precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(), "support": support.tolist(),
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
