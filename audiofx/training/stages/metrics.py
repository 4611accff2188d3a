"""Classification metrics shared by the fine-tune and evaluation stages and the report.

Single-label sets are scored by accuracy; multi-label sets (FSD50K) by mean average
precision over classes (macro mAP, the FSD50K paper's headline), with the ROC AUC and
d' = sqrt(2) * Phi^-1(AUC) (AudioSet's d-prime) beside it. A class without a positive clip
in the scored set has no average precision and one without a negative has no AUC: such
classes are left out of the macro averages (a small test split does not hold every class),
and the number of classes averaged is reported."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def accuracy(scores: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(scores).argmax(1) == np.asarray(y)).mean())


def average_precision_per_class(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(classes,) average precision of each class's scores against its labels; NaN for a class
    without a positive clip (its precision-recall curve is undefined)."""
    from sklearn.metrics import average_precision_score

    y_true, scores = np.asarray(y_true, dtype=bool), np.asarray(scores, dtype=np.float64)
    out = np.full(y_true.shape[1], np.nan)
    for c in np.flatnonzero(y_true.any(axis=0)):
        out[c] = average_precision_score(y_true[:, c], scores[:, c])
    return out


def mean_average_precision(ap: np.ndarray) -> float:
    """Macro mAP of per-class APs, over the classes with a positive clip (NaN if none has)."""
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else math.nan


def multilabel_scores(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """mAP, macro ROC AUC and d' of (clips, classes) scores against bool labels."""
    from scipy.stats import norm
    from sklearn.metrics import roc_auc_score

    y_true, scores = np.asarray(y_true, dtype=bool), np.asarray(scores, dtype=np.float64)
    ap = average_precision_per_class(y_true, scores)
    both = np.flatnonzero(y_true.any(axis=0) & (~y_true).any(axis=0))
    auc = float(np.mean([roc_auc_score(y_true[:, c], scores[:, c]) for c in both])) if len(both) else math.nan
    return {
        "map": mean_average_precision(ap),
        "map_classes": int(np.isfinite(ap).sum()),
        "auc": auc,
        "dprime": float(math.sqrt(2.0) * norm.ppf(auc)) if math.isfinite(auc) else math.nan,
    }


def per_class_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str],
                     scores: np.ndarray | None = None) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support. Single-label (y_true of shape (n,)): and the
    confusion matrix. Multi-label (y_true and y_pred (n, classes) bool, ``scores`` the
    posteriors): and each class's average precision (None without a positive clip); support
    counts the clips that carry the class."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(classes)))
    multilabel = np.asarray(y_true).ndim == 2
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=None if multilabel else labels,
                                                       zero_division=0)
    out: dict[str, Any] = {
        "classes": classes,
        "precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(), "support": support.tolist(),
    }
    if multilabel:
        if scores is None:
            raise ValueError("a multi-label report needs the scores for the average precision")
        ap = average_precision_per_class(y_true, scores)
        out["multilabel"] = True
        out["average_precision"] = [None if math.isnan(v) else float(v) for v in ap]
    else:
        out["confusion"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def mean_std(per_fold: dict[str, dict[str, float]], names) -> dict[str, float]:
    """``<name>_mean`` and ``<name>_std`` over folds (sample std, ddof=1; 0 for one fold)."""
    out = {}
    for name in names:
        values = np.array([f[name] for f in per_fold.values()], dtype=float)
        out[f"{name}_mean"] = float(values.mean())
        out[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def per_class_markdown(report: dict[str, Any]) -> list[str]:
    """A per-class table of a per_class_report, with a macro-average row; multi-label reports
    add each class's average precision (– for a class without a positive clip)."""
    ap = report.get("average_precision")
    head = "| class | precision | recall | F1 | support |" + (" AP |" if ap is not None else "")
    lines = [head, "|---" * head.count(" |") + "|"]
    for i, c in enumerate(report["classes"]):
        row = (f"| {c} | {report['precision'][i]:.3f} | {report['recall'][i]:.3f} | {report['f1'][i]:.3f} | "
               f"{report['support'][i]} |")
        lines.append(row + (f" {'–' if ap[i] is None else f'{ap[i]:.3f}'} |" if ap is not None else ""))
    macro = [float(np.mean(report[k])) for k in ("precision", "recall", "f1")]
    row = f"| *macro average* | {macro[0]:.3f} | {macro[1]:.3f} | {macro[2]:.3f} | {sum(report['support'])} |"
    if ap is not None:
        scored = [v for v in ap if v is not None]
        row += f" {np.mean(scored):.3f} |" if scored else " – |"
    lines.append(row)
    return lines
