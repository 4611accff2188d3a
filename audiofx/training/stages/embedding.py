"""Frozen forward passes: an encoder's (or a model's) outputs for every row of a set, in order,
in batches, never keeping more than one batch of inputs on the device."""

from __future__ import annotations

import torch

from audiofx.training.runtime.device import autocast

EMBED_BATCH = 128  # clips per forward pass, in memory and streaming alike (same batches, same numbers)


@torch.no_grad()
def embed(encoder: torch.nn.Module, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device,
          batch: int = EMBED_BATCH) -> torch.Tensor:
    """Outputs of every row of a resident tensor, standardised with (mean, std) on the way."""
    encoder.eval()
    out = []
    for i in range(0, x.shape[0], batch):
        with autocast(device):
            out.append(encoder((x[i:i + batch].to(device).float() - mean) / std).float())
    return torch.cat(out)


@torch.no_grad()
def embed_rows(encoder: torch.nn.Module, rows, mean: torch.Tensor, std: torch.Tensor, device,
               batch: int = EMBED_BATCH) -> torch.Tensor:
    """Outputs of every row of a set the data door gave (in memory or streamed: its
    ``in_order`` pass), in its order. The batches are ``embed``'s, so the values equal it."""
    encoder.eval()
    out = []
    for b in rows.in_order(batch):
        with autocast(device):
            out.append(encoder((b.x.to(device).float() - mean) / std).float())
    return torch.cat(out)
