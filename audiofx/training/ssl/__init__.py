"""Self-supervised losses (pure torch: SimCLR NT-Xent, NPID memory bank + NCE / softmax, MoCo v2
queue + InfoNCE + momentum update) and the methods built on them (`methods`)."""

from audiofx.training.ssl.losses import (
    GatherLayer,
    MemoryBank,
    MoCoQueue,
    moco_loss,
    momentum_update,
    npid_nce_loss,
    npid_softmax_loss,
    nt_xent,
)

__all__ = ["GatherLayer", "nt_xent", "MemoryBank", "npid_nce_loss", "npid_softmax_loss",
           "MoCoQueue", "moco_loss", "momentum_update"]
