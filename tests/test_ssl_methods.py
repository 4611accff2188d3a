"""The self-supervised methods' batch handling: MoCo's BatchNorm groups with the keys shuffled
across them (shuffle BN on one device)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from audiofx.training.models.ssl.losses import moco_loss
from audiofx.training.models.ssl.moco import MoCo, in_groups


class BatchNormEncoder(nn.Sequential):
    """An encoder whose output depends on the other clips of its batch (BatchNorm in training
    mode), as a CNN's does: flatten, then normalise every feature over the batch."""

    def __init__(self, features: int):
        super().__init__(nn.Flatten(), nn.BatchNorm1d(features))
        self.out_dim = features


def identity_view(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def moco(bn_splits: int) -> MoCo:
    torch.manual_seed(0)
    return MoCo(BatchNormEncoder(6), n_data=100, generator=torch.Generator().manual_seed(0), dim=4, queue=16,
                bn_splits=bn_splits)


def test_moco_groups_normalise_queries_in_order_and_keys_shuffled():
    x = torch.randn(8, 1, 2, 3)
    method = moco(bn_splits=4).train()
    gen = torch.Generator().manual_seed(5)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(5))  # the draw the method makes
    loss = method.loss(x, torch.arange(8), identity_view, gen)
    keys, indices = method._pending
    assert indices.tolist() == list(range(8))

    def key_of(clips: torch.Tensor) -> torch.Tensor:
        return method.key_head(method.key_encoder(clips))

    # Each key was normalised with the 2 clips of its shuffled group and is back at its clip's row.
    expected = torch.empty_like(keys)
    for group in order.tensor_split(4):
        expected[group] = key_of(x[group])
    torch.testing.assert_close(keys, expected)
    # The groups matter: with the whole batch's statistics every key is different.
    whole = key_of(x)
    assert not torch.allclose(keys, whole, atol=1e-3)
    # Queries: consecutive groups of the batch, one forward each; the loss is theirs.
    q = in_groups((method.encoder, method.head), x, 4)
    torch.testing.assert_close(q[:2], method.head(method.encoder(x[:2])))
    torch.testing.assert_close(loss, moco_loss(q, keys, method.queue, method.temperature))
    assert not torch.isclose(loss, moco_loss(method.head(method.encoder(x)), keys, method.queue, method.temperature))


def test_moco_groups_shrink_for_short_batches_and_one_group_is_plain_batchnorm():
    method = moco(bn_splits=4)
    assert [method.groups(b) for b in (1, 2, 3, 5, 8, 64)] == [1, 1, 1, 2, 4, 4]  # 2 clips per group at least
    # One group: the keys of plain BatchNorm over the whole batch, and no draw from the generator
    # (runs recorded before the groups existed continue as they ran).
    plain = moco(bn_splits=1).train()
    x = torch.randn(8, 1, 2, 3)
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    plain.loss(x, torch.arange(8), identity_view, gen)
    assert torch.equal(gen.get_state(), state)
    torch.testing.assert_close(plain._pending[0], plain.key_head(plain.key_encoder(x)))


def test_moco_groups_train_end_to_end():
    """A step with groups: the loss is finite, gradients reach the encoder, the keys are queued."""
    method = moco(bn_splits=3).train()
    x = torch.randn(7, 1, 2, 3)
    loss = method.loss(x, torch.arange(7), identity_view, torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and method.encoder[1].weight.grad.abs().sum() > 0
    method.after_step()
    torch.testing.assert_close(method.queue.queue[:7], F.normalize(method._pending[0], dim=1))
    assert method.queue.index[:7].tolist() == list(range(7)) and (method.queue.index[7:] == -1).all()
    # Without the masking the queue keeps no indices: checkpoints of runs from before it load as saved.
    old = MoCo(BatchNormEncoder(6), n_data=100, generator=torch.Generator().manual_seed(0), dim=4, queue=16,
               own_keys_masked=0)
    assert "queue.index" in method.state_dict() and "queue.index" not in old.state_dict()


def test_moco_groups_update_batchnorm_running_statistics_once_per_step():
    """As SplitBatchNorm does: one update with the mean of the groups' statistics (not one per
    group, which would move them 4 times a step, towards the last group most)."""
    x = torch.randn(8, 1, 2, 3)
    x[6:] += 10  # the last group far from the rest
    method = moco(bn_splits=4).train()
    method.loss(x, torch.arange(8), identity_view, torch.Generator().manual_seed(5))
    norm = method.encoder[1]
    groups = x.flatten(1).tensor_split(4)
    mean = torch.stack([g.mean(0) for g in groups]).mean(0)
    var = torch.stack([g.var(0, unbiased=True) for g in groups]).mean(0)
    torch.testing.assert_close(norm.running_mean, 0.1 * mean)
    torch.testing.assert_close(norm.running_var, 0.9 * torch.ones(6) + 0.1 * var)
    assert int(norm.num_batches_tracked) == 1 and norm.momentum == 0.1
    # The key encoder's groups are the shuffled ones.
    order = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    key_groups = x.flatten(1)[order].tensor_split(4)
    torch.testing.assert_close(method.key_encoder[1].running_mean, 0.1 * torch.stack([g.mean(0) for g in key_groups]).mean(0))
    assert int(method.key_encoder[1].num_batches_tracked) == 1
