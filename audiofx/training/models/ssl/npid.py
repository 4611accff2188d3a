"""NPID (Wu et al. 2018) as Hornauer et al. 2021 use it: instance discrimination against a
memory bank of every sample's embedding."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import nn

from audiofx.training.models.encoders import Encoder
from audiofx.training.models.ssl.base import Method, MethodOption, distributed, gather
from audiofx.training.models.ssl.losses import MemoryBank, npid_nce_loss, npid_softmax_loss

# NCE stands in for NPID's softmax when K << N; past N / NCE_K_SHARE noise samples a run is told.
NCE_K_SHARE = 10


class NPID(Method):
    """128-d normalised embedding, memory bank with momentum 0.5, NCE with K noise samples
    (K 64, temperature 0.4) or the full softmax (K 0). One random view per step."""

    name = "npid"
    title = "NPID"
    contrasts_views = False  # each view is compared with the bank's entries, not with a second view
    options = (MethodOption("nce_k", int, 64, "noise samples of NCE (0: the exact softmax)", "its NCE noise samples",
                            minimum=0),)

    def __init__(self, encoder: Encoder, n_data: int, generator, dim: int = 128, nce_k: int = 64,
                 temperature: float = 0.4, momentum: float = 0.5):
        super().__init__(encoder, n_data, generator)
        self.embed = nn.Linear(encoder.out_dim, dim)
        self.bank = MemoryBank(n_data, dim, momentum, generator=generator)
        self.k, self.temperature = nce_k, temperature

    @classmethod
    def notes(cls, options: dict[str, Any], samples: int) -> list[str]:
        k = options["nce_k"]
        if k * NCE_K_SHARE <= samples:  # measured on the demo: docs/architecture.md
            return []
        return [f"NCE's {k} noise samples are over 1/{NCE_K_SHARE} of the {samples} in the pool; NCE approximates "
                "the softmax only for K much smaller than N, and --nce-k 0 (the exact softmax) is cheap here"]

    @property
    def projection(self) -> nn.Module:
        return self.embed

    def loss(self, x, index, view, generator):
        f = F.normalize(self.embed(self.encoder(view(x))).float(), dim=1)
        if self.k > 0:
            loss = npid_nce_loss(f, index, self.bank, self.k, self.temperature, generator=generator)
        else:
            loss = npid_softmax_loss(f, index, self.bank, self.temperature)
        # The bank is updated after the backward pass: updating it in place now would change
        # a tensor the softmax variant's graph still needs.
        self._pending = (index, f.detach())
        return loss

    def after_step(self):
        index, f = self._pending
        if distributed():
            # Every rank keeps the whole bank: each applies the updates of all ranks' batches
            # (the loaders give every rank equal batch sizes).
            index, f = gather(index), gather(f)
        self.bank.update(index, f)
