"""MoCo v2 (He et al. 2020, Chen et al. 2020): a momentum key encoder, a queue of negatives,
and BatchNorm shuffled without DDP."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from audiofx.training.models.encoders import Encoder, ProjectionHead
from audiofx.training.models.ssl.base import Method, MethodOption
from audiofx.training.models.ssl.losses import MoCoQueue, moco_loss, momentum_update

# The most BatchNorm groups MoCo makes by default (the MoCo paper's 8 GPUs; the authors' one-GPU notebook).
MAX_DEFAULT_BN_SPLITS = 8


def default_bn_splits(batch_size: int) -> int:
    """The default BatchNorm groups per device: one per 16 clips of the batch, at least 2 (the
    key shuffle needs two) and at most 8 (the MoCo paper's GPUs and the authors' one-GPU
    notebook); BatchNorm grows noisy below ~16 samples (Wu & He 2018), so batches under 32
    get two smaller groups."""
    return min(MAX_DEFAULT_BN_SPLITS, max(2, batch_size // 16))


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
    title = "MoCo"
    options = (MethodOption("bn_splits", int, None, "BatchNorm groups per device, keys shuffled across them; 1 is "
                            "plain BatchNorm [one per 16 clips of the batch, 2 to 8; a resume keeps the run's]",
                            "its BatchNorm groups", minimum=1, before=1),  # runs recorded before it had one group
               MethodOption("own_keys_masked", int, None, "1: the queue's earlier keys of a query's own clip are "
                            "not its negatives (a queue not much shorter than the pool holds one of about half "
                            "the clips); 0: they are, as in the MoCo code [1; a resume keeps the run's]",
                            "the masking of its queue's own keys", minimum=0, maximum=1,
                            before=0),)  # runs recorded before it did not mask

    def __init__(self, encoder: Encoder, n_data: int, generator: torch.Generator, dim: int = 128,
                 queue: int = 4096, temperature: float = 0.2, momentum: float = 0.999, bn_splits: int = 1,
                 own_keys_masked: int = 1):
        super().__init__(encoder, n_data, generator)
        self.head = ProjectionHead(encoder.out_dim, dim)
        self.key_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)
        # A queue longer than the dataset would hold several stale keys of the same clips; one
        # shorter still holds one of many clips unless they are masked (own_keys_masked).
        self.queue = MoCoQueue(min(queue, max(n_data - 1, 1)), dim, generator=generator,
                               indexed=bool(own_keys_masked))
        self.temperature, self.momentum, self.bn_splits = temperature, momentum, bn_splits

    @classmethod
    def resolve(cls, options: dict[str, Any], batch_size: int, recorded: dict[str, Any] | None) -> dict[str, Any]:
        """The values used are recorded, not "the default": a resume keeps the recorded ones (one
        group and no masking, for runs recorded before the options existed), a new run takes
        ``default_bn_splits`` and masks its own keys."""
        fresh = {"bn_splits": default_bn_splits(batch_size), "own_keys_masked": 1}
        before = {o.name: o.recorded_before for o in cls.options}
        return {name: value if value is not None else (recorded.get(name, before[name]) if recorded else fresh[name])
                for name, value in options.items()}

    def groups(self, batch: int) -> int:
        """BatchNorm groups for a batch: ``bn_splits``, fewer for a short batch (2 clips each at least)."""
        return max(1, min(self.bn_splits, batch // 2))

    @property
    def projection(self) -> nn.Module:
        return self.head

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
        loss = moco_loss(q, k, self.queue, self.temperature, indices=index)
        self._pending = (k, index)  # enqueued after the backward pass, which still needs this queue
        return loss

    def after_step(self):
        self.queue.enqueue(*self._pending)
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
