"""P x K class-balanced sampling: batches of P classes with K images each."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class PKSampler:
    """An infinite, seeded stream of P x K batches of image indices.

    Each batch picks `p` distinct classes uniformly at random, then `k` images
    of each class: without replacement when the class has at least `k` images;
    otherwise every image of the class once plus `k - n` drawn with replacement.
    A batch lists the `k` indices of its first class, then of its second, etc.

    Every call to `iter()` restarts the same stream: the stream depends only on
    `labels`, `p`, `k` and `seed`.

    Args:
        labels: int array `(N,)` of class ids.
        p: classes per batch.
        k: images per class.
        seed: the random seed.

    Example:

    >>> sampler = PKSampler(np.array([0, 0, 1, 1, 2, 2]), p=2, k=2, seed=0)
    >>> batch = next(iter(sampler))
    >>> batch.shape
    (4,)
    """

    def __init__(self, labels, p: int, k: int, seed: int = 0):
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(
                f"labels must be a non-empty 1-D array, got shape {labels.shape}."
            )
        if p < 1 or k < 1:
            raise ValueError(f"p and k must be >= 1, got p={p}, k={k}.")
        classes, inverse = np.unique(labels, return_inverse=True)
        if p > len(classes):
            raise ValueError(
                f"p={p} classes per batch, but the labels have only "
                f"{len(classes)} classes."
            )
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse.reshape(-1)))[:-1]
        self.members = np.split(order.astype(np.int64), bounds)
        self.classes = classes
        self.p = p
        self.k = k
        self.seed = seed

    @property
    def batch_size(self) -> int:
        """`p * k`."""
        return self.p * self.k

    @property
    def num_classes(self) -> int:
        """The number of distinct classes in `labels`."""
        return len(self.classes)

    def __iter__(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        k = self.k
        while True:
            chosen = rng.choice(len(self.members), size=self.p, replace=False)
            batch = []
            for c in chosen:
                members = self.members[c]
                if len(members) >= k:
                    batch.append(rng.choice(members, size=k, replace=False))
                else:
                    extra = rng.choice(members, size=k - len(members), replace=True)
                    batch.append(rng.permutation(np.concatenate([members, extra])))
            yield np.concatenate(batch)
