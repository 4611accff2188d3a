"""One table from several finetune / evaluate runs (the demo's closing comparison)."""

from __future__ import annotations

import json
from pathlib import Path

from audiofx.errors import ConfigError
from audiofx.training.stages.runs import Run, headline
from audiofx.training.stages.weights import LOGMEL, RANDOM


def run_row(path: Path) -> tuple[str, str, str, str]:
    cfg_path, metrics_path = path / "config.json", path / "metrics.jsonl"
    if not cfg_path.is_file() or not metrics_path.is_file():
        raise ConfigError(f"{path} is not a finished run", "pass folders under data/runs/finetune or data/runs/evaluate")
    run = Run(path)
    cfg = run.config
    summary = run.summary()
    if summary is None:
        raise ConfigError(f"{path} has no summary yet", "let the run finish (or --resume it)")
    if cfg["stage"] == "finetune":
        what = f"{cfg['init']} fine-tune"
    elif cfg.get("run") == RANDOM:  # evaluate's baseline
        what = f"random-init {cfg['mode']}"
    elif cfg.get("run") == LOGMEL:  # evaluate's other reference, no network
        what = f"log-mel {cfg['mode']}"
    else:
        source = Path(cfg["source"]) / "config.json"
        method = json.loads(source.read_text()).get("method", "?") if source.is_file() else Path(cfg["source"]).name
        what = f"{method} {cfg['mode']}"
    h = headline(summary)
    score = h.text() if h.metric == "acc" else f"{h.metric_name} {h.text()}"
    return what, cfg["dataset"], score, str(h.folds)


def compare_table(runs: list[Path]) -> str:
    """Fine-tuning's last-epoch and evaluation's score; multi-label sets' mAP is named in its cell."""
    body = [run_row(Path(r)) for r in runs]
    what = "accuracy" if all(row[2][0].isdigit() for row in body) else "score"  # mAP cells are named
    rows = [("run", "dataset", f"{what} % (mean ± std)", "folds"), *body]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
