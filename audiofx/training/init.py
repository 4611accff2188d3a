"""--init: where a model's starting weights come from.

scratch | imagenet (torchvision weights from the local torch cache or --weights FILE) |
simclr | npid | moco (the newest pretrain run of that method) | NAME:RUN (the pretrain run
RUN) | PATH (a state dict of an encoder, or an audiofx checkpoint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from audiofx.errors import ConfigError
from audiofx.training.models import (
    Encoder,
    build_encoder,
    imagenet_weights_file,
    load_imagenet,
)
from audiofx.training.runs import list_runs

SSL_METHODS = ("npid", "simclr", "moco")


@dataclass
class Init:
    kind: str  # scratch, imagenet, pretrain, file
    arch: str
    source: str  # what to print and record: a path or "scratch"
    encoder_state: dict[str, Any] | None = None
    weights_file: Path | None = None
    input_stats: tuple[Any, Any] | None = None  # (mean, std) the encoder was pretrained with

    def build(self) -> Encoder:
        encoder = build_encoder(self.arch)
        if self.kind == "imagenet":
            load_imagenet(encoder, self.weights_file)
        elif self.encoder_state is not None:
            encoder.load_state_dict(self.encoder_state)
        return encoder


def pretrain_run_dir(spec: str, runs_root: str | Path) -> Path:
    """The run a method name or NAME:RUN refers to."""
    base = Path(runs_root) / "pretrain"
    if ":" in spec:
        method, run = spec.split(":", 1)
        path = base / run
        if not (path / "checkpoints" / "final.pt").is_file():
            raise ConfigError(f"pretrain run {path} has no final checkpoint", _listing(runs_root, method))
        return path
    runs = list_runs(runs_root, "pretrain", spec)
    if not runs:
        raise ConfigError(f"no finished {spec} pretrain run in {base}", _listing(runs_root, spec))
    return runs[-1]


def _listing(runs_root: str | Path, method: str) -> str:
    runs = [p.name for p in list_runs(runs_root, "pretrain")]
    have = f"runs there: {', '.join(runs)}" if runs else "there are no pretrain runs yet"
    return f"{have}; make one with: audiofx pretrain --method {method}"


def resolve_init(init: str, arch: str | None, runs_root: str | Path = "data/runs", weights: Path | None = None) -> Init:
    if init == "scratch":
        return Init("scratch", arch or "resnet50", "scratch")
    if init == "imagenet":
        arch = arch or "resnet50"
        path = imagenet_weights_file(arch, weights)
        return Init("imagenet", arch, str(path), weights_file=path)
    if init in SSL_METHODS or (":" in init and init.split(":", 1)[0] in SSL_METHODS):
        run = pretrain_run_dir(init, runs_root)
        ckpt = torch.load(run / "checkpoints" / "final.pt", map_location="cpu", weights_only=True)
        run_arch = json.loads((run / "config.json").read_text())["arch"]
        if arch and arch != run_arch:
            raise ConfigError(f"pretrain run {run.name} trained a {run_arch}, not a {arch}", f"drop --arch or pass --arch {run_arch}")
        return Init("pretrain", run_arch, str(run), encoder_state=ckpt["states"]["encoder"],
                    input_stats=_stats(ckpt["states"]))
    path = Path(init)
    if not path.is_file():
        raise ConfigError(f"--init {init!r} is neither scratch, imagenet, {', '.join(SSL_METHODS)}, NAME:RUN nor a file",
                          "pass one of those, or the path of an encoder state dict")
    state = torch.load(path, map_location="cpu", weights_only=True)
    stats = None
    if "states" in state:  # an audiofx checkpoint
        meta, states = state.get("meta", {}), state["states"]
        state, stats = states["encoder"], _stats(states)
        arch = arch or meta.get("arch")
    return Init("file", arch or "resnet50", str(path), encoder_state=state, input_stats=stats)


def _stats(states: dict[str, Any]):
    return (states["mean"], states["std"]) if "mean" in states else None
