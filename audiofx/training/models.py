"""Encoders and heads. An encoder maps a batch of features (B, 3, bins, T) to vectors (B, D).

torchvision's ImageNet CNNs are used as the papers did (Shin, Lin: ResNet-50; Zhou: VGG-16
and AlexNet as fully convolutional networks with global average pooling), plus `tiny`, a
small CNN for the offline demo and the tests on CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from audiofx.errors import ConfigError

# arch -> (torchvision builder name, ImageNet weights enum name, feature dimension)
TORCHVISION = {
    "resnet18": ("resnet18", "ResNet18_Weights", 512),
    "resnet34": ("resnet34", "ResNet34_Weights", 512),
    "resnet50": ("resnet50", "ResNet50_Weights", 2048),
    "densenet201": ("densenet201", "DenseNet201_Weights", 1920),
    "vgg16": ("vgg16", "VGG16_Weights", 512),
    "alexnet": ("alexnet", "AlexNet_Weights", 256),
}
ARCHS = tuple(TORCHVISION) + ("tiny",)


class Encoder(nn.Module):
    """A backbone followed by global average pooling: (B, C, H, W) -> (B, out_dim)."""

    def __init__(self, body: nn.Module, out_dim: int, arch: str):
        super().__init__()
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = out_dim
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x)).flatten(1)


def _tiny_body() -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                             nn.MaxPool2d(2))

    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 128))


def _torchvision_body(arch: str) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, TORCHVISION[arch][0])(weights=None)
    if arch.startswith("resnet"):
        # Everything up to (not including) the average pool and the ImageNet classifier.
        return nn.Sequential(*list(model.children())[:-2])
    if arch == "densenet201":
        return nn.Sequential(model.features, nn.ReLU(inplace=True))
    # VGG-16 and AlexNet as fully convolutional networks (Zhou et al. 2019): the conv stack only.
    return model.features


def build_encoder(arch: str = "resnet50") -> Encoder:
    if arch == "tiny":
        return Encoder(_tiny_body(), 128, arch)
    if arch not in TORCHVISION:
        raise ConfigError(f"unknown architecture {arch!r}", f"use one of {', '.join(ARCHS)}")
    return Encoder(_torchvision_body(arch), TORCHVISION[arch][2], arch)


def imagenet_weights_file(arch: str, weights: Path | None = None) -> Path:
    """The torchvision ImageNet checkpoint of an arch: the given file, or the local torch hub
    cache. Nothing is downloaded: offline machines get an error saying how to provide it."""
    import torchvision

    if arch not in TORCHVISION:
        raise ConfigError(f"no ImageNet weights for arch {arch!r}", f"use one of {', '.join(TORCHVISION)}")
    if weights is not None:
        if not Path(weights).is_file():
            raise ConfigError(f"weights file {weights} does not exist", "pass an existing torchvision checkpoint")
        return Path(weights)
    enum = getattr(torchvision.models, TORCHVISION[arch][1])
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for member in enum:  # IMAGENET1K_V1, IMAGENET1K_V2, ...
        candidate = cache / Path(member.url).name
        if candidate.is_file():
            return candidate
    url = enum.DEFAULT.url
    raise ConfigError(
        f"ImageNet weights for {arch} are not in the local torch cache ({cache})",
        f"download {url} on a connected machine and copy it to {cache}/, or pass --weights FILE",
    )


def load_imagenet(encoder: Encoder, path: Path) -> None:
    """Load a torchvision ImageNet state dict into an encoder's body (the classifier is dropped)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model_keys = encoder.body.state_dict().keys()
    if encoder.arch.startswith("resnet"):
        # Sequential(children[:-2]) renumbers conv1, bn1, relu, maxpool, layer1..4 as 0..7.
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        mapped = {}
        for k, v in state.items():
            head = k.split(".")[0]
            if head in names:
                mapped[f"{names.index(head)}{k[len(head):]}"] = v
    elif encoder.arch == "densenet201":
        mapped = {f"0.{k[len('features.'):]}": v for k, v in state.items() if k.startswith("features.")}
    else:
        mapped = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    missing = set(model_keys) - set(mapped)
    if missing:
        raise ConfigError(f"{path} does not fit {encoder.arch} ({len(missing)} tensors missing, e.g. {sorted(missing)[0]})",
                          "pass the torchvision checkpoint of the same architecture")
    encoder.body.load_state_dict(mapped)


class Classifier(nn.Module):
    """Encoder + linear head: what fine-tuning and the linear probe train."""

    def __init__(self, encoder: Encoder, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class ProjectionHead(nn.Sequential):
    """2-layer MLP head (SimCLR, MoCo v2): D -> hidden -> out."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: int | None = None):
        hidden = hidden or in_dim
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
