"""--init (pretrain, finetune) and evaluate's --run: where a model's starting weights come from.

scratch | imagenet (torchvision's supervised weights from the local torch cache or --weights
FILE) | imagenet-simclr, imagenet-moco (the upstream ImageNet checkpoints, --weights FILE or
the cache; models/published.py) | simclr | npid | moco (the newest pretrain run of that
method) | METHOD:RUN (the pretrain run RUN, which must be of METHOD) | a pretrain run's name
or folder | PATH (a checkpoint of any layout models/checkpoints.py reads, audiofx's own
included: a pretrain run's final.pt or last.pt, a fine-tuned fold-K.pt).

Whatever the source, the file's layout, the number of tensors taken and its sha256 are
recorded (``Init.record``) and printed in the run's first line (``Init.describe``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audiofx.errors import ConfigError
from audiofx.pipeline.datasets.base import file_sha256
from audiofx.training.models.checkpoints import Backbone, find_backbone
from audiofx.training.models.encoders import Encoder, build_encoder, fresh_prefixes
from audiofx.training.models.published import NAMES as PUBLISHED_NAMES
from audiofx.training.models.published import PUBLISHED, published_file
from audiofx.training.models.ssl import METHODS
from audiofx.training.models.state_files import load_state_file
from audiofx.training.stages.runs import list_runs

SSL_METHODS = tuple(METHODS)
FINAL = Path("checkpoints") / "final.pt"
# evaluate --run random: the same network at random init, the baseline a representation must
# beat; the evaluate run keeps its weights as checkpoints/<RANDOM_ENCODER>.pt.
RANDOM = "random"
RANDOM_ENCODER = "encoder"
# evaluate --run logmel: no network, the log-mel inputs themselves (models/encoders.py
# LogmelGrid), the reference a frozen representation is also measured against.
LOGMEL = "logmel"


def random_encoder_file(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / f"{RANDOM_ENCODER}.pt"


@dataclass
class Init:
    kind: str  # scratch, imagenet, imagenet-simclr, imagenet-moco, pretrain, file; logmel (evaluate's, no network)
    arch: str
    source: str  # what to print and record: a path or "scratch"
    encoder_state: dict[str, Any] | None = None  # the encoder body's keys
    input_stats: tuple[Any, Any] | None = None  # (mean, std) the encoder was pretrained with
    layout: str | None = None  # the checkpoint layout the weights were found in
    tensors: int = 0
    sha256: str | None = None
    fresh: int = 0  # tensors the weights lack by design (ESResNet's attention branches on ResNet-50 weights)
    projection_state: dict[str, Any] | None = None  # a pretrain run's projection (the method's own space)

    def build(self) -> Encoder:
        encoder = build_encoder(self.arch)
        if self.encoder_state is not None:
            missing, unexpected = encoder.body.load_state_dict(self.encoder_state, strict=not self.fresh)
            stray = [k for k in missing if not k.startswith(fresh_prefixes(self.arch))] + list(unexpected)
            if stray:  # find_backbone's state is the body's own keys; anything else is a bug here
                raise RuntimeError(f"{self.source}: encoder keys {stray[:3]} do not fit {self.arch}")
        return encoder

    def describe(self) -> str:
        """What was loaded, for the run's first line."""
        if self.encoder_state is None:
            return self.source
        fresh = f"; {self.fresh} tensors of {self.arch}'s attention start fresh" if self.fresh else ""
        return f"{self.source}: {self.layout}, {self.tensors} tensors, sha256 {self.sha256[:16]}{fresh}"

    def record(self, recorded: dict[str, Any] | None = None) -> dict[str, Any]:
        """What was loaded, for config.json (and so checked on --resume: other weights are
        another run). A run recorded before the layout and hash were resumes without them."""
        out = {"init_source": self.source, "init_layout": self.layout, "init_tensors": self.tensors,
               "init_sha256": self.sha256, **({"init_fresh_tensors": self.fresh} if self.fresh else {})}
        return out if recorded is None or "init_sha256" in recorded else {"init_source": self.source}


def _from_file(kind: str, path: Path, backbone: Backbone, stats=None, layout: str | None = None,
               source: str | None = None, projection: dict[str, Any] | None = None) -> Init:
    return Init(kind, backbone.arch, source or str(path), encoder_state=backbone.state, input_stats=stats,
                layout=layout or backbone.layout, tensors=backbone.tensors, sha256=file_sha256(path),
                fresh=backbone.fresh, projection_state=projection)


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
                 option: str = "--init", branch: str = "auto") -> Init:
    """Where the weights of ``init`` are and which architecture they fit; ``option`` is the
    flag the user gave it with, for the errors. Every file is read and checked here, before
    any data loads; ``branch`` picks between a file's online and momentum networks."""
    if init == "scratch":
        return Init("scratch", arch or "resnet50", "scratch")
    if init in PUBLISHED_NAMES:
        path = published_file(init, arch or "resnet50", weights)
        option = "--weights" if weights is not None else option
        found = _from_file(init, path, find_backbone(load_state_file(path, option), path, arch or "resnet50",
                                                     branch, option))
        word = PUBLISHED[init].layout if init in PUBLISHED else None
        if word and word not in (found.layout or ""):
            raise ConfigError(f"{option} {path} is not a {word} checkpoint (it reads as {found.layout})",
                              f"pass the file --init {init} names: {PUBLISHED[init].file}")
        return found
    run = pretrain_run_dir(init, runs_root, option)
    if run is not None:
        ckpt = load_state_file(run / FINAL, option)
        run_arch = json.loads((run / "config.json").read_text())["arch"]
        if arch and arch != run_arch:
            raise ConfigError(f"pretrain run {run.name} trained a {run_arch}, not a {arch}", f"drop --arch or pass --arch {run_arch}")
        backbone = find_backbone({"encoder": ckpt["states"]["encoder"]}, run / FINAL, run_arch, "auto", option)
        return _from_file("pretrain", run / FINAL, backbone, _stats(ckpt["states"]), "audiofx pretrain run",
                          source=str(run), projection=ckpt["states"].get("projection"))
    path = Path(init)
    if not path.is_file():
        raise ConfigError(f"{option} {init!r} is neither scratch, {', '.join(PUBLISHED_NAMES)}, {', '.join(SSL_METHODS)}, "
                          "METHOD:RUN, a pretrain run nor a file", "pass one of those, or the path of a checkpoint")
    state = load_state_file(path, option)
    if isinstance(state, dict) and "states" in state and "meta" in state:  # an audiofx checkpoint
        meta, states = state.get("meta", {}), state["states"]
        backbone = find_backbone({"encoder": _encoder_state(states, path)}, path, arch or meta.get("arch"), "auto",
                                 option)
        return _from_file("file", path, backbone, _stats(states), "audiofx checkpoint",
                          projection=states.get("projection"))  # a pretrain run's final.pt has one
    return _from_file("file", path, find_backbone(state, path, arch, branch, option))


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
