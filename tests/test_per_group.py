"""Per-group means (fqexport.quant.per_group), used by the fine-tuning losses, AdaRound and the
sensitivity tables."""

from __future__ import annotations

import numpy as np
import torch

from fqexport.quant.per_group import group_means


def test_group_means_handle_an_empty_group():
    v = torch.tensor([1.0, 3.0, 5.0])
    g = torch.tensor([0, 0, 2])
    means, counts = group_means(v, g, 3)
    np.testing.assert_allclose(means.numpy(), [2.0, 0.0, 5.0])
    assert counts.tolist() == [2.0, 0.0, 1.0]


def test_group_means_are_numpys_means_per_group():
    rng = np.random.default_rng(0)
    v = rng.normal(size=50)
    g = rng.integers(0, 4, size=50)
    means, counts = group_means(torch.from_numpy(v), torch.from_numpy(g), 5)
    np.testing.assert_allclose(means.numpy(), [v[g == k].mean() for k in range(4)] + [0.0], rtol=1e-12)
    assert counts.tolist() == np.bincount(g, minlength=5).tolist()


def test_group_means_keep_the_dtype_of_the_values():
    g = torch.tensor([0, 1, 1])
    single = group_means(torch.tensor([1.0, 2.0, 4.0]), g, 2)
    double = group_means(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64), g, 2)
    assert single[0].dtype == single[1].dtype == torch.float32
    assert double[0].dtype == double[1].dtype == torch.float64
    assert double[0].tolist() == [1.0, 3.0]
