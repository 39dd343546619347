"""P x K class-balanced sampling: batches of P classes with K images each."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow as tf


class PKSampler:
    """An infinite, seeded stream of P x K batches of image indices.

    Each batch picks `p` distinct classes uniformly at random, then `k` images
    of each class: without replacement when the class has at least `k` images;
    otherwise every image of the class once plus `k - n` drawn with replacement.
    A batch lists the `k` indices of its first class, then of its second, etc.

    Batch `step` is a function of `(seed, step)` alone (`tf_batch(step)` draws
    it with stateless TensorFlow ops seeded by `(seed, step)`, in graph mode,
    e.g. in a tf.data map; `batch(step)` is the same as numpy), so a stream can
    start at any
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
        counts = np.bincount(inverse.reshape(-1))
        self._order = tf.constant(order.astype(np.int64))
        self._counts = tf.constant(counts.astype(np.int32))
        self._offsets = tf.constant(np.concatenate([[0], np.cumsum(counts)[:-1]]))
        self._width = int(max(counts.max(), k))
        self._batch_fn = None
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

    def tf_batch(self, step: tf.Tensor) -> tf.Tensor:
        """The batch of step `step` as TensorFlow ops (graph or eager).

        Stateless: the `p` classes are the top `p` of uniform keys over the
        classes (distinct, uniformly chosen), each class's images the top `k` of
        uniform keys over its members (without replacement), a class with
        `n < k` images gives all of them plus `k - n` uniform draws with
        replacement, and each class's `k` indices are shuffled.

        Args:
            step: int scalar tensor, the step (>= 0).

        Returns:
            int64 `(p * k,)` tensor of image indices.
        """
        step = tf.cast(step, tf.int64)
        seed = tf.stack([tf.constant(self.seed, tf.int64), step])
        class_seed, member_seed, extra_seed, shuffle_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, num=4)
        )
        keys = tf.random.stateless_uniform([self.num_classes], class_seed)
        chosen = tf.math.top_k(keys, self.p).indices
        counts = tf.gather(self._counts, chosen)[:, None]
        slots = tf.range(self._width)[None, :]
        keys = tf.random.stateless_uniform([self.p, self._width], member_seed)
        keys = tf.where(slots < counts, keys, -1.0)  # only the class's members
        picked = tf.math.top_k(keys, self.k).indices  # distinct, random order
        extra = tf.random.stateless_uniform(
            [self.p, self.k], extra_seed, minval=0, maxval=2**31 - 1, dtype=tf.int32
        )
        position = tf.where(slots[:, : self.k] < counts, picked, extra % counts)
        shuffle = tf.argsort(
            tf.random.stateless_uniform([self.p, self.k], shuffle_seed), axis=1
        )
        position = tf.gather(position, shuffle, batch_dims=1)
        offsets = tf.gather(self._offsets, chosen)[:, None]
        indices = tf.gather(self._order, offsets + tf.cast(position, tf.int64))
        return tf.reshape(indices, [self.p * self.k])

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
        if self._batch_fn is None:
            self._batch_fn = tf.function(
                self.tf_batch, input_signature=[tf.TensorSpec([], tf.int64)]
            )
        return self._batch_fn(tf.constant(step, tf.int64)).numpy()

    def iter_from(self, start_step: int) -> Iterator[np.ndarray]:
        """The infinite stream from step `start_step` on: `batch(s)` for s >= it."""
        step = int(start_step)
        while True:
            yield self.batch(step)
            step += 1

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.iter_from(0)
