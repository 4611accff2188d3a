"""What `audiofx cache gc` removes, and removing it.

A feature set is garbage when it is
- incomplete (no manifest) and untouched for a while: an extraction, push or pull that was
  abandoned. A young incomplete set may be an extraction in progress on another machine, so
  it is left alone (--min-age);
- built by an older feature code version (its key can never be asked for again) and not
  used by any run under --runs.
Complete sets of the current code version are the cache's whole point and are never garbage.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audiofx.config import FEATURE_CODE_VERSION
from audiofx.errors import StoreError
from audiofx.pipeline.readcache import default_cache
from audiofx.pipeline.store import FeatureStore


@dataclass(frozen=True)
class Garbage:
    dataset: str
    key: str
    bytes: int
    reason: str


@dataclass
class GcPlan:
    store: FeatureStore
    items: list[Garbage] = field(default_factory=list)

    def remove(self) -> None:
        for item in self.items:
            self.store.remove(item.dataset, item.key)

    def evict_cache(self) -> list[Path]:
        """Trim the read-through cache to its size limit (least recently used first)."""
        cache = default_cache()
        return cache.evict() if cache.root.is_dir() else []


def keys_used_by_runs(runs_root: str | Path) -> set[str]:
    """Every string in any run's config.json (feature keys among them)."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.add(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for cfg in Path(runs_root).glob("*/*/config.json"):
        try:
            walk(json.loads(cfg.read_text()))
        except (OSError, ValueError):
            continue
    return found


def collect_garbage(store_url: str, runs_root: str | Path, min_age_hours: float = 24.0) -> GcPlan:
    """What gc would remove (nothing is removed here: see GcPlan.remove)."""
    store = FeatureStore(store_url)
    plan = GcPlan(store)
    used = keys_used_by_runs(runs_root)
    now = time.time()
    for ds, key, _ in store.groups():
        try:
            manifest = store.read_manifest(ds, key)
        except StoreError:
            age_h = (now - store.loc.newest_mtime(store.rel(ds, key))) / 3600
            if age_h >= min_age_hours:
                plan.items.append(Garbage(ds, key, store.group_bytes(ds, key),
                                          f"incomplete, untouched for {age_h:.1f} h"))
            continue
        version = int(manifest.get("feature_code_version", 0))
        if version < FEATURE_CODE_VERSION and key not in used:
            plan.items.append(Garbage(ds, key, store.group_bytes(ds, key),
                                      f"feature code v{version} (now v{FEATURE_CODE_VERSION}), used by no run"))
    return plan
