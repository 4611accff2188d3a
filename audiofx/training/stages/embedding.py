"""Frozen forward passes: an encoder's (or a model's) outputs for every row of a set, in order,
in batches, never holding more than one batch of inputs on the device; and BatchNorm's running
statistics recomputed on a set's rows (evaluate --bn-stats clips)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from audiofx.training.runtime.device import autocast

EMBED_BATCH = 128  # clips per forward pass, in memory and streaming alike (same batches, same numbers)


@torch.no_grad()
def _forward(encoder: torch.nn.Module, batches: Iterable[torch.Tensor], rows: int, mean: torch.Tensor,
             std: torch.Tensor, device) -> torch.Tensor:
    """Outputs of ``rows`` inputs given in order in ``batches``, standardised on the way, written
    into one tensor allocated at the first batch (no second copy of them)."""
    encoder.eval()
    out, at = None, 0
    for x in batches:
        with autocast(device):
            z = encoder((x.to(device).float() - mean) / std).float()
        if out is None:
            out = torch.empty((rows,) + tuple(z.shape[1:]), dtype=z.dtype, device=z.device)
        out[at:at + len(z)] = z
        at += len(z)
    assert at == rows and out is not None, (at, rows)
    return out


def embed(encoder: torch.nn.Module, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device,
          batch: int = EMBED_BATCH) -> torch.Tensor:
    """Outputs of every row of a resident tensor."""
    return _forward(encoder, (x[i:i + batch] for i in range(0, x.shape[0], batch)), x.shape[0], mean, std, device)


def embed_rows(encoder: torch.nn.Module, rows, mean: torch.Tensor, std: torch.Tensor, device,
               batch: int = EMBED_BATCH) -> torch.Tensor:
    """Outputs of every row of a set the data door gave (in memory or streamed: its
    ``in_order`` pass), in its order, in ``embed``'s batches: the same values."""
    return _forward(encoder, (b.x for b in rows.in_order(batch)), len(rows), mean, std, device)


@torch.no_grad()
def recompute_batchnorm(module: torch.nn.Module, batches: Iterable[torch.Tensor], mean: torch.Tensor,
                        std: torch.Tensor, device) -> int:
    """Every BatchNorm's running mean and variance replaced by those of the given inputs
    (standardised on the way): one pass in train mode without gradients, each layer's batch
    statistics averaged over the batches (momentum None: a cumulative average, batches
    weighted equally), then eval mode again. The weights do not change. Returns the number of
    BatchNorm layers."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    module.train()
    for x in batches:
        with autocast(device):
            module((x.to(device).float() - mean) / std)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    module.eval()
    return len(norms)
