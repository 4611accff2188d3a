"""Run folders: data/runs/<stage>/<name>/ with config.json, metrics.jsonl, checkpoints/ and
summary.md. Checkpoints hold only state dicts and plain metadata, so they load with
``torch.load(weights_only=True)`` and never unpickle code."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from audiofx.errors import ConfigError
from audiofx.training.models.state_files import load_state_file
from audiofx.training.runtime.distributed import Ranks, barrier
from audiofx.training.stages.tasks import METRIC_NAMES

STAGES = ("pretrain", "finetune", "evaluate")
# Recorded, not compared on --resume: the memory budget only picks the data mode, and the
# mode (which decides the batch order) is recorded and compared itself.
UNCHECKED = ("memory_budget_gb",)


def _shown(value: Any) -> str:
    """A setting as the message about a changed one shows it (None: the option was left to its default)."""
    if value is None:
        return "default"
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _change(key: str, old: Any, new: Any) -> str:
    """One changed setting as the message shows it; of a group (a dict) the fields that differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return "; ".join(_change(f"{key}.{k}", old.get(k), new.get(k))
                         for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
    return f"{key} {_shown(old)}, now {_shown(new)}"


@dataclass
class Run:
    path: Path
    readonly: bool = False  # ranks other than 0 of a distributed run read but never write

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def create(cls, root: str | Path, stage: str, name: str, config: dict[str, Any], resume: bool = False,
               extendable: tuple[str, ...] = (), later: dict[str, Any] | None = None) -> "Run":
        """Create a run folder, or on ``resume`` check that the settings are the recorded ones.

        - A setting named in ``extendable`` (fine-tuning's ``epochs``) may grow on resume: the
          run continues to the new value and config.json records it.
        - ``later``: settings added after the first runs, each with the value that runs
          recorded without it behaved as; such a run resumes when the setting has that value.
          A dict value names fields added to a recorded group (a dict setting).
        - Settings in ``UNCHECKED`` are recorded for the reader but may change on resume."""
        check_run_name(name)
        path = Path(root) / stage / name
        if path.exists() and not resume:
            raise ConfigError(f"run {path} already exists", "pass --resume to continue it, or another --name")
        if resume and not (path / "config.json").exists():
            raise ConfigError(f"there is no run {path} to resume", "drop --resume to start it")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        if resume:
            recorded = json.loads((path / "config.json").read_text())
            old = {**(later or {}), **recorded}
            for k, fields in (later or {}).items():  # a group (finetune's augment) that gained fields
                if isinstance(fields, dict) and isinstance(recorded.get(k), dict):
                    old[k] = {**fields, **recorded[k]}
            changed = sorted(k for k in config if k not in UNCHECKED and old.get(k) != config[k])
            grown = [k for k in changed if k in extendable and isinstance(old.get(k), int) and config[k] > old[k]]
            shrunk = [k for k in changed if k in extendable and isinstance(old.get(k), int) and config[k] < old[k]]
            if shrunk:
                k = shrunk[0]
                raise ConfigError(f"run {path} was started with {k} {old[k]}; resume cannot shorten it to {config[k]}",
                                  f"resume with --{k} {old[k]} or more, or start a new run with --name")
            changed = [k for k in changed if k not in grown]
            if changed:
                was = "; ".join(_change(k, old.get(k), config[k]) for k in changed)
                raise ConfigError(f"run {path} was started with other settings ({was})",
                                  "resume with the same options, or start a new run with --name")
            if grown:
                _atomic_write(path / "config.json", json.dumps({**recorded, **{k: config[k] for k in grown}}, indent=1))
        else:
            _atomic_write(path / "config.json", json.dumps({**config, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
                                                           indent=1))
        return run

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.path / "config.json").read_text())

    def summary(self) -> dict[str, Any] | None:
        """The last summary record of metrics.jsonl (None while the run has not finished)."""
        return next((r for r in reversed(self.metrics()) if r.get("event") == "summary"), None)

    def log(self, record: dict[str, Any]) -> None:
        if self.readonly:
            return
        try:
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise ConfigError(f"cannot write {self.path / 'metrics.jsonl'}: {err.strerror or err}",
                              "free some space (or pass another --runs); --resume continues from the last checkpoint") \
                from None

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def drop_records(self, predicate) -> None:
        """Rewrite metrics.jsonl without the records a resumed run is about to produce again."""
        if self.readonly:
            return
        kept = [r for r in self.metrics() if not predicate(r)]
        _atomic_write(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def checkpoint_path(self, tag: str) -> Path:
        return self.path / "checkpoints" / f"{tag}.pt"

    def save_checkpoint(self, tag: str, states: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Atomically save state dicts (model, optimizer, ...) and plain metadata."""
        path = self.checkpoint_path(tag)
        if self.readonly:
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with _replacing(path) as tmp:
            torch.save({"states": states, "meta": meta}, tmp)
        return path

    def load_checkpoint(self, tag: str) -> dict[str, Any] | None:
        path = self.checkpoint_path(tag)
        if not path.exists():
            return None
        return load_state_file(path, "the run's checkpoint")

    def save_predictions(self, fold: str, clips: list[str], y_true, scores, y_pred=None) -> None:
        """The test fold's final scores (logits, kNN votes or posteriors), one row per clip,
        so that reports need neither the store nor the model to draw a confusion matrix.
        ``y_pred`` defaults to the top class; multi-label sets pass their (clips, classes)
        bool predictions, and ``y_true`` is then (clips, classes) bool too."""
        if self.readonly:
            return
        import numpy as np

        path = self.path / "predictions" / f"fold-{fold}.npz"
        path.parent.mkdir(exist_ok=True)
        scores = np.asarray(scores, dtype=np.float32)
        y_true = np.asarray(y_true)
        y_true = y_true.astype(bool if y_true.ndim == 2 else np.int64)
        y_pred = scores.argmax(1) if y_pred is None else np.asarray(y_pred)
        with _replacing(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, clip=np.asarray(clips, dtype=str), y_true=y_true, y_pred=y_pred, scores=scores)

    def predictions(self) -> dict[str, dict[str, Any]]:
        """fold -> {clip, y_true, y_pred, scores} for every fold with saved predictions."""
        import numpy as np

        out = {}
        for path in sorted((self.path / "predictions").glob("fold-*.npz")):
            with np.load(path) as f:
                out[path.stem.removeprefix("fold-")] = {k: f[k] for k in f.files}
        return out

    def write_text(self, name: str, text: str) -> None:
        if self.readonly:
            return
        _atomic_write(self.path / name, text)


def open_run(ranks: Ranks, root: str | Path, stage: str, name: str, config: dict[str, Any], resume: bool,
             extendable: tuple[str, ...] = (), later: dict[str, Any] | None = None) -> Run:
    """Rank 0 creates (or checks, on --resume) the run folder; the other ranks wait for it and
    get a read-only handle on the same folder."""
    run = Run.create(root, stage, name, config, resume, extendable, later) if ranks.main else None
    barrier(ranks)
    return run or Run(Path(root) / stage / name, readonly=True)


def recorded_config(root: str | Path, stage: str, name: str | None, resume: bool) -> dict[str, Any] | None:
    """The config.json of the run a --resume continues; None for a new run (or a missing
    one: ``Run.create`` says so)."""
    check_run_name(name)
    path = Path(root) / stage / (name or "") / "config.json"
    return json.loads(path.read_text()) if resume and name and path.is_file() else None


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write, renamed over it when the writing succeeds;
    when it fails (a full disk), the temporary file is removed and ``path`` is as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {path}: {err.strerror or err}",
                          "free some space (or pass another --runs); --resume continues from the last checkpoint") \
            from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _atomic_write(path: Path, text: str) -> None:
    with _replacing(path) as tmp:
        tmp.write_text(text)


def list_runs(root: str | Path, stage: str, method: str | None = None) -> list[Path]:
    """Runs of a stage with a final checkpoint, oldest first; optionally of one method."""
    base = Path(root) / stage
    out = []
    for path in base.iterdir() if base.is_dir() else []:
        cfg = path / "config.json"
        if not cfg.is_file() or not (path / "checkpoints" / "final.pt").is_file():
            continue
        if method and json.loads(cfg.read_text()).get("method") != method:
            continue
        out.append(path)
    return sorted(out, key=lambda p: (p / "checkpoints" / "final.pt").stat().st_mtime)


@dataclass(kw_only=True)
class StageOptions:
    """The options pretrain, finetune and evaluate share (keyword-only, after each stage's own)."""

    store: str = "data/features"
    preset: str = "shin2021"
    # GB (10^9 bytes) the folds may take in memory, else they are streamed from the store
    # (data/mode.choose_mode); None: half of the free memory where the data would live; 0: always stream
    memory_budget_gb: float | None = None
    seed: int = 0
    device: str = "auto"
    runs_root: str = "data/runs"
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        return recipe(self)


@dataclass(kw_only=True)
class TrainingOptions(StageOptions):
    """And the training stages': --resume, progress bars."""

    resume: bool = False
    progress: bool = True


def recipe(config: Any) -> dict[str, Any]:
    """A stage config as JSON for config.json, without the options that do not change the
    result (so --resume may differ in them): resume, progress, name, device. The stage's own
    options come first, the shared ones after them."""
    out = dataclasses.asdict(config)
    shared = [f.name for f in dataclasses.fields(TrainingOptions)]
    out = {**{k: v for k, v in out.items() if k not in shared}, **{k: out[k] for k in shared if k in out}}
    for transient in ("resume", "progress", "name", "device"):
        out.pop(transient, None)
    return json.loads(json.dumps(out, default=list))


@dataclass(frozen=True)
class Headline:
    """A finished finetune or evaluate run's result: its metric (acc or map), mean and
    standard deviation over test folds, and the fold count. Fine-tuning's is the last epoch."""

    metric: str
    mean: float
    std: float
    folds: int

    @property
    def metric_name(self) -> str:
        return METRIC_NAMES.get(self.metric, self.metric)

    def text(self) -> str:
        """'78.25 ± 1.02' in percent."""
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}"


def headline(summary: dict[str, Any]) -> Headline:
    """The headline of a summary record of either stage; runs made before multi-label sets
    record no metric and are accuracy."""
    m = summary.get("metric", "acc")
    prefix = "last_" if f"last_{m}_mean" in summary else ""  # fine-tuning: the last epoch
    return Headline(m, summary[f"{prefix}{m}_mean"], summary[f"{prefix}{m}_std"], int(summary["n_folds"]))


def check_rates(**rates: float | None) -> None:
    """Refuse, before a run folder is made, learning rates and temperatures that are not above 0
    and weight decays or mixup alphas below 0 (``weight_decay=...``: by name; None: the default)."""
    for name, value in rates.items():
        if value is None:
            continue
        floor_open = not name.startswith(("weight_decay", "mixup"))
        if not math.isfinite(value) or value < 0 or (floor_open and value == 0):
            flag = "--" + name.replace("_", "-")
            rule = "above 0" if floor_open else "0 or more"
            raise ConfigError(f"{flag} must be {rule}, got {value}", f"pass {flag} with a value {rule}")


def check_minimum(flag: str, value: float | None, minimum: float) -> None:
    """Refuse, before a run folder is made, a count or size below its minimum (None: the default)."""
    if value is not None and value < minimum:
        raise ConfigError(f"{flag} must be at least {minimum:g}, got {value}", f"pass {flag} {minimum:g} or more")


def check_maximum(flag: str, value: float | None, maximum: float) -> None:
    """Refuse, before a run folder is made, a value above its maximum (None: the default)."""
    if value is not None and value > maximum:
        raise ConfigError(f"{flag} must be at most {maximum:g}, got {value}", f"pass {flag} {maximum:g} or less")


def check_run_name(name: str | None) -> None:
    """A run name is one folder under --runs: no path separators, not . or .. ."""
    if name is not None and (not name.strip() or "/" in name or "\\" in name or name in (".", "..") or "\0" in name):
        raise ConfigError(f"--name {name!r} is not a run name: it must be one folder under --runs",
                          "pass a name without / (letters, digits, - and _ do)")


def default_name(*parts: str) -> str:
    return "-".join([*(p for p in parts if p), time.strftime("%Y%m%d-%H%M%S")])
