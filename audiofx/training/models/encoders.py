"""Encoders and heads. An encoder maps a batch of features (B, 3, bins, T) to vectors (B, D);
a one-channel set's features (B, 1, bins, T), or one chosen channel of a stack
(``Encoder.input_channel``), are repeated on the 3 input channels.

torchvision's ImageNet CNNs are used as the papers did (Shin, Lin: ResNet-50; Zhou: VGG-16
and AlexNet as fully convolutional networks with global average pooling: the `features`
conv stack only, without torchvision's adaptive pool to 7 x 7 or 6 x 6 and its classifier),
plus ``esresnet50`` (ESResNet with attention, Guzhov et al. 2020: Hornauer et al.'s network,
models/esresnet.py) and `tiny`, a small CNN for the offline demo and the tests on CPU. Being fully
convolutional, an encoder takes any (bins, T) at least ``min_input_size(arch)``.

Heads: ``linear`` (global average pooling + a linear layer) and ``mlp-attn`` (Zhou et al.
2019's MLP attention over the unpooled map).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from audiofx.errors import ConfigError
from audiofx.training.models.esresnet import FRESH_PREFIXES, ESResNetBody

# arch -> (torchvision builder name, ImageNet weights enum name, feature dimension)
TORCHVISION = {
    "resnet18": ("resnet18", "ResNet18_Weights", 512),
    "resnet34": ("resnet34", "ResNet34_Weights", 512),
    "resnet50": ("resnet50", "ResNet50_Weights", 2048),
    "densenet201": ("densenet201", "DenseNet201_Weights", 1920),
    "vgg16": ("vgg16", "VGG16_Weights", 512),
    "alexnet": ("alexnet", "AlexNet_Weights", 256),
}
# Networks built around a torchvision one: its ImageNet weights load into them, and the parts
# under these key prefixes start fresh.
EXTENDED = {"esresnet50": "resnet50"}
FRESH = {"esresnet50": FRESH_PREFIXES}
ARCHS = tuple(TORCHVISION) + tuple(EXTENDED) + ("tiny",)
OUT_DIM = {**{arch: spec[2] for arch, spec in TORCHVISION.items()},
           **{arch: TORCHVISION[base][2] for arch, base in EXTENDED.items()}, "tiny": 128}


def imagenet_arch(arch: str) -> str | None:
    """The torchvision network whose ImageNet weights fit ``arch`` (None: there is none)."""
    return arch if arch in TORCHVISION else EXTENDED.get(arch)


def fresh_prefixes(arch: str) -> tuple[str, ...]:
    """Body key prefixes a checkpoint of ``imagenet_arch(arch)`` lacks: they start fresh."""
    return FRESH.get(arch, ())


class Encoder(nn.Module):
    """A backbone followed by global average pooling: (B, C, H, W) -> (B, out_dim).

    ``features(x)`` is the backbone's map before pooling, (B, out_dim, h, w), for heads that
    look at positions (the MLP-attention head); ``forward`` is its global average. The state
    dict is the backbone's only (``body.*``), so checkpoints do not depend on the head used.
    """

    def __init__(self, body: nn.Module, out_dim: int, arch: str, min_size: int = 1):
        super().__init__()
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = out_dim
        self.arch = arch
        self.min_size = min_size  # smallest input height and width that leave a non-empty map
        # One stored channel as the network's input (Zhou et al.'s average channel), repeated
        # on the 3 input channels like a one-channel set's (Lin 2022); None: the stack as it is.
        self.input_channel: int | None = None

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        """The stored channels (B, C, bins, T) as the body's 3 input channels: the chosen
        channel, or a one-channel set's, repeated 3 times (a view: no copy)."""
        if self.input_channel is not None:
            x = x[:, self.input_channel:self.input_channel + 1]
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < self.min_size or x.shape[-1] < self.min_size:
            raise _too_small(self.arch, self.min_size, x.shape[-2], x.shape[-1])
        return self.body(self.network_input(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


class LogmelGrid(nn.Module):
    """The inputs themselves as the embedding, no network (evaluate --run logmel): each stored
    channel of the standardised log-mels average-pooled to a ``GRID`` of mel bands x frames
    and flattened (4 x 4 cells of a 128 x 100 clip, 2400 values for 3 channels). The frozen
    reference a learned representation is also measured against: SUPERB's FBANK row."""

    GRID = (32, 25)

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(self.GRID)
        self.input_channel: int | None = None  # one stored channel only, as Encoder takes it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_channel is not None:
            x = x[:, self.input_channel:self.input_channel + 1]
        return self.pool(x).flatten(1)


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


def body_of(arch: str) -> nn.Module:
    """The conv stack of an arch; the one place an unknown arch is refused."""
    if arch == "tiny":
        return _tiny_body()
    if arch == "esresnet50":
        return ESResNetBody()
    if arch not in TORCHVISION:
        raise ConfigError(f"unknown architecture {arch!r}", f"use one of {', '.join(ARCHS)}")
    return _torchvision_body(arch)


@functools.lru_cache(maxsize=None)
def min_input_size(arch: str) -> int:
    """The smallest square input (bins = frames) an arch's body maps to at least 1 x 1.

    Found by running the body on the "meta" device (shapes only, no weights, no compute) and
    bisecting; every body here uses square kernels and strides, so one number holds for both
    axes. AlexNet's stride-4 stem and three 3/2 max pools need 63 (VGG-16 32, tiny 16): a
    short clip cut into fragments can fall below that, and torch's own error ("Output size
    is too small") does not say which option to change.
    """
    with torch.device("meta"):
        body = body_of(arch).eval()

    def fits(size: int) -> bool:
        try:
            body(torch.empty(1, 3, size, size, device="meta"))
        except RuntimeError:  # torch's shape checks: kernel larger than input, empty output
            return False
        return True

    lo, hi = 1, 4096  # invariant: hi fits
    if fits(lo):
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _too_small(arch: str, need: int, bins: int, frames: int, hint: str | None = None) -> ConfigError:
    return ConfigError(
        f"input of {bins} bins x {frames} frames is too small for {arch} (its strides need at least {need} x {need})",
        hint or "use fewer --fragments, more frames per clip (extract with --set frames=N), or another --arch")


def check_input_size(arch: str, bins: int, frames: int, crop: bool = False) -> None:
    """Raise a ConfigError before any training when (bins, frames) inputs are too small for
    arch; ``crop``: the frames are a --time-crop's, and the hint says so."""
    need = min_input_size(arch)
    if bins < need or frames < need:
        hint = f"use a --time-crop of {need} frames or more, or another --arch" if crop and bins >= need else None
        raise _too_small(arch, need, bins, frames, hint)


def build_encoder(arch: str = "resnet50") -> Encoder:
    body = body_of(arch)
    return Encoder(body, OUT_DIM[arch], arch, min_input_size(arch))


HEADS = ("linear", "mlp-attn")


class MLPAttentionHead(nn.Module):
    """Zhou et al. 2019's MLP-attention head on an FCN's feature map.

    For every position i of the map (all frequency x time positions), with a_i the C encoder
    channels there: e_i = u * tanh(W a_i + b) (element-wise product; W: C' x C, b and the
    learnable u: C'); the mean of e_i over positions goes to a linear classifier C' -> classes.
    u starts at ones, so the head starts as the mean of tanh(W a_i + b) and learns a weight per
    hidden unit.
    """

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden)  # W, b
        self.u = nn.Parameter(torch.ones(hidden))
        self.fc = nn.Linear(hidden, n_classes)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        a = fmap.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, positions, C)
        e = self.u * torch.tanh(self.proj(a))  # (B, positions, C')
        return self.fc(e.mean(dim=1))


