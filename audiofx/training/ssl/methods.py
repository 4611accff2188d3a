"""Self-supervised methods, one class each, registered by name (after solo-learn's layout).

Each method owns its encoder, heads and state (memory bank, queue, momentum encoder) and
turns a batch of standardised features into a loss. Labels are never seen.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from audiofx.training.models import Encoder, ProjectionHead
from audiofx.training.ssl.losses import (
    MemoryBank,
    MoCoQueue,
    moco_loss,
    momentum_update,
    npid_nce_loss,
    npid_softmax_loss,
    nt_xent,
)

Views = Callable[[torch.Tensor], torch.Tensor]  # one random augmentation of a batch


class Method(nn.Module):
    name = ""
    # (lr, weight decay) for SGD with momentum 0.9 and a cosine schedule
    default_lr = 0.03
    default_weight_decay = 5e-4

    def __init__(self, encoder: Encoder, n_data: int, generator: torch.Generator):
        super().__init__()
        self.encoder = encoder

    def loss(self, x: torch.Tensor, index: torch.Tensor, view: Views, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, index: torch.Tensor, view: Views, generator: torch.Generator) -> torch.Tensor:
        # forward is the loss, so DistributedDataParallel can wrap a method as it is.
        return self.loss(x, index, view, generator)

    def after_step(self) -> None:
        """Called after the optimizer step (momentum encoders update here)."""


class NPID(Method):
    """Wu et al. 2018 as used by Hornauer et al. 2021: 128-d normalised embedding, memory bank
    with momentum 0.5, NCE with K noise samples (K 64, temperature 0.4) or the full softmax (K 0)."""

    name = "npid"

    def __init__(self, encoder: Encoder, n_data: int, generator: torch.Generator, dim: int = 128, k: int = 64,
                 temperature: float = 0.4, momentum: float = 0.5):
        super().__init__(encoder, n_data, generator)
        self.embed = nn.Linear(encoder.out_dim, dim)
        self.bank = MemoryBank(n_data, dim, momentum, generator=generator)
        self.k, self.temperature = k, temperature

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
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # Every rank keeps the whole bank: each applies the updates of all ranks' batches
            # (the loaders give every rank equal batch sizes).
            index, f = _gather(index), _gather(f)
        self.bank.update(index, f)


class SimCLR(Method):
    """Chen et al. 2020: two augmented views, a 2-layer projection head, NT-Xent."""

    name = "simclr"
    default_lr = 0.06
    default_weight_decay = 1e-6

    def __init__(self, encoder: Encoder, n_data: int, generator: torch.Generator, dim: int = 128,
                 temperature: float = 0.5):
        super().__init__(encoder, n_data, generator)
        self.head = ProjectionHead(encoder.out_dim, dim)
        self.temperature = temperature

    def loss(self, x, index, view, generator):
        z1 = self.head(self.encoder(view(x)))
        z2 = self.head(self.encoder(view(x)))
        return nt_xent(z1, z2, self.temperature)


class MoCo(Method):
    """MoCo v2 (He et al. 2020, Chen et al. 2020): momentum key encoder (0.999), a queue of
    negatives, temperature 0.2, MLP head. Works on one GPU or CPU; the queue length need not
    divide the dataset.

    Shuffling BatchNorm without DDP: the paper's shuffle BN gives the query and its key
    BatchNorm statistics of different clips (each GPU normalises its own share; keys are
    shuffled across GPUs), since with shared statistics the model can find the positive key
    by its batch's statistics instead of by its content, and the loss falls without learning
    (He et al. 2020, section 3.3). Here each device's batch is cut into ``bn_splits`` groups
    normalised separately (as with the authors' SplitBatchNorm on one GPU), and the keys'
    clips are shuffled across the groups first, then put back in order. Under torchrun every
    rank does the same with its own batch. ``bn_splits`` 1 is plain BatchNorm."""

    name = "moco"

    def __init__(self, encoder: Encoder, n_data: int, generator: torch.Generator, dim: int = 128,
                 queue: int = 4096, temperature: float = 0.2, momentum: float = 0.999, bn_splits: int = 1):
        super().__init__(encoder, n_data, generator)
        self.head = ProjectionHead(encoder.out_dim, dim)
        self.key_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        # A queue longer than the dataset would hold stale copies of the same clips.
        self.queue = MoCoQueue(min(queue, max(n_data - 1, 1)), dim, generator=generator)
        self.temperature, self.momentum, self.bn_splits = temperature, momentum, bn_splits

    def groups(self, batch: int) -> int:
        """BatchNorm groups for a batch: ``bn_splits``, fewer for a short batch (2 clips each at least)."""
        return max(1, min(self.bn_splits, batch // 2))

    def loss(self, x, index, view, generator):
        groups = self.groups(x.shape[0])
        q = in_groups((self.encoder, self.head), view(x), groups)
        with torch.no_grad():
            xk = view(x)
            if groups > 1:
                order = torch.randperm(x.shape[0], generator=generator, device=generator.device).to(x.device)
                shuffled = in_groups((self.key_encoder, self.key_head), xk[order], groups)
                k = shuffled[order.argsort()]  # back in the batch's order, each key beside its query
            else:
                k = self.key_head(self.key_encoder(xk))
        loss = moco_loss(q, k, self.queue, self.temperature)
        self._pending = k  # enqueued after the backward pass, which still needs this queue
        return loss

    def after_step(self):
        self.queue.enqueue(self._pending)
        momentum_update(self.encoder, self.key_encoder, self.momentum)
        momentum_update(self.head, self.key_head, self.momentum)


def in_groups(stages: tuple[nn.Module, ...], x: torch.Tensor, groups: int) -> torch.Tensor:
    """The ``stages`` in turn (an encoder, then its head) on ``groups`` consecutive slices of
    the batch, one pass each (so BatchNorm in training mode normalises each slice by its own
    statistics), outputs in batch order.

    Their BatchNorm layers' running statistics take one update per batch, with the mean of the
    groups' statistics, as the authors' SplitBatchNorm does: one update per group would move
    them ``groups`` times a step, towards the last group most (and they are what the encoder
    normalises with in eval mode: the kNN monitor, evaluate, fine-tuning's start)."""

    def net(part: torch.Tensor) -> torch.Tensor:
        for stage in stages:
            part = stage(part)
        return part

    if groups <= 1:
        return net(x)
    norms = [m for module in stages for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    before = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in norms]
    for m in norms:
        m.momentum = 1.0  # each call leaves exactly its group's statistics in the buffers
    try:
        out = []
        for part in x.tensor_split(groups):
            out.append(net(part))
            for stats, m in zip(seen, norms):
                stats.append((m.running_mean.clone(), m.running_var.clone()))
    finally:
        with torch.no_grad():
            for stats, m, (momentum, mean, var, count) in zip(seen, norms, before):
                m.momentum = momentum
                rate = momentum if momentum is not None else 1.0 / float(count + 1)  # None: a cumulative average
                if stats:
                    mean = (1 - rate) * mean + rate * torch.stack([s[0] for s in stats]).mean(0)
                    var = (1 - rate) * var + rate * torch.stack([s[1] for s in stats]).mean(0)
                # New tensors, not copies into the old: the backward pass still needs the
                # buffers as the group calls left them (autograd checks their versions).
                m.running_mean, m.running_var = mean, var
                m.num_batches_tracked = count + 1 if stats else count
    return torch.cat(out)


def _gather(x: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


METHODS: dict[str, type[Method]] = {m.name: m for m in (NPID, SimCLR, MoCo)}
