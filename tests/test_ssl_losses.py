"""SSL losses against direct, loop-based formulas and hand-computed cases; NT-Xent also across 2 real
gloo processes (the gathered loss and its gradients must match the single-process computation)."""

from __future__ import annotations

import math
import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from audiofx.training.models.ssl.losses import (
    MemoryBank,
    MoCoQueue,
    moco_loss,
    momentum_update,
    npid_nce_loss,
    npid_softmax_loss,
    nt_xent,
)
from audiofx.training.runtime.distributed import Ranks, average_batchnorm_statistics
from tests.s3server import free_port

T = 0.5


def _batch(n: int, seed: int, dim: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=dtype), torch.randn(n, dim, generator=g, dtype=dtype)


def reference_nt_xent_rows(z1, z2, t):
    """Per-anchor SimCLR loss, straight from the paper: anchors are [view 1 rows, view 2 rows];
    l_i = -log(exp(s_ip / t) / sum_{k != i} exp(s_ik / t))."""
    u = torch.cat([z1, z2])
    u = u / u.norm(dim=1, keepdim=True)
    n = z1.shape[0]
    out = []
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        denominator = sum(torch.exp(u[i] @ u[k] / t) for k in range(2 * n) if k != i)
        out.append(-torch.log(torch.exp(u[i] @ u[p] / t) / denominator))
    return torch.stack(out)


# --------------------------------------------------------------------------------------------- NT-Xent

@pytest.mark.parametrize("b", [1, 2, 5])
def test_nt_xent_matches_loop_formula(b):
    z1, z2 = _batch(b, seed=b)
    for t in (0.1, 0.5):
        expected = reference_nt_xent_rows(z1, z2, t).mean()
        torch.testing.assert_close(nt_xent(z1, z2, temperature=t), expected, rtol=1e-10, atol=1e-12)


def test_nt_xent_b1_is_exactly_zero():
    # With B = 1 each anchor's denominator holds only its positive: -log(e^x / e^x) = 0 exactly.
    z1, z2 = _batch(1, seed=0, dtype=torch.float32)
    assert nt_xent(z1, z2).item() == 0.0


def test_nt_xent_gradients_flow_and_scale_invariance():
    z1, z2 = _batch(5, seed=3)
    z1.requires_grad_(), z2.requires_grad_()
    loss = nt_xent(z1, z2)
    loss.backward()
    for g in (z1.grad, z2.grad):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(nt_xent(3.0 * z1, 0.01 * z2), loss, rtol=1e-12, atol=1e-12)


def test_nt_xent_half_precision_input_is_computed_in_float32():
    z1, z2 = _batch(4, seed=7, dtype=torch.float32)
    out = nt_xent(z1.bfloat16(), z2.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, nt_xent(z1.bfloat16().float(), z2.bfloat16().float()))


def test_nt_xent_rejects_mismatched_views():
    with pytest.raises(ValueError):
        nt_xent(torch.randn(3, 4), torch.randn(2, 4))


# Multi-process: rank r holds rows [lo_r, lo_r + n_r) of both views of a fixed global batch.
DIST_CASES = {"equal": (3, 3), "unequal": (3, 2)}


def _npid_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(5, 4, generator=g), torch.tensor([0, 2, 4, 6, 8]), torch.randint(10, (5, 3), generator=g)


