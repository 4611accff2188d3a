"""Self-supervised losses: SimCLR NT-Xent, NPID (memory bank + NCE / full softmax), MoCo v2 (queue + InfoNCE).

Pure torch. Every loss L2-normalises its inputs itself, so callers may pass raw projections.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GatherLayer", "nt_xent",
    "MemoryBank", "npid_nce_loss", "npid_softmax_loss",
    "MoCoQueue", "moco_loss", "momentum_update",
]


def _f32(x: Tensor) -> Tensor:
    """Upcast half precision: similarities are divided by a small t and exponentiated, and fp16/bf16
    lose the tail of the softmax. float32/float64 inputs are kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_gather_rows(x: Tensor) -> tuple[list[Tensor], list[int]]:
    """all_gather along dim 0 allowing a different number of rows per rank (a short last batch on
    one rank must not hang or garble the collective): gather the sizes, pad to the largest, trim."""
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return [o[:s] for o, s in zip(out, sizes)], sizes


class GatherLayer(torch.autograd.Function):
    """Differentiable all_gather along dim 0: forward returns one tensor per rank.

    `dist.all_gather` alone cuts the graph, so other ranks' rows would be constants and each rank's
    inputs would miss the gradient that the *other* ranks' losses send through them (as negatives).
    Backward therefore all_reduces (sums) the gradient w.r.t. every gathered slice and keeps this
    rank's slice: grad_r = d(sum_r' L_r') / dx_r. DDP then averages parameter gradients over the
    world, so with equal per-rank batches the parameters get exactly d L_global / d theta.
    """

    @staticmethod
    def forward(ctx, x: Tensor):
        out, sizes = _all_gather_rows(x)
        ctx.sizes = sizes
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        sizes, rank = ctx.sizes, dist.get_rank()
        g = grads[0].new_zeros((len(sizes), max(sizes)) + tuple(grads[0].shape[1:]))
        for i, gi in enumerate(grads):
            g[i, : sizes[i]] = gi
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[rank, : sizes[rank]]


# --------------------------------------------------------------------------------------------- SimCLR

