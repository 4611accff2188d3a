"""The package's rooms and the rule of what may import what (docs/architecture.md): no import
cycles, counting imports inside functions; each room imports only itself and the rooms
below it; only pipeline/ knows the store's on-disk format."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "audiofx"

# Each module's room, by the longest matching prefix.
ROOMS = {
    "audiofx": "base", "audiofx.config": "base", "audiofx.errors": "base",
    "audiofx.features": "features",
    "audiofx.pipeline": "pipeline",
    "audiofx.training": "training",
    "audiofx.training.runtime": "runtime",
    "audiofx.training.data": "data",
    "audiofx.training.models": "models",
    "audiofx.training.stages": "stages",
    "audiofx.training.report": "report",
    "audiofx.recipes": "recipes",
    "audiofx.reproduce": "reproduce",
    "audiofx.cli": "cli", "audiofx.__main__": "cli",
}
TRAINING = {"runtime", "data", "models", "stages", "report"}
BELOW = {  # what a room may import besides itself
    "base": set(),
    "features": {"base"},
    "pipeline": {"base", "features"},
    "training": set(),
    "runtime": {"base"},
    "data": {"base", "pipeline", "runtime"},
    "models": {"base", "runtime"},
    "stages": {"base", "pipeline", "runtime", "data", "models"},
    "report": {"base", "pipeline", "runtime", "data", "models", "stages"},
    "recipes": {"base"},
    "reproduce": {"base", "pipeline", "recipes", *TRAINING},
    "cli": {"base", "features", "pipeline", "recipes", "reproduce", *TRAINING},
}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imported(path: Path) -> set[str]:
    """Every module name an import anywhere in the file names (top level or inside a function)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def graph() -> dict[str, set[str]]:
    mods = modules()
    out = {}
    for name, path in mods.items():
        deps = set()
        for target in imported(path):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
        out[name] = deps
    return out


def room(module: str) -> str:
    best = max((p for p in ROOMS if module == p or module.startswith(p + ".")), key=len)
    return ROOMS[best]


def test_there_are_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [m, d]) if d in path else f"{m} -> {d}")
            elif d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [])
    assert not cycles, cycles


def test_each_room_imports_only_the_rooms_below_it():
    wrong = [f"{m} ({room(m)}) imports {d} ({room(d)})" for m, deps in graph().items() for d in sorted(deps)
             if room(d) != room(m) and room(d) not in BELOW[room(m)]]
    assert not wrong, wrong


def test_only_the_pipeline_knows_the_store_format():
    for name, path in modules().items():
        if room(name) in TRAINING:
            formats = {n for n in imported(path) if n.split(".")[0] in ("zarr", "numcodecs", "blosc")}
            assert not formats, f"{name} imports {formats}"


def test_every_folder_of_modules_is_a_package():
    """setuptools installs only folders with an __init__.py (a plain folder works in place, not installed)."""
    folders = {p.parent for p in PACKAGE.rglob("*.py")}
    assert not [str(f) for f in folders if not (f / "__init__.py").is_file()]


def test_the_rooms_are_folders_a_newcomer_can_name():
    training = PACKAGE / "training"
    assert sorted(p.name for p in training.iterdir() if p.is_dir() and p.name != "__pycache__") == \
        ["data", "models", "report", "runtime", "stages"]
    assert [p.name for p in training.glob("*.py")] == ["__init__.py"]  # nothing left outside a room
    stages = {p.stem for p in (training / "stages").glob("*.py")}
    assert {"pretrain", "finetune", "evaluate"} <= stages