def _dist_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        results = {}
        for name, sizes in DIST_CASES.items():
            z1, z2 = _batch(sum(sizes), seed=11)
            lo = sum(sizes[:rank])
            a = z1[lo:lo + sizes[rank]].clone().requires_grad_()
            b = z2[lo:lo + sizes[rank]].clone().requires_grad_()
            loss = nt_xent(a, b, temperature=T)
            loss.backward()
            results[name] = (loss.detach(), a.grad, b.grad)
            results[name + "/local"] = nt_xent(a, b, temperature=T, gather=False).detach()
        queue = MoCoQueue(size=7, dim=4, generator=torch.Generator().manual_seed(0))
        queue.enqueue(3.0 * torch.eye(4)[rank].repeat(rank + 2, 1))      # 2 keys e_0 from rank 0, 3 keys e_1 from rank 1
        results["queue"] = (queue.queue.clone(), queue.ptr.clone())
        indexed = MoCoQueue(size=7, dim=4, generator=torch.Generator().manual_seed(0), indexed=True)
        indexed.enqueue(torch.eye(4)[rank].repeat(rank + 2, 1), torch.arange(rank + 2) + 10 * rank)
        results["queue index"] = indexed.index.clone()
        # NPID: rank 0 holds rows 0-2 and rank 1 rows 3-4 of one first batch; Z from both.
        bank = MemoryBank(10, 4, generator=torch.Generator().manual_seed(0))
        feats, idx, noise = _npid_batch()
        rows = slice(0, 3) if rank == 0 else slice(3, 5)
        npid_nce_loss(feats[rows], idx[rows], bank, temperature=0.5, noise_indices=noise[rows])
        results["z"] = bank.z.clone()
        # BatchNorm running statistics that followed each rank's share, averaged
        bn = nn.BatchNorm1d(3)
        bn.running_mean.fill_(rank + 1.0)
        bn.running_var.fill_(2.0 * (rank + 1))
        average_batchnorm_statistics(nn.Sequential(bn), Ranks(rank, world))
        results["bn"] = (bn.running_mean.clone(), bn.running_var.clone())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_losses_and_statistics_match_one_process(tmp_path):
    world = 2
    mp.spawn(_dist_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    for name, sizes in DIST_CASES.items():
        n = sum(sizes)
        z1, z2 = _batch(n, seed=11)
        z1.requires_grad_(), z2.requires_grad_()
        rows = reference_nt_xent_rows(z1, z2, T)                        # (2n,) anchors [view 1, view 2]
        full = rows.mean()
        # Rank r's loss is the mean over its own 2 n_r anchors against all 2n columns, so
        # sum_r n_r L_r / n == L_full, i.e. with equal halves mean_r L_r == L_full.
        losses = torch.stack([res[r][name][0] for r in range(world)])
        weights = torch.tensor(sizes, dtype=losses.dtype) / n
        torch.testing.assert_close((weights * losses).sum(), full.detach())
        # Gradients: rank r's inputs appear (as negatives) in every rank's loss, and GatherLayer's
        # backward sums those contributions, so rank r receives d(sum_r' L_r') / dz_r. The
        # single-process counterpart is sum_r' (1 / (2 n_r')) * (sum of rank r' anchor losses).
        # With equal halves that is world * L_full: the rank grads are world_size * the full-batch
        # grads of those rows (DDP's 1/world averaging of parameter grads then gives exactly
        # d L_full / d theta).
        lo = np.cumsum((0,) + sizes)
        per_rank = [torch.cat([rows[lo[r]:lo[r + 1]], rows[n + lo[r]:n + lo[r + 1]]]).mean() for r in range(world)]
        g1, g2 = torch.autograd.grad(sum(per_rank), (z1, z2), retain_graph=True)
        for r in range(world):
            torch.testing.assert_close(res[r][name][1], g1[lo[r]:lo[r + 1]])
            torch.testing.assert_close(res[r][name][2], g2[lo[r]:lo[r + 1]])
            # gather=False under an initialised process group: this rank's batch only.
            torch.testing.assert_close(res[r][name + "/local"], nt_xent(z1[lo[r]:lo[r + 1]], z2[lo[r]:lo[r + 1]], T).detach())
        if name == "equal":
            f1, f2 = torch.autograd.grad(full, (z1, z2))
            for r in range(world):
                torch.testing.assert_close(res[r][name][1], world * f1[lo[r]:lo[r + 1]])
                torch.testing.assert_close(res[r][name][2], world * f2[lo[r]:lo[r + 1]])

    # MoCo queue under distributed: both ranks enqueue the gathered keys in rank order.
    queues = [res[r]["queue"] for r in range(world)]
    torch.testing.assert_close(queues[0][0], queues[1][0])
    assert int(queues[0][1]) == int(queues[1][1]) == 5
    torch.testing.assert_close(queues[0][0][:5], torch.eye(4)[[0, 0, 1, 1, 1]])
    for r in range(world):  # the clips' indices travel with their keys
        assert res[r]["queue index"].tolist() == [0, 1, 10, 11, 12, -1, -1]

    # NPID's Z: both ranks fix the one-process estimate over the whole first batch
    bank = MemoryBank(10, 4, generator=torch.Generator().manual_seed(0))
    npid_nce_loss(*_npid_batch()[:2], bank, temperature=0.5, noise_indices=_npid_batch()[2])
    torch.testing.assert_close(res[0]["z"], bank.z)
    torch.testing.assert_close(res[1]["z"], bank.z)
    # BatchNorm statistics: the mean over the ranks, on every rank
    for r in range(world):
        torch.testing.assert_close(res[r]["bn"][0], torch.full((3,), 1.5))
        torch.testing.assert_close(res[r]["bn"][1], torch.full((3,), 3.0))


# --------------------------------------------------------------------------------------------- NPID

def test_memory_bank_init_and_update_by_hand():
    bank = MemoryBank(4, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(bank.memory.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(MemoryBank(4, 3, generator=torch.Generator().manual_seed(0)).memory, bank.memory)
    assert not bank.z_fixed

    bank = MemoryBank(3, 2)
    bank.memory.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    # m = 0.5: [1, 0] with new [0, 2] (normalised to [0, 1]) -> normalize([0.5, 0.5]);
    # [0.6, 0.8] with [-3, 0] -> normalize([-0.2, 0.4]) = [-1, 2] / sqrt(5).
    bank.update(torch.tensor([0, 2]), torch.tensor([[0.0, 2.0], [-3.0, 0.0]], requires_grad=True))
    r2 = 1 / math.sqrt(2)
    expected = torch.tensor([[r2, r2], [0.0, 1.0], [-1 / math.sqrt(5), 2 / math.sqrt(5)]])
    torch.testing.assert_close(bank.memory, expected)
    assert not bank.memory.requires_grad


def _numpy_nce(memory, feats, indices, noise, t, z=None):
    mem = memory.numpy().astype(np.float64)
    f = feats.detach().numpy().astype(np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    n, k = mem.shape[0], noise.shape[1]
    idx = np.concatenate([indices.numpy()[:, None], noise.numpy()], axis=1)
    e = np.exp(np.einsum("bkd,bd->bk", mem[idx], f) / t)
    if z is None:
        z = e.mean() * n
    p = e / z
    h = p / (p + k / n)
    return np.mean(-np.log(h[:, 0]) - np.log(1 - h[:, 1:]).sum(axis=1)), z


def test_npid_nce_loss_matches_numpy_and_z_is_fixed_after_first_call():
    g = torch.Generator().manual_seed(1)
    bank = MemoryBank(5, 3, generator=g)
    indices = torch.tensor([0, 3])
    noise = torch.tensor([[1, 4], [2, 2]])
    feats = torch.randn(2, 3, generator=g, requires_grad=True)
    loss = npid_nce_loss(feats, indices, bank, temperature=0.4, noise_indices=noise)
    expected, z = _numpy_nce(bank.memory, feats, indices, noise, 0.4)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert bank.z_fixed and bank.z.item() == pytest.approx(z, rel=1e-6)
    loss.backward()
    assert torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0

    # Second batch: Z stays the first batch's value.
    z_before = bank.z.clone()
    feats2 = 5 * torch.randn(2, 3, generator=g)
    noise2 = torch.tensor([[0, 1], [3, 4]])
    loss2 = npid_nce_loss(feats2, torch.tensor([1, 2]), bank, temperature=0.4, noise_indices=noise2)
    assert torch.equal(bank.z, z_before)
    expected2, _ = _numpy_nce(bank.memory, feats2, torch.tensor([1, 2]), noise2, 0.4, z=float(z_before))
    assert loss2.item() == pytest.approx(expected2, rel=1e-5)
    assert "z" in bank.state_dict()


def test_npid_nce_loss_draws_seeded_uniform_noise():
    bank = MemoryBank(50, 8, generator=torch.Generator().manual_seed(0))
    feats, idx = torch.randn(4, 8), torch.arange(4)
    a = npid_nce_loss(feats, idx, bank, k=16, generator=torch.Generator().manual_seed(5))
    b = npid_nce_loss(feats, idx, bank, k=16, generator=torch.Generator().manual_seed(5))
    noise = torch.randint(50, (4, 16), generator=torch.Generator().manual_seed(5))
    c = npid_nce_loss(feats, idx, bank, k=16, noise_indices=noise)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_npid_softmax_loss_by_hand():
    bank = MemoryBank(6, 4, generator=torch.Generator().manual_seed(2))
    feats = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), requires_grad=True)
    indices = torch.tensor([5, 0, 2])
    loss = npid_softmax_loss(feats, indices, bank, temperature=0.07)
    f = feats / feats.norm(dim=1, keepdim=True)
    e = torch.exp(f @ bank.memory.T / 0.07)
    expected = -torch.log(e[torch.arange(3), indices] / e.sum(dim=1)).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, F.cross_entropy(f @ bank.memory.T / 0.07, indices))


# --------------------------------------------------------------------------------------------- MoCo v2

def test_moco_queue_wraps_around():
    queue = MoCoQueue(size=5, dim=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(queue.queue.norm(dim=1), torch.ones(5))
    expected = queue.queue.clone()
    angle = 0.0
    # B = 2, K = 5: rows (0,1) ptr 2, (2,3) ptr 4, (4,0) ptr 1, (1,2) ptr 3, (3,4) ptr 0.
    for rows, ptr in [((0, 1), 2), ((2, 3), 4), ((4, 0), 1), ((1, 2), 3), ((3, 4), 0)]:
        keys = torch.tensor([[math.cos(angle + j), math.sin(angle + j)] for j in range(2)])
        angle += 2
        queue.enqueue(keys)
        expected[list(rows)] = keys
        torch.testing.assert_close(queue.queue, expected)
        assert int(queue.ptr) == ptr

    # B > K: as if written one by one, only the last K keys survive.
    keys = torch.tensor([[math.cos(j), math.sin(j)] for j in range(7)])
    one_by_one = MoCoQueue(5, 2)
    one_by_one.ptr.fill_(3)
    for j in range(7):
        one_by_one.enqueue(keys[j:j + 1])
    queue = MoCoQueue(5, 2)
    queue.ptr.fill_(3)
    queue.enqueue(keys)
    torch.testing.assert_close(queue.queue, one_by_one.queue)
    assert int(queue.ptr) == int(one_by_one.ptr) == (3 + 7) % 5


def test_moco_loss_by_hand():
    g = torch.Generator().manual_seed(4)
    queue = MoCoQueue(size=6, dim=3, generator=g)
    q = torch.randn(2, 3, generator=g, requires_grad=True)
    k = torch.randn(2, 3, generator=g, requires_grad=True)
    loss = moco_loss(q, k, queue, temperature=0.2)
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    terms = []
    for b in range(2):
        pos = torch.exp(qn[b] @ kn[b] / 0.2)
        neg = sum(torch.exp(qn[b] @ queue.queue[j] / 0.2) for j in range(6))
        terms.append(-torch.log(pos / (pos + neg)))
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    torch.testing.assert_close(moco_loss(q, k, queue.queue, temperature=0.2), loss)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None                                               # keys are detached


def test_moco_loss_leaves_a_querys_own_earlier_keys_out_of_its_negatives():
    g = torch.Generator().manual_seed(4)
    queue = MoCoQueue(size=6, dim=3, generator=g, indexed=True)
    assert queue.index.tolist() == [-1] * 6                            # nothing written yet: no clip's
    # From ptr 4 two keys fill rows 4-5 and four more wrap to rows 0-3; the queries are clips 7 and 5.
    queue.ptr.fill_(4)
    queue.enqueue(torch.randn(2, 3, generator=g), torch.tensor([3, 7]))   # rows 4, 5
    queue.enqueue(torch.randn(4, 3, generator=g), torch.tensor([7, 3, 7, 5]))  # rows 0-3
    assert queue.index.tolist() == [7, 3, 7, 5, 3, 7] and int(queue.ptr) == 4
    q = torch.randn(2, 3, generator=g)
    k = torch.randn(2, 3, generator=g)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    terms = []
    for b, others in ((0, (1, 3, 4)), (1, (0, 1, 2, 4, 5))):           # clip 7's rows 0, 2, 5 left out
        pos = torch.exp(qn[b] @ kn[b] / 0.2)
        neg = sum(torch.exp(qn[b] @ queue.queue[j] / 0.2) for j in others)
        terms.append(-torch.log(pos / (pos + neg)))
    masked = moco_loss(q, k, queue, temperature=0.2, indices=torch.tensor([7, 5]))
    torch.testing.assert_close(masked, torch.stack(terms).mean())
    # Without the indices (or on a queue that keeps none) every row is a negative, as in MoCo's code.
    plain = MoCoQueue(size=6, dim=3)
    plain.queue.copy_(queue.queue)
    torch.testing.assert_close(moco_loss(q, k, queue, temperature=0.2), moco_loss(q, k, plain, temperature=0.2))
    torch.testing.assert_close(moco_loss(q, k, plain, temperature=0.2, indices=torch.tensor([7, 5])),
                               moco_loss(q, k, queue.queue, temperature=0.2))
    with pytest.raises(ValueError, match="indices"):
        queue.enqueue(k)


def test_momentum_update_by_hand():
    online = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    target = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        online[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
        online[0].bias.fill_(3.0)
        target[0].weight.zero_()
        target[0].bias.fill_(1.0)
        online[1].running_mean.fill_(7.0)
    momentum_update(online, target, m=0.9)
    # 0.9 * [0, 0] + 0.1 * [1, 2] = [0.1, 0.2]; 0.9 * 1 + 0.1 * 3 = 1.2; buffers copied.
    torch.testing.assert_close(target[0].weight, torch.tensor([[0.1, 0.2]]))
    torch.testing.assert_close(target[0].bias, torch.tensor([1.2]))
    torch.testing.assert_close(target[1].running_mean, torch.tensor([7.0]))
    torch.testing.assert_close(online[0].weight, torch.tensor([[1.0, 2.0]]))    # online untouched
    with pytest.raises(ValueError):
        momentum_update(online, nn.Sequential(nn.Linear(2, 1)))
