"""Self-supervised loss building blocks (pure torch): SimCLR NT-Xent, NPID memory bank + NCE /
softmax, MoCo v2 queue + InfoNCE + momentum update. See `losses` for the formulas."""

from .losses import (GatherLayer, MemoryBank, MoCoQueue, moco_loss, momentum_update, npid_nce_loss,
                     npid_softmax_loss, nt_xent)

__all__ = ["GatherLayer", "nt_xent", "MemoryBank", "npid_nce_loss", "npid_softmax_loss",
           "MoCoQueue", "moco_loss", "momentum_update"]
