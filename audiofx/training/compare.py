"""One table from several finetune / evaluate runs (the demo's closing comparison)."""

from __future__ import annotations

import json
from pathlib import Path

from audiofx.errors import ConfigError
from audiofx.training.runs import Run


def run_row(path: Path) -> tuple[str, str, str, str]:
    cfg_path, metrics_path = path / "config.json", path / "metrics.jsonl"
    if not cfg_path.is_file() or not metrics_path.is_file():
        raise ConfigError(f"{path} is not a finished run", "pass folders under data/runs/finetune or data/runs/evaluate")
    run = Run(path)
    cfg = run.config
    summary = next((r for r in reversed(run.metrics()) if r.get("event") == "summary"), None)
    if summary is None:
        raise ConfigError(f"{path} has no summary yet", "let the run finish (or --resume it)")
    if cfg["stage"] == "finetune":
        what = f"{cfg['init']} fine-tune"
        acc = f"{100 * summary['last_acc_mean']:.2f} ± {100 * summary['last_acc_std']:.2f}"
    else:
        source = Path(cfg["source"]) / "config.json"
        method = json.loads(source.read_text()).get("method", "?") if source.is_file() else Path(cfg["source"]).name
        what = f"{method} {cfg['mode']}"
        acc = f"{100 * summary['acc_mean']:.2f} ± {100 * summary['acc_std']:.2f}"
    return what, cfg["dataset"], acc, str(summary["n_folds"])


def compare_table(runs: list[Path]) -> str:
    rows = [("run", "dataset", "accuracy % (mean ± std)", "folds")] + [run_row(Path(r)) for r in runs]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
