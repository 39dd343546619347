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

    Batch `step` is a function of `(seed, step)` alone (`batch(step)` draws it
    from a generator seeded with `[seed, step]`), so a stream can start at any
    step: `iter_from(s)` yields exactly the batches that `iter()` yields from
    its `s`-th on (a resumed run sees the batches it would have seen). Every call
    to `iter()` restarts the same stream.

    Args:
        labels: int array `(N,)` of class ids.
        p: classes per batch.
        k: images per class.
        seed: the random seed (>= 0).

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
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
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
        self.seed = int(seed)

    @property
    def batch_size(self) -> int:
        """`p * k`."""
        return self.p * self.k

    @property
    def num_classes(self) -> int:
        """The number of distinct classes in `labels`."""
        return len(self.classes)

    def batch(self, step: int) -> np.ndarray:
        """The batch of step `step` (0-based): int64 `(p * k,)` image indices.

        Args:
            step: the step (>= 0).

        Returns:
            The `k` indices of the first class, then of the second, etc.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        rng = np.random.default_rng([self.seed, step])
        k = self.k
        chosen = rng.choice(len(self.members), size=self.p, replace=False)
        batch = []
        for c in chosen:
            members = self.members[c]
            if len(members) >= k:
                batch.append(rng.choice(members, size=k, replace=False))
            else:
                extra = rng.choice(members, size=k - len(members), replace=True)
                batch.append(rng.permutation(np.concatenate([members, extra])))
        return np.concatenate(batch)

    def iter_from(self, start_step: int) -> Iterator[np.ndarray]:
        """The infinite stream from step `start_step` on: `batch(s)` for s >= it."""
        step = int(start_step)
        while True:
            yield self.batch(step)
            step += 1

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.iter_from(0)
