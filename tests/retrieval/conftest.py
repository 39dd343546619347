"""Shared data for the retrieval tests."""

from __future__ import annotations

import numpy as np
import pytest


def _clustered(n, num_classes, dim, noise, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    centers = rng.standard_normal((num_classes, dim))
    x = centers[labels] + noise * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


@pytest.fixture
def clustered():
    """A function: `clustered(n, num_classes, dim, noise, seed)` gives `n` unit
    rows around `num_classes` Gaussian centres and their int labels."""
    return _clustered


def _near_duplicates(num, dim, seed, copies=1):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((num, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    noisy = [
        base + 1e-7 * rng.standard_normal(base.shape).astype(np.float32)
        for _ in range(copies)
    ]
    x = np.concatenate([base, *noisy])
    return x[rng.permutation(len(x))]


@pytest.fixture
def near_duplicates():
    """A function: `near_duplicates(num, dim, seed, copies=1)` gives `num` unit
    rows and `copies` copies of each with 1e-7 noise, shuffled. The copies'
    exact scores differ from the originals' by less than float32 rounding, so
    float32 kernels order each group by rounding noise."""
    return _near_duplicates
