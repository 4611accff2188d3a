"""The linear probe measures the features, not its optimiser: it separates what is linearly
separable, finds scikit-learn's logistic regression optimum, does not care about the scale of a
dimension, chooses its penalty on the training folds only, and is not far below weighted kNN."""

from __future__ import annotations

import numpy as np
import torch

from audiofx.training.stages.knn import knn_scores
from audiofx.training.stages.probe import choose_weight_decay, lbfgs_probe, sgd_probe, standardise
from audiofx.training.stages.tasks import Task


def _clusters(n_per: int, classes: int, dim: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


def test_a_linearly_separable_set_is_separated_by_both_probes():
    torch.manual_seed(0)
    x, y = _clusters(60, 5, 32, 0.5, 0)
    x = torch.relu(x) * 1e-3  # small post-ReLU magnitudes, as pooled backbone features are
    test, y_test = _clusters(20, 5, 32, 0.5, 0)  # the same centres: the seed draws them first
    test = torch.relu(test) * 1e-3
    lbfgs = lbfgs_probe(x, y, test, 5, weight_decay=1e-3)
    sgd = sgd_probe(x, y, test, 5, epochs=100, lr=1e-2, weight_decay=0.0, batch_size=64, seed=0)
    assert float((lbfgs.argmax(1) == y_test).float().mean()) == 1.0
    assert float((sgd.argmax(1) == y_test).float().mean()) >= 0.99


def test_standardising_uses_the_training_statistics_and_makes_scale_irrelevant():
    x, y = _clusters(40, 3, 8, 1.0, 1)
    test, _ = _clusters(10, 3, 8, 1.0, 1)
    a, b = standardise(x, test)
    assert torch.allclose(a.mean(0), torch.zeros(8), atol=1e-5) and torch.allclose(a.std(0), torch.ones(8), atol=1e-5)
    assert torch.allclose(b, (test - x.mean(0)) / x.std(0), atol=1e-5)  # the test fold's own statistics unused
    scaled, scaled_test = x.clone(), test.clone()
    scaled[:, 0] *= 1e4
    scaled_test[:, 0] *= 1e4
    torch.testing.assert_close(lbfgs_probe(x, y, test, 3, 1e-2), lbfgs_probe(scaled, y, scaled_test, 3, 1e-2),
                               atol=1e-3, rtol=1e-3)


def test_the_probe_reaches_scikit_learns_logistic_regression_optimum():
    """The reference: sklearn's LogisticRegression on the same standardised features, C = 1 /
    (lambda n); the same objective, so the same predictions and nearly the same probabilities."""
    from sklearn.linear_model import LogisticRegression

    x, y = _clusters(50, 4, 16, 2.5, 3)
    test, _ = _clusters(25, 4, 16, 2.5, 3)
    a, b = standardise(x, test)
    for wd in (1e-3, 1e-1):
        ours = torch.softmax(lbfgs_probe(x, y, test, 4, wd), 1)
        ref = LogisticRegression(C=1 / (wd * len(x)), max_iter=5000, tol=1e-10).fit(a.numpy(), y.numpy())
        expected = torch.from_numpy(ref.predict_proba(b.numpy())).float()
        assert torch.equal(ours.argmax(1), expected.argmax(1))
        torch.testing.assert_close(ours, expected, atol=2e-3, rtol=0)


def test_multi_label_sets_are_probed_with_one_sigmoid_per_class():
    x, y = _clusters(40, 3, 8, 0.5, 4)
    multi = torch.nn.functional.one_hot(y, 3).bool()
    multi[:, 2] |= multi[:, 0]  # class 2 is on wherever class 0 is: two labels for those clips
    scores = torch.sigmoid(lbfgs_probe(x, multi, x, 3, 1e-3, Task(multilabel=True)))
    assert ((scores > 0.5) == multi).all()


def test_the_penalty_is_chosen_on_the_training_folds_and_the_probe_is_not_far_below_knn():
    """Noisy, high-dimensional clusters (few samples per dimension, as 2048-d ResNet-50
    features of a few thousand clips): the cross-validated penalty is a strong one, and the
    probe scores within a few points of kNN or above it."""
    x, y = _clusters(30, 10, 256, 6.0, 2)
    test, y_test = _clusters(10, 10, 256, 6.0, 2)
    groups = np.arange(len(y)) % 4
    wd, cv = choose_weight_decay(x, y, groups, 10)
    assert set(cv) == {1e-4, 1e-3, 1e-2, 1e-1, 1.0} and cv[wd] == max(cv.values())
    probe = float((lbfgs_probe(x, y, test, 10, wd).argmax(1) == y_test).float().mean())
    knn = float((knn_scores(x, y, test, 10, k=20).argmax(1) == y_test).float().mean())
    assert probe >= knn - 0.05, (probe, knn)