def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5, gather: bool = True) -> Tensor:
    """NT-Xent of SimCLR (Chen et al. 2020, eq. 1), averaged over all 2B anchors.

    With u = normalize(z) over the 2B views and s_ij = u_i . u_j,
        l(i, p) = -log( exp(s_ip / t) / sum_{k != i} exp(s_ik / t) ),   p = the other view of i,
        L = 1/(2B) * sum_i l(i, p(i)).

    z1, z2: (B, D), row b of z1 and row b of z2 are two views of sample b; any B >= 1 (with B = 1
    each anchor's only candidate is its positive, so L == 0).

    If torch.distributed is initialised and `gather`, both views are gathered from all ranks
    (differentiably, `GatherLayer`) so negatives come from the global batch; this rank returns the
    mean over *its own* 2B_r anchors against all 2B_global columns. With equal per-rank batches the
    mean of the rank losses is the single-process loss on the concatenated batch, and the gradient
    w.r.t. this rank's z is world_size * the single-process gradient of those rows (every rank's
    loss depends on them; DDP's averaging of parameter gradients divides that back out).
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent expects two (B, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    u1, u2 = F.normalize(_f32(z1), dim=1), F.normalize(_f32(z2), dim=1)
    if gather and _distributed() and dist.get_world_size() > 1:
        g1, g2 = GatherLayer.apply(u1), GatherLayer.apply(u2)
        sizes = [t.shape[0] for t in g1]
        offset, n = sum(sizes[: dist.get_rank()]), sum(sizes)
        u = torch.cat(list(g1) + list(g2))
    else:
        offset, n = 0, u1.shape[0]
        u = torch.cat([u1, u2])
    b = u1.shape[0]
    own = torch.arange(offset, offset + b, device=u.device)
    rows = torch.cat([own, own + n])                     # this rank's anchors, as indices into the 2N columns
    logits = u[rows] @ u.T / temperature                 # (2b, 2N)
    # -inf (not a large negative): exp(-inf) is exactly 0 in logsumexp, whatever t or the dtype.
    logits[torch.arange(2 * b, device=u.device), rows] = float("-inf")
    positives = (rows + n) % (2 * n)                      # view 1 <-> view 2 of the same sample
    return F.cross_entropy(logits, positives)


# --------------------------------------------------------------------------------------------- NPID

class MemoryBank(nn.Module):
    """NPID memory bank (Wu et al. 2018): one unit vector per training example.

    Buffers: `memory` (N, D), random unit vectors at start; `z` the NCE normaliser, -1 until the
    first `npid_nce_loss` call fixes it (as in the lemniscate code); both travel in state_dict so
    a resumed run keeps the same Z.
    """

    def __init__(self, n_data: int, dim: int, momentum: float = 0.5, generator: torch.Generator | None = None):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("memory", F.normalize(torch.randn(n_data, dim, generator=generator), dim=1))
        self.register_buffer("z", torch.tensor(-1.0))

    @property
    def z_fixed(self) -> bool:
        return bool(self.z > 0)

    @torch.no_grad()
    def update(self, indices: Tensor, features: Tensor) -> None:
        """v_i <- normalize(m * v_i + (1 - m) * normalize(f_i)) for the given rows (Wu et al. sec. 3.3).

        Indices should be unique within a call (one view per example), else the last write wins.
        """
        f = F.normalize(features.detach().to(self.memory.dtype), dim=1)
        v = self.momentum * self.memory[indices] + (1 - self.momentum) * f
        self.memory[indices] = F.normalize(v, dim=1)


def npid_nce_loss(features: Tensor, indices: Tensor, bank: MemoryBank, k: int = 64, temperature: float = 0.4,
                  n_data: int | None = None, generator: torch.Generator | None = None,
                  noise_indices: Tensor | None = None) -> Tensor:
    """NPID's NCE loss (Wu et al. 2018, eqs. 3-6) with K uniform noise samples from the bank.

        P(i|f) = exp(v_i . f / t) / Z,   P_n = 1/N,
        h(i, f) = P(i|f) / (P(i|f) + K P_n),
        L = 1/B sum_b [ -log h(i_b, f_b) - sum_{k=1..K} log(1 - h(j_bk, f_b)) ].

    Z is the Monte-Carlo estimate N * mean(exp(v . f / t)) over the first batch's positive and
    noise entries (every rank's, under DDP), then kept fixed in `bank.z` (the constant-Z variant
    of the lemniscate code).
    The positive uses its memory entry v_i, not the current feature. Noise is drawn uniformly over
    all N entries (it may hit the positive, as in the reference code). Call `bank.update` after.

    features: (B, D) (normalised here); indices: (B,) dataset indices; noise_indices: optional
    (B, K) fixed noise rows (tests), otherwise drawn with `generator`.
    """
    n = bank.memory.shape[0] if n_data is None else n_data
    f = F.normalize(_f32(features), dim=1)
    if noise_indices is None:
        device = generator.device if generator is not None else f.device
        noise_indices = torch.randint(bank.memory.shape[0], (f.shape[0], k), generator=generator, device=device)
    noise_indices = noise_indices.to(f.device)
    k = noise_indices.shape[1]
    idx = torch.cat([indices.to(f.device).view(-1, 1), noise_indices], dim=1)   # (B, 1 + K), positive first
    v = bank.memory[idx].to(f.dtype)                                               # memory is a constant
    s = torch.einsum("bkd,bd->bk", v, f) / temperature
    if not bank.z_fixed:
        with torch.no_grad():
            e = s.float().exp()
            # Under DDP the estimate is over every rank's first batch, so all ranks fix one Z
            # and optimise one loss (the loss of the large batch they make together).
            moments = torch.stack([e.sum(), e.new_tensor(float(e.numel()))])
            if _distributed() and dist.get_world_size() > 1:
                dist.all_reduce(moments, op=dist.ReduceOp.SUM)
            bank.z.fill_(float(moments[0] / moments[1] * n))
    # log space: log h = log P - log(P + K P_n), log(1 - h) = log(K P_n) - log(P + K P_n), no eps needed.
    log_p = s - torch.log(bank.z.to(s.dtype))
    log_kpn = math.log(k / n)
    log_denominator = torch.logaddexp(log_p, torch.full_like(log_p, log_kpn))
    log_h_pos = log_p[:, 0] - log_denominator[:, 0]
    log_1mh_noise = log_kpn - log_denominator[:, 1:]
    return -(log_h_pos + log_1mh_noise.sum(dim=1)).mean()


def npid_softmax_loss(features: Tensor, indices: Tensor, bank: MemoryBank, temperature: float = 0.07) -> Tensor:
    """NPID's exact non-parametric softmax (Wu et al. 2018, eq. 2) over all N memory entries:
    P(i|f) = exp(v_i . f / t) / sum_j exp(v_j . f / t); L = mean_b -log P(i_b | f_b).
    The positive uses its memory entry v_i as is, not the current feature."""
    f = F.normalize(_f32(features), dim=1)
    logits = f @ bank.memory.to(f.dtype).T / temperature
    return F.cross_entropy(logits, indices.to(f.device))


# --------------------------------------------------------------------------------------------- MoCo v2

class MoCoQueue(nn.Module):
    """MoCo's dictionary queue (He et al. 2020): K unit vectors, overwritten oldest-first.

    Buffers: `queue` (K, D), seeded random unit vectors at start; `ptr`, the next row to overwrite;
    with `indexed`, `index` (K,): the dataset index of the clip each key came from (-1: none yet),
    so a query's own earlier keys can be told from the other clips' (``moco_loss``).
    """

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None, indexed: bool = False):
        super().__init__()
        self.register_buffer("queue", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        if indexed:  # only then: checkpoints of queues without it load as they were saved
            self.register_buffer("index", torch.full((size,), -1, dtype=torch.long))

    @property
    def indexed(self) -> bool:
        return hasattr(self, "index")

    @torch.no_grad()
    def enqueue(self, keys: Tensor, indices: Tensor | None = None, gather: bool = True) -> None:
        """Write keys (B, D) at ptr, and their clips' `indices` (B,) if the queue is indexed,
        wrapping past the end to the start; ptr <- (ptr + B) mod K.

        K need not be a multiple of B. If B > K only the last K keys survive (as if written one by
        one). Under torch.distributed with `gather`, keys from all ranks are enqueued (rank order),
        as in the MoCo code, so every rank keeps the same queue.
        """
        if self.indexed and indices is None:
            raise ValueError("an indexed queue needs the keys' dataset indices")
        keys = F.normalize(keys.detach().to(self.queue.dtype), dim=1)
        indices = indices.to(keys.device, torch.long) if self.indexed else None
        if gather and _distributed() and dist.get_world_size() > 1:
            keys = torch.cat(_all_gather_rows(keys)[0])
            if indices is not None:
                indices = torch.cat(_all_gather_rows(indices)[0])
        size, b = self.queue.shape[0], keys.shape[0]
        start = int(self.ptr)
        if b > size:                                         # older keys would be overwritten anyway
            start, keys = (start + b - size) % size, keys[-size:]
            indices = indices[-size:] if indices is not None else None
        rows = (start + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue[rows] = keys
        if indices is not None:
            self.index[rows] = indices
        self.ptr.fill_((int(self.ptr) + b) % size)


def moco_loss(q: Tensor, k: Tensor, queue: MoCoQueue | Tensor, temperature: float = 0.2,
              indices: Tensor | None = None) -> Tensor:
    """MoCo InfoNCE (He et al. 2020, eq. 1; t = 0.2 in MoCo v2, Chen et al. 2020):

        L = -log( exp(q . k+ / t) / (exp(q . k+ / t) + sum_{k- in queue} exp(q . k- / t)) ),

    i.e. cross-entropy over logits [q . k+, q @ queue.T] / t with target 0, averaged over the batch.
    q, k: (B, D), normalised here; k comes from the momentum encoder and is detached (no gradient
    flows into the key encoder; it is updated by `momentum_update`). Enqueue k *after* this call.

    With `indices` (the queries' dataset indices, B) and an indexed queue, the queue's keys of
    the query's own clip are left out of its negatives: the paper's negatives are other
    instances, and a queue not much shorter than the pool holds an earlier view of about half
    the clips, which the loss would otherwise push each query away from.
    """
    bank = queue.queue if isinstance(queue, MoCoQueue) else queue
    q = F.normalize(_f32(q), dim=1)
    k = F.normalize(_f32(k.detach()), dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)
    negatives = q @ bank.detach().to(q.dtype).T
    if indices is not None and isinstance(queue, MoCoQueue) and queue.indexed:
        own = queue.index.to(q.device)[None, :] == indices.to(q.device).view(-1, 1)
        negatives = negatives.masked_fill(own, float("-inf"))  # exp(-inf) = 0: not in the sum
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float = 0.999) -> None:
    """EMA of the key / target encoder (He et al. 2020, eq. 2): theta_t <- m theta_t + (1 - m) theta_o.
    Buffers (e.g. BatchNorm running stats) are copied. Modules must have the same structure."""
    pairs = {}
    for kind in ("parameters", "buffers"):
        a, b = list(getattr(online, "named_" + kind)()), list(getattr(target, "named_" + kind)())
        if [n for n, _ in a] != [n for n, _ in b]:                     # check everything before touching anything
            raise ValueError(f"momentum_update: online and target {kind} differ")
        pairs[kind] = [(x, y) for (_, x), (_, y) in zip(a, b)]
    for p_o, p_t in pairs["parameters"]:
        p_t.mul_(m).add_(p_o.detach(), alpha=1 - m)
    for b_o, b_t in pairs["buffers"]:
        b_t.copy_(b_o)
