"""ESResNet with attention (Guzhov et al. 2020, arXiv:2004.07301): the network Hornauer et al.
pretrain with NPID ("We use the best performing ESResNet with attention for all experiments").

A ResNet-50 whose every stage is gated by an attention branch, built from the paper's
description and its authors' public design (not their code):

- each of the four residual stages and the final pooling has a branch that reads the stage's
  *input*, max-pools it to the stage output's size, applies a depthwise convolution and a
  pointwise convolution to the output's channels, then batch normalisation and a sigmoid;
  the stage's output is multiplied by that mask (values in (0, 1));
- the depthwise kernels alternate between frequency and time: 3 x 1 (stage 1), 1 x 5
  (stage 2), 3 x 1 (stage 3), 1 x 5 (stage 4), 3 x 5 (after stage 4), frequency being the
  feature map's height here as in ESResNet's spectrograms;
- the ResNet-50 part keeps torchvision's module names (``conv1``, ``layer1``...), so
  torchvision's ImageNet weights (and any checkpoint layout models/checkpoints.py reads) load
  into it; the attention branches (``att1``...``att5``) then start fresh, and the run says so.

The input is what preset hornauer2021 extracts: one log-power STFT cut into three frequency
bands, one band per channel, as ESResNet feeds its ImageNet ResNet.

The final mask is computed from the last stage's map pooled to 1 x 1 and multiplied into
the whole map: averaging the masked map is the masked average, so the encoder's global
average pooling gives ESResNet's pooled, gated vector, and heads that read the map (Zhou et
al.'s MLP attention) see the gated map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Attention branch prefixes: what an ImageNet ResNet-50 checkpoint does not hold.
FRESH_PREFIXES = ("att",)
# (depthwise kernel (frequency, time)) of the branches after stages 1-4 and after stage 4's pooling
KERNELS = ((3, 1), (1, 5), (3, 1), (1, 5), (3, 5))
# channels into and out of each gated step (ResNet-50: stem 64, stages 256, 512, 1024, 2048)
CHANNELS = ((64, 256), (256, 512), (512, 1024), (1024, 2048), (2048, 2048))


class StageAttention(nn.Module):
    """A multiplicative mask for a stage's output, computed from the stage's input."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int]):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel, padding=(kernel[0] // 2, kernel[1] // 2),
                                   groups=in_channels)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return torch.sigmoid(self.bn(self.pointwise(self.depthwise(F.adaptive_max_pool2d(x, size)))))


class ESResNetBody(nn.Module):
    """ResNet-50 with an attention gate on each stage: (B, 3, bins, T) -> (B, 2048, h, w)."""

    def __init__(self):
        super().__init__()
        import torchvision

        resnet = torchvision.models.resnet50(weights=None)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))  # torchvision's names: its weights load as they are
        for i, ((cin, cout), kernel) in enumerate(zip(CHANNELS, KERNELS), start=1):
            setattr(self, f"att{i}", StageAttention(cin, cout, kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            out = stage(x)
            x = out * getattr(self, f"att{i}")(x, out.shape[-2:])
        return x * self.att5(x, (1, 1))
