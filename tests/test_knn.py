import numpy as np
import torch

from audiofx.training.stages.knn import choose_k, cv_groups, knn_scores


def test_weighted_votes_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    scores = knn_scores(train, labels, test, n_classes=2, k=2, temperature=0.5)
    # nearest two: sim 1.0 (class 0) and 0.8 (class 1)
    assert torch.allclose(scores, torch.tensor([[np.exp(1.0 / 0.5), np.exp(0.8 / 0.5)]], dtype=torch.float32))
    all3 = knn_scores(train, labels, test, n_classes=2, k=200, temperature=0.5)  # k capped at N
    assert torch.allclose(all3[0, 1], torch.tensor(np.exp(0.8 / 0.5) + np.exp(0.0), dtype=torch.float32))


def test_choose_k_uses_training_folds_only():
    rng = np.random.default_rng(0)
    centers = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    labels = torch.from_numpy(rng.integers(0, 3, 60))
    feats = centers[labels] + 0.3 * torch.randn(60, 3, generator=torch.Generator().manual_seed(0))
    groups = np.arange(60) % 3
    k, acc = choose_k(feats, labels, groups, 3, candidates=(1, 5, 200))
    assert set(acc) == {1, 5, 200} and acc[k] == max(acc.values()) and acc[k] > 0.9


def test_cv_groups_are_the_training_folds_or_stratified_seeded_parts_of_one():
    labels = torch.arange(40) % 4  # 10 of each class
    folds = np.array(["1", "2"] * 20)
    assert np.array_equal(cv_groups(["1", "2"], folds, labels), folds)
    one = cv_groups(["train"], np.array(["train"] * 40), labels, seed=3)
    assert sorted(np.unique(one).tolist()) == [0, 1, 2, 3, 4]
    assert all(np.bincount(labels.numpy()[one == g]).tolist() == [2, 2, 2, 2] for g in range(5))  # stratified
    assert np.array_equal(one, cv_groups(["train"], np.array(["train"] * 40), labels, seed=3))
    assert not np.array_equal(one, cv_groups(["train"], np.array(["train"] * 40), labels, seed=4))
    multi = torch.zeros(12, 3, dtype=torch.long)  # multi-hot rows: plain parts
    assert sorted(np.unique(cv_groups(["train"], np.array(["train"] * 12), multi)).tolist()) == [0, 1, 2, 3, 4]
    # one training fold: k is still cross-validated, on its fifths (separable clusters: every k is
    # right, and ties go to the smallest)
    centers = torch.eye(4) * 5
    feats = centers[labels] + torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    k, acc = choose_k(feats, labels, one, 4, candidates=(1, 5, 35))
    assert set(acc) == {1, 5, 35} and min(acc.values()) > 0.9 and k == 1
    # one training clip: nothing can be held out, so no k is chosen (not k=1 scored 0)
    assert choose_k(feats[:1], labels[:1], np.zeros(1, dtype=int), 4, candidates=(1, 5)) == (None, {})
