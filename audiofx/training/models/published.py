"""The papers' starting points by name: ImageNet weights that upstream projects publish.

Nothing is downloaded. A name resolves to the file given with ``--weights`` or, failing
that, to the upstream file name in the local torch hub cache (``$TORCH_HOME/hub/checkpoints``,
where torchvision keeps its own); offline, a missing file gets one line saying what to fetch,
from where, and where to put it. docs/checkpoints.md lists the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from audiofx.errors import ConfigError
from audiofx.training.models.encoders import TORCHVISION, imagenet_arch


@dataclass(frozen=True)
class Published:
    what: str  # for the messages
    arch: str | None  # the one arch it exists for (None: any torchvision arch)
    file: str  # upstream's file name, looked for in the torch hub cache
    fetch: str  # how to get it
    layout: str | None = None  # a word the detected layout must hold ("MoCo"), where one tells it apart


PUBLISHED = {
    "imagenet-simclr": Published(
        "SimCLR's ImageNet ResNet-50 (Chen et al. 2020, the weights Shin et al. 2021 fine-tune)", "resnet50",
        "resnet50-1x.pth",
        "download ResNet50_1x.zip from https://storage.cloud.google.com/simclr-gcs/checkpoints/ResNet50_1x.zip "
        "(github.com/google-research/simclr, SimCLR v1) and convert it with github.com/tonylins/simclr-converter "
        "(python convert.py ResNet50_1x/model.ckpt-225206 resnet50-1x.pth)"),
    "imagenet-moco": Published(
        "MoCo v2's ImageNet ResNet-50 (Chen et al. 2020, 800 epochs)", "resnet50", "moco_v2_800ep_pretrain.pth.tar",
        "download https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar "
        "(github.com/facebookresearch/moco)", layout="MoCo"),
}
NAMES = ("imagenet", *PUBLISHED)


def hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def published_file(name: str, arch: str, weights: Path | None = None, flag: str = "--weights") -> Path:
    """The file behind ``--init NAME`` for ``arch``: the file given (with ``flag``), or the
    upstream file in the hub cache."""
    if name == "imagenet":
        return imagenet_weights_file(arch, weights, flag)
    spec = PUBLISHED[name]
    if spec.arch and imagenet_arch(arch) != spec.arch:
        raise ConfigError(f"--init {name} exists for {spec.arch} only, not {arch}", f"pass --arch {spec.arch} or drop --arch")
    if weights is not None:
        return _existing(weights, flag)
    candidate = hub_dir() / spec.file
    if candidate.is_file():
        return candidate
    raise ConfigError(f"--init {name} needs {spec.what}: {spec.file} is not in {hub_dir()}",
                      f"{spec.fetch}; then pass {flag} FILE or copy it to {hub_dir()}/")


def imagenet_weights_file(arch: str, weights: Path | None = None, flag: str = "--weights") -> Path:
    """torchvision's supervised ImageNet checkpoint of an arch (ESResNet: of its ResNet-50):
    the given file, or the local torch hub cache."""
    import torchvision

    if imagenet_arch(arch) is None:
        raise ConfigError(f"no ImageNet weights for arch {arch!r}", f"use one of {', '.join(TORCHVISION)}")
    arch = imagenet_arch(arch)
    if weights is not None:
        return _existing(weights, flag)
    enum = getattr(torchvision.models, TORCHVISION[arch][1])
    for member in enum:  # IMAGENET1K_V1, IMAGENET1K_V2, ...
        candidate = hub_dir() / Path(member.url).name
        if candidate.is_file():
            return candidate
    raise ConfigError(f"ImageNet weights for {arch} are not in the local torch cache ({hub_dir()})",
                      f"download {enum.DEFAULT.url} on a connected machine and copy it to {hub_dir()}/, "
                      f"or pass {flag} FILE")


def _existing(weights: Path, flag: str) -> Path:
    if not Path(weights).is_file():
        raise ConfigError(f"{flag} {weights}: there is no such file", "pass the path of the downloaded checkpoint")
    return Path(weights)
