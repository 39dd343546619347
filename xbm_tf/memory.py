"""CrossBatchMemory: the fixed-shape ring buffer of past embeddings and labels."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

MEMORY_DTYPES = ("float32", "bfloat16", "float16")


@keras.saving.register_keras_serializable(package="xbm_tf")
class CrossBatchMemory(keras.layers.Layer):
    """A FIFO memory of the last `memory_size` embeddings and labels.

    The state is four non-trainable weights of fixed shape, saved with the model:
    `embeddings` `(M, D)` in `memory_dtype` (float32 by default; bfloat16 or float16
    halve its bytes), `labels` `(M,)` int64, `count` (how many rows are
    valid, at most M) and `pointer` (the next row to write). `enqueue` writes a batch
    of B rows at `(pointer + arange(B)) % M` with an in-place scatter, so the memory
    is a true ring: after any sequence of enqueues, the valid rows are exactly the
    last `min(M, total)` rows enqueued. Rows are filled from 0 on, so the valid rows
    are `arange(M) < count`; emptiness is this mask, never a sentinel label, and any
    integer label may be stored.

    The writes act on the variables of the current replica (under a
    `tf.distribute` strategy, each replica writes its own copy; give every replica
    the same all-gathered rows and the copies stay identical).

    Args:
        memory_size: M, the number of rows.
        embedding_dim: D, the width of an embedding.
        memory_dtype: the dtype the embeddings are stored in: `"float32"`,
            `"bfloat16"` or `"float16"`. Enqueued rows are rounded to it; `read()`
            returns them in it.

    Example:
    >>> memory = CrossBatchMemory(memory_size=1024, embedding_dim=128)
    >>> rows = memory.enqueue(embeddings, labels)   # indices written, (B,)
    >>> keys, key_labels, valid = memory.read()

    Reference:
        Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020.
    """

    def __init__(
        self,
        memory_size: int,
        embedding_dim: int,
        memory_dtype: str = "float32",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(memory_size) < 1:
            raise ValueError(f"memory_size must be positive, got {memory_size}")
        if int(embedding_dim) < 1:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        if memory_dtype not in MEMORY_DTYPES:
            raise ValueError(
                f"memory_dtype must be one of {MEMORY_DTYPES}, got {memory_dtype!r}"
            )
        self.memory_size = int(memory_size)
        self.embedding_dim = int(embedding_dim)
        self.memory_dtype = memory_dtype
        state = dict(trainable=False, aggregation="only_first_replica")
        self.embeddings = self.add_weight(
            shape=(self.memory_size, self.embedding_dim),
            initializer="zeros",
            dtype=memory_dtype,
            name="embeddings",
            **state,
        )
        # int64, so no label is truncated (M x 8 bytes, small next to M x D x 4).
        self.labels = self.add_weight(
            shape=(self.memory_size,),
            initializer="zeros",
            dtype="int64",
            name="labels",
            **state,
        )
        self.count = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", name="count", **state
        )
        self.pointer = self.add_weight(
            shape=(), initializer="zeros", dtype="int32", name="pointer", **state
        )
        self.built = True

    def enqueue(self, embeddings, labels, active=True):
        """Writes a batch into the ring, oldest rows first overwritten.

        Args:
            embeddings: `(B, D)` embeddings; gradients do not flow into the memory.
            labels: `(B,)` integer labels, stored as int64.
            active: a Python or tensor boolean; when False the memory is left as
                it is (the rows are rewritten with their own values and neither
                pointer nor count moves). A tensor flag avoids a `tf.cond`, which
                under XLA copies the whole buffer.

        Returns:
            The int32 row indices `(B,)` the batch was (or would have been)
            written to, in batch order.
        """
        batch_size = embeddings.shape[0]
        if batch_size is None:
            raise ValueError(
                "CrossBatchMemory.enqueue needs a static batch size; build the "
                "dataset with drop_remainder=True"
            )
        if batch_size > self.memory_size:
            raise ValueError(
                f"Cannot enqueue a batch of {batch_size} into a memory of "
                f"{self.memory_size} rows: memory_size must be >= the (global) "
                "batch size"
            )
        if embeddings.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"Embeddings of width {embeddings.shape[-1]} do not fit a memory of "
                f"width {self.embedding_dim}"
            )
        embeddings = ops.stop_gradient(ops.cast(embeddings, self.memory_dtype))
        labels = ops.cast(ops.reshape(labels, (-1,)), "int64")
        pointer = ops.convert_to_tensor(self.pointer)
        rows = (pointer + ops.arange(batch_size, dtype="int32")) % self.memory_size
        step = batch_size
        if active is not True:
            active = ops.convert_to_tensor(active, "bool")
            embeddings = ops.where(active, embeddings, _gather(self.embeddings, rows))
            labels = ops.where(active, labels, _gather(self.labels, rows))
            step = ops.where(active, batch_size, 0)
        _scatter(self.embeddings, rows, embeddings)
        _scatter(self.labels, rows, labels)
        _assign(self.pointer, (pointer + step) % self.memory_size)
        count = ops.convert_to_tensor(self.count)
        _assign(self.count, ops.minimum(count + step, self.memory_size))
        return rows

    def read(self):
        """Returns `(embeddings (M, D) in memory_dtype, labels (M,), valid (M,))`.

        Outside XLA, an op that reads these embeddings densely copies all of them
        once the memory has been written (see `read_labels`).
        """
        return (ops.convert_to_tensor(self.embeddings), *self.read_labels())

    def read_labels(self):
        """Returns `(labels (M,) int64, valid (M,) bool)`, without the embeddings.

        For a loss that reads `self.embeddings` itself: TensorFlow's graph
        executor copies a variable on every dense read once a scatter has written
        it, so outside XLA a read of the `(M, D)` embeddings costs a full copy;
        `xbm_tf.losses.fused_contrastive_loss` takes the variable and reads it
        inside XLA instead.
        """
        valid = ops.less(ops.arange(self.memory_size, dtype="int32"), self.count)
        return ops.convert_to_tensor(self.labels), valid

    def fill_fraction(self):
        """The fraction of rows that hold an embedding, a float32 scalar."""
        return ops.cast(self.count, "float32") / float(self.memory_size)

    def reset(self):
        """Empties the memory (the rows are zeroed, count and pointer set to 0)."""
        self.embeddings.assign(ops.zeros_like(self.embeddings))
        self.labels.assign(ops.zeros_like(self.labels))
        self.count.assign(0)
        self.pointer.assign(0)

    def call(self, inputs=None):
        return self.read()

    def get_config(self):
        return {
            **super().get_config(),
            "memory_size": self.memory_size,
            "embedding_dim": self.embedding_dim,
            "memory_dtype": self.memory_dtype,
        }


def _scatter(variable, rows, updates):
    """In-place `variable[rows] = updates` on this replica's copy of `variable`."""
    tf.raw_ops.ResourceScatterUpdate(
        resource=variable.handle, indices=rows, updates=updates
    )


def _gather(variable, rows):
    """`variable[rows]` on this replica's copy, without a dense read of `variable`
    (which, outside XLA, copies a scattered variable whole)."""
    return tf.raw_ops.ResourceGather(
        resource=variable.handle, indices=rows, dtype=variable.dtype
    )


def _assign(variable, value):
    """In-place scalar assign on this replica's copy of `variable`."""
    tf.raw_ops.AssignVariableOp(
        resource=variable.handle, value=ops.cast(value, variable.dtype)
    )
