"""The report's figures, drawn with matplotlib's object-oriented API.

``matplotlib.figure.Figure`` renders through the Agg canvas by itself: pyplot, its global
state and any display backend are never touched, so reports work on headless machines and
inside other programs. Every function takes plain arrays and writes one PNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 110


@dataclass
class Curve:
    """One line of a per-epoch figure: the mean over folds and, with >= 2 folds, a band of
    one standard deviation across folds."""

    label: str
    epochs: np.ndarray
    mean: np.ndarray
    std: np.ndarray | None  # None (or NaN) where fewer than two folds reached the epoch


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def class_colors(n: int) -> list:
    """n distinguishable colours: tab10 / tab20, then tab20 + tab20b + tab20c (60) for sets
    like ESC-50, cycled beyond that (markers tell those apart)."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    pool = [colormaps[name](i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
    return [pool[i % len(pool)] for i in range(n)]


MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def _draw_curves(ax, curves: list[Curve], percent: bool) -> None:
    scale = 100.0 if percent else 1.0
    for curve in curves:
        (line,) = ax.plot(curve.epochs, scale * curve.mean, marker="o" if len(curve.epochs) <= 30 else None,
                          markersize=3, label=curve.label)
        if curve.std is not None and np.isfinite(curve.std).any():
            std = np.nan_to_num(curve.std)
            ax.fill_between(curve.epochs, scale * (curve.mean - std), scale * (curve.mean + std), color=line.get_color(),
                            alpha=0.2, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if percent:
        lo, hi = ax.get_ylim()
        ax.set_ylim(max(lo, 0.0), min(hi, 100.0))
    if curves:
        ax.legend(fontsize="small", loc="best")


def curves_figure(curves: list[Curve], title: str, ylabel: str, path: Path, percent: bool = False) -> Path:
    """Per-epoch lines with ±1 std bands (accuracy vs epoch, training loss)."""
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    _draw_curves(ax, curves, percent)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def pretrain_figure(losses: list[Curve], knn: list[Curve], path: Path) -> Path:
    """Pretraining loss per epoch and, when logged, the monitoring kNN score beside it
    (accuracy, or mAP for a multi-label set: each curve's label says which)."""
    fig = Figure(figsize=(12 if knn else 7, 4.5), layout="constrained")
    ax = fig.add_subplot(1, 2 if knn else 1, 1)
    _draw_curves(ax, losses, percent=False)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title("pretraining loss")
    if knn:
        ax2 = fig.add_subplot(1, 2, 2)
        _draw_curves(ax2, knn, percent=True)
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("kNN score (%)")
        ax2.set_title("weighted-kNN score on a held-out split (monitoring only)")
    return _save(fig, path)


def confusion_figure(confusion: np.ndarray, classes: list[str], title: str, path: Path) -> Path:
    """A confusion matrix (rows: true class) with colours normalised per row, so that classes
    of different sizes read alike; the counts are written in the cells when there is room."""
    confusion = np.asarray(confusion)
    n = len(classes)
    rows = confusion.sum(axis=1, keepdims=True)
    frac = np.divide(confusion, rows, out=np.zeros(confusion.shape, dtype=float), where=rows > 0)
    side = max(4.5, 0.24 * n + 2.5)  # about 0.24 inch per class: 50 classes -> 14.5 inches
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    fontsize = 9 if n <= 12 else 7
    ax.set_xticks(range(n), classes, fontsize=fontsize, rotation=45 if n <= 12 else 90,
                  ha="right" if n <= 12 else "center", rotation_mode="anchor" if n <= 12 else "default")
    ax.set_yticks(range(n), classes, fontsize=fontsize)
    ax.set_xlabel("predicted class", fontsize=10 if n <= 12 else 13)
    ax.set_ylabel("true class", fontsize=10 if n <= 12 else 13)
    ax.set_title(title, fontsize=10 if n <= 12 else 14)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=fontsize,
                            color="white" if frac[i, j] > 0.5 else "black")
    return _save(fig, path)


def tsne_figure(xy: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], title: str,
                path: Path) -> Path:
    """Two panels of the same 2-D embedding: coloured by true class and by predicted class
    (misclassified clips drawn as crosses), with one shared legend of class names."""
    n = len(classes)
    colors = class_colors(n)
    many = n > 12
    legend_rows = -(-n // 6) if many else 0
    fig = Figure(figsize=(12 if many else 12.5, 5.5 + 0.2 * legend_rows), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    wrong = y_true != y_pred
    handles = []
    for ax, labels, panel in ((axes[0], y_true, "true class"), (axes[1], y_pred, "predicted class")):
        for c in range(n):
            marker = MARKERS[(c // 20) % len(MARKERS)] if many else "o"
            right = (labels == c) & ~wrong if panel == "predicted class" else labels == c
            h = ax.scatter(xy[right, 0], xy[right, 1], s=18, color=colors[c], marker=marker, label=classes[c],
                           edgecolors="none")
            if panel == "true class":
                handles.append(h)
            else:
                miss = (labels == c) & wrong
                ax.scatter(xy[miss, 0], xy[miss, 1], s=30, color=colors[c], marker="x", linewidths=1.2)
        ax.set_title(f"coloured by {panel}" + (f" ({int(wrong.sum())} misclassified: x)" if panel != "true class" else ""),
                     fontsize=10)
        ax.set_xlabel("t-SNE 1")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].set_ylabel("t-SNE 2")
    fig.suptitle(title, fontsize=11)
    if many:
        fig.legend(handles=handles, loc="outside lower center", ncol=6, fontsize=7, markerscale=1.2, frameon=False)
    else:
        fig.legend(handles=handles, loc="outside right center", fontsize=8, markerscale=1.3, frameon=False)
    return _save(fig, path)
