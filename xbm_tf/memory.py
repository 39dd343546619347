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
        if active is not True:
            active = ops.convert_to_tensor(active, "bool")
        handles = tuple(
            v.handle for v in (self.embeddings, self.labels, self.pointer, self.count)
        )
        return _write(handles, embeddings, labels, active, self.memory_size)

    def read(self):
        """Returns `(embeddings (M, D) in memory_dtype, labels (M,), valid (M,))`.

        The embeddings are the variable's own buffer, not a copy (a half-precision
        memory's uint16 bits are bit-cast, which copies nothing either): the
        enqueue writes in place inside XLA, which keeps TensorFlow from switching
        the variable to copy-on-read (see `enqueue`).
        """
        return (
            self._decode(ops.convert_to_tensor(self.embeddings)),
            *self.read_labels(),
        )

    def keys(self):
        """The embeddings as a `MemoryKeys` (the variable's handle and dtypes).

        `xbm_tf.losses.fused_contrastive_loss` and `memory_pair_loss` take it as
        `key_embeddings` and read it as `read()` does.
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
        """Returns `(labels (M,) int64, valid (M,) bool)`, without the embeddings."""
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


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def _write(handles, embeddings, labels, active, memory_size):
    """The ring write of `CrossBatchMemory.enqueue`, on this replica's variables.

    It runs in XLA, which updates the `(M, D)` buffer in place (B rows written)
    and leaves the variable as it was. The same scatter outside XLA
    (`ResourceScatterUpdate`) would put the variable in TensorFlow's copy-on-read
    mode for good: from then on every dense read copies it whole (57 ms for
    65,536 x 512 float32 on our Xeon, against 0.2 ms), so the loss's matmuls,
    which read it outside XLA on TensorFlow's own kernels, could not read it in
    place.

    Args:
        handles: the resource handles of the embeddings (stored dtype), labels,
            pointer and count variables.
        embeddings: `(B, D)` rows in the stored dtype; labels: `(B,)` int64.
        active: Python True, or a boolean tensor (False: rewrite the rows with
            their own values, move neither pointer nor count).
        memory_size: M, a Python int.

    Returns:
        The int32 rows `(B,)` written.
    """
    embeddings_handle, labels_handle, pointer_handle, count_handle = handles
    batch_size = tf.shape(embeddings)[0]  # a retrace may relax the static shape
    pointer = tf.raw_ops.ReadVariableOp(resource=pointer_handle, dtype=tf.int32)
    count = tf.raw_ops.ReadVariableOp(resource=count_handle, dtype=tf.int32)
    rows = (pointer + tf.range(batch_size, dtype=tf.int32)) % memory_size
    step = batch_size
    if active is not True:
        old = [
            tf.raw_ops.ResourceGather(resource=handle, indices=rows, dtype=new.dtype)
            for handle, new in (
                (embeddings_handle, embeddings),
                (labels_handle, labels),
            )
        ]
        embeddings = tf.where(active, embeddings, old[0])
        labels = tf.where(active, labels, old[1])
        step = tf.where(active, batch_size, 0)
    for handle, updates in ((embeddings_handle, embeddings), (labels_handle, labels)):
        tf.raw_ops.ResourceScatterUpdate(resource=handle, indices=rows, updates=updates)
    tf.raw_ops.AssignVariableOp(
        resource=pointer_handle, value=(pointer + step) % memory_size
    )
    tf.raw_ops.AssignVariableOp(
        resource=count_handle, value=tf.minimum(count + step, memory_size)
    )
    return rows
