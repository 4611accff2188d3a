"""SimCLR (Chen et al. 2020): two augmented views, a 2-layer projection head, NT-Xent."""

from __future__ import annotations

from torch import nn

from audiofx.training.models.encoders import Encoder, ProjectionHead
from audiofx.training.models.ssl.base import Method
from audiofx.training.models.ssl.losses import nt_xent


class SimCLR(Method):
    name = "simclr"
    title = "SimCLR"
    default_lr = 0.06
    default_weight_decay = 1e-6

    def __init__(self, encoder: Encoder, n_data: int, generator, dim: int = 128, temperature: float = 0.5):
        super().__init__(encoder, n_data, generator)
        self.head = ProjectionHead(encoder.out_dim, dim)
        self.temperature = temperature

    @property
    def projection(self) -> nn.Module:
        return self.head

    def loss(self, x, index, view, generator):
        z1 = self.head(self.encoder(view(x)))
        z2 = self.head(self.encoder(view(x)))
        return nt_xent(z1, z2, self.temperature)
