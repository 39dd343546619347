"""CrossBatchMemory: the fixed-shape ring buffer of past embeddings and labels."""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
from keras import ops

MEMORY_DTYPES = ("float32", "bfloat16", "float16")
# Half-precision embeddings are stored as their 16-bit patterns: XLA's CPU backend
# widens a whole bfloat16 or float16 buffer to float32 around a scatter (90 ms and
# 257 MB at 65,536 x 512 for a 64-row enqueue), while a uint16 scatter writes B rows.
_HALF_DTYPES = ("bfloat16", "float16")


class MemoryKeys(NamedTuple):
    """The memory's embeddings as a loss reads them in place (see
    `CrossBatchMemory.keys`): the variable's resource handle, the dtype of the
    values, the dtype they are stored in (uint16 bit patterns for half
    precision) and the shape `(M, D)`."""

    handle: tf.Tensor
    dtype: tf.DType
    storage_dtype: tf.DType
    shape: tf.TensorShape


@keras.saving.register_keras_serializable(package="xbm_tf")
class CrossBatchMemory(keras.layers.Layer):
    """A FIFO memory of the last `memory_size` embeddings and labels.

    The state is four non-trainable weights of fixed shape, saved with the model:
    `embeddings` `(M, D)` in `memory_dtype` (float32 by default; bfloat16 or float16
    halve its bytes, and are stored as their uint16 bit patterns, which XLA
    scatters in place on a CPU), `labels` `(M,)` int64, `count` (how many rows are
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
            and `keys()` give them in it. A half-precision memory's variable
            `embeddings` holds the uint16 bit patterns.

    Example:
    >>> import numpy as np
    >>> memory = CrossBatchMemory(memory_size=4, embedding_dim=2)
    >>> embeddings = np.array([[1, 0], [0, 1], [0.6, 0.8]], "float32")
    >>> memory.enqueue(embeddings, np.array([7, 8, 9])).numpy().tolist()  # rows
    [0, 1, 2]
    >>> memory.enqueue(embeddings[:2], np.array([5, 6])).numpy().tolist()  # wraps
    [3, 0]
    >>> keys, key_labels, valid = memory.read()
    >>> key_labels.numpy().tolist(), valid.numpy().tolist()
    ([6, 8, 9, 5], [True, True, True, True])

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
        self.storage_dtype = "uint16" if memory_dtype in _HALF_DTYPES else memory_dtype
        state = dict(trainable=False, aggregation="only_first_replica")
        self.embeddings = self.add_weight(
            shape=(self.memory_size, self.embedding_dim),
            initializer="zeros",  # +0.0 is the all-zero bit pattern in every dtype
            dtype=self.storage_dtype,
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
        embeddings = self._encode(
            ops.stop_gradient(ops.cast(embeddings, self.memory_dtype))
        )
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
        return (
            self._decode(ops.convert_to_tensor(self.embeddings)),
            *self.read_labels(),
        )

    def keys(self):
        """The embeddings for a loss that reads them in place, a `MemoryKeys`.

        `xbm_tf.losses.fused_contrastive_loss` takes it as `key_embeddings` and
        reads (and, for half precision, bit-casts) the variable inside XLA.
        """
        return MemoryKeys(
            self.embeddings.handle,
            tf.as_dtype(self.memory_dtype),
            tf.as_dtype(self.storage_dtype),
            tf.TensorShape((self.memory_size, self.embedding_dim)),
        )

    def assign_embeddings(self, embeddings):
        """Overwrites all M rows with `(M, D)` values rounded to `memory_dtype`
        (labels, count and pointer are left as they are)."""
        self.embeddings.assign(self._encode(ops.cast(embeddings, self.memory_dtype)))

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

    def _encode(self, values):
        """`memory_dtype` values -> what the variable stores."""
        if self.storage_dtype == self.memory_dtype:
            return values
        return tf.bitcast(values, tf.uint16)

    def _decode(self, stored):
        """What the variable stores -> `memory_dtype` values."""
        if self.storage_dtype == self.memory_dtype:
            return stored
        return tf.bitcast(stored, tf.as_dtype(self.memory_dtype))

    def load_own_variables(self, store):
        # Files written before half-precision memories were stored as bits hold
        # the embeddings as bfloat16 / float16 values: take their bit patterns.
        stored = store["0"] if "0" in store else None
        if self.storage_dtype == "uint16" and stored is not None:
            stored = np.asarray(stored)
            if stored.dtype != np.uint16 and stored.dtype.itemsize == 2:
                store = {key: store[key] for key in store.keys()}
                store["0"] = stored.view(np.uint16)
        super().load_own_variables(store)

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