class Classifier(nn.Module):
    """Encoder + head: what fine-tuning and the linear probe train.

    ``head="linear"``: global average pooling and a linear layer (state dict keys
    ``encoder.*``, ``head.weight``, ``head.bias``, as every earlier checkpoint has).
    ``head="mlp-attn"``: ``MLPAttentionHead`` on the encoder's unpooled map.
    """

    def __init__(self, encoder: Encoder, n_classes: int, head: str = "linear", hidden: int = 256):
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"unknown head {head!r}", f"use one of {', '.join(HEADS)}")
        self.encoder = encoder
        self.head_kind = head
        self.head = nn.Linear(encoder.out_dim, n_classes) if head == "linear" else \
            MLPAttentionHead(encoder.out_dim, n_classes, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_kind == "linear":
            return self.head(self.encoder(x))
        return self.head(self.encoder.features(x))


class ProjectionHead(nn.Sequential):
    """2-layer MLP head (SimCLR, MoCo v2): D -> hidden -> out."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: int | None = None):
        hidden = hidden or in_dim
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def projection_from_state(state: dict[str, torch.Tensor]) -> nn.Module:
    """A method's projection rebuilt from its saved weights: one linear layer (NPID's
    embedding) or a ``ProjectionHead`` (SimCLR, MoCo); the shapes give the sizes."""
    if set(state) == {"weight", "bias"}:
        layer = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    elif set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}:
        layer = ProjectionHead(state["0.weight"].shape[1], state["2.weight"].shape[0], state["0.weight"].shape[0])
    else:
        raise ConfigError(f"a saved projection with keys {sorted(state)[:4]} is neither a linear layer nor a "
                          "2-layer head", "re-run the pretraining with this audiofx")
    layer.load_state_dict(state)
    return layer
