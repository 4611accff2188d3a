"""--init (and evaluate's --run): where a model's starting weights come from.

scratch | imagenet (torchvision weights from the local torch cache or --weights FILE) |
simclr | npid | moco (the newest pretrain run of that method) | METHOD:RUN (the pretrain run
RUN, which must be of METHOD) | a pretrain run's name or folder | PATH (an encoder state
dict, or an audiofx checkpoint: a pretrain run's final.pt or last.pt, a fine-tuned fold-K.pt).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audiofx.errors import ConfigError
from audiofx.training.models.encoders import (
    Encoder,
    build_encoder,
    imagenet_weights_file,
    load_imagenet,
)
from audiofx.training.models.ssl import METHODS
from audiofx.training.models.state_files import load_state_file
from audiofx.training.stages.runs import list_runs

SSL_METHODS = tuple(METHODS)
FINAL = Path("checkpoints") / "final.pt"
# evaluate --run random: the same network at random init, the baseline a representation must
# beat; the evaluate run keeps its weights as checkpoints/<RANDOM_ENCODER>.pt.
RANDOM = "random"
RANDOM_ENCODER = "encoder"


def random_encoder_file(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / f"{RANDOM_ENCODER}.pt"


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


def pretrain_run_dir(spec: str, runs_root: str | Path, option: str = "--init") -> Path | None:
    """The pretrain run that ``spec`` names (a method: its newest run; METHOD:RUN; a run's
    name under ``runs_root``; a run's folder), or None when it names none (a file)."""
    base = Path(runs_root) / "pretrain"
    if spec in SSL_METHODS:
        runs = list_runs(runs_root, "pretrain", spec)
        if not runs:
            raise ConfigError(f"no finished {spec} pretrain run in {base}", _listing(runs_root, spec))
        return runs[-1]
    method = None
    if ":" in spec and spec.split(":", 1)[0] in SSL_METHODS:
        method, name = spec.split(":", 1)
        path = base / name
        if not path.is_dir():
            raise ConfigError(f"{option} {spec!r}: there is no pretrain run {path}", _listing(runs_root, method))
    elif Path(spec).is_dir():
        path = Path(spec)
    elif "/" not in spec and (base / spec).is_dir():
        path = base / spec
    else:
        return None
    config = path / "config.json"
    stage = json.loads(config.read_text()).get("stage", "pretrain") if config.is_file() else None
    if stage != "pretrain":
        raise ConfigError(f"{option} {spec!r}: {path} is not a pretrain run",
                          f"pass a pretrain run (see {base}) or a checkpoint file")
    recorded = json.loads(config.read_text()).get("method")
    if method and recorded != method:
        raise ConfigError(f"{option} {spec!r}: pretrain run {path.name} is a {recorded} run, not {method}",
                          f"pass {recorded}:{path.name}")
    if not (path / FINAL).is_file():
        raise ConfigError(f"pretrain run {path} has no final checkpoint (it has not finished)",
                          f"finish it (audiofx pretrain --method {recorded} --name {path.name} --resume, with its "
                          f"other options) or pass its checkpoints/last.pt")
    return path


def _listing(runs_root: str | Path, method: str) -> str:
    runs = [p.name for p in list_runs(runs_root, "pretrain")]
    have = f"runs there: {', '.join(runs)}" if runs else "there are no pretrain runs yet"
    return f"{have}; make one with: audiofx pretrain --method {method}"


def resolve_init(init: str, arch: str | None, runs_root: str | Path = "data/runs", weights: Path | None = None,
                 option: str = "--init") -> Init:
    """Where the weights of ``init`` are and which architecture they fit; ``option`` is the
    flag the user gave it with, for the errors."""
    if init == "scratch":
        return Init("scratch", arch or "resnet50", "scratch")
    if init == "imagenet":
        arch = arch or "resnet50"
        path = imagenet_weights_file(arch, weights)
        found = Init("imagenet", arch, str(path), weights_file=path)
        found.build()  # now, not after the run folder is made and minutes of loading
        return found
    run = pretrain_run_dir(init, runs_root, option)
    if run is not None:
        ckpt = load_state_file(run / FINAL, option)
        run_arch = json.loads((run / "config.json").read_text())["arch"]
        if arch and arch != run_arch:
            raise ConfigError(f"pretrain run {run.name} trained a {run_arch}, not a {arch}", f"drop --arch or pass --arch {run_arch}")
        return Init("pretrain", run_arch, str(run), encoder_state=ckpt["states"]["encoder"],
                    input_stats=_stats(ckpt["states"]))
    path = Path(init)
    if not path.is_file():
        raise ConfigError(f"{option} {init!r} is neither scratch, imagenet, {', '.join(SSL_METHODS)}, METHOD:RUN, "
                          "a pretrain run nor a file", "pass one of those, or the path of an encoder state dict")
    state = load_state_file(path, option)
    if not isinstance(state, dict):
        raise ConfigError(f"{option} {path} holds no state dict ({type(state).__name__})",
                          "pass an encoder state dict or an audiofx checkpoint")
    stats = None
    if "states" in state:  # an audiofx checkpoint
        meta, states = state.get("meta", {}), state["states"]
        state, stats = _encoder_state(states, path), _stats(states)
        arch = arch or meta.get("arch")
    found = Init("file", arch or "resnet50", str(path), encoder_state=state, input_stats=stats)
    try:  # now, not after minutes of loading features
        found.build()
    except RuntimeError as e:  # load_state_dict: missing, unexpected or mis-shaped keys
        raise ConfigError(f"{path} does not hold {found.arch} encoder weights ({str(e).splitlines()[0]})",
                          "pass --arch with the network it was saved from") from None
    return found


def _encoder_state(states: dict[str, Any], path: Path) -> dict[str, Any]:
    """The encoder's weights in an audiofx checkpoint: a pretrain run's final.pt keeps them
    alone; its last.pt (the method's state) and a fine-tuned fold-K.pt (the classifier's)
    keep them under ``encoder.``, beside a head, a memory bank or a momentum encoder."""
    if "encoder" in states:
        return states["encoder"]
    for whole in ("method", "model"):
        inner = {k[len("encoder."):]: v for k, v in states.get(whole, {}).items() if k.startswith("encoder.")}
        if inner:
            return inner
    raise ConfigError(f"{path} holds no encoder weights",
                      "pass a pretrain run's checkpoints/final.pt or an encoder state dict")


def _stats(states: dict[str, Any]):
    return (states["mean"], states["std"]) if "mean" in states else None
