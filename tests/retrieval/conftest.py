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
