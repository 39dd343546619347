"""The contrastive loss against constant keys, with a hand-written gradient.

`contrastive_loss` builds its result from a chain of elementwise operations over
the `(B, M)` pairs (label comparison, masks, selects, a sum), and its automatic
gradient runs a similar chain backwards. Without XLA every one of them is a
separate pass over `B x M` values, and against a large memory these passes cost
about as much as the two matmuls. `fused_contrastive_loss` gives the same values
and the same query gradients with two matmuls and one fused pass:

- forward: the matmul `q @ k.T` in the keys' dtype (float32, bfloat16 or
  float16), then the masked pass, one XLA function, that produces the per-query
  losses in float32 and the `(B, M)` matrix `dL/ds`, which is -1 on positives,
  +1 on hard negatives and 0 elsewhere;
- backward: the matmul of that matrix with the keys, in the keys' dtype, scaled
  by the upstream gradient per query.

The two matmuls run on TensorFlow's own kernels (oneDNN on a CPU) unless the
caller is itself compiled with XLA. On a CPU with AVX-512 BF16 or AMX, oneDNN's
bfloat16 matmul runs at twice its float32 rate, while XLA's CPU backend computes
a bfloat16 dot in float32 and its float32 dot is slower than oneDNN's. On a CPU
without a fast half-precision dot the keys are cast to float32 first
(`matmul_dtype`): TensorFlow's half matmul there is 2-3x slower than float32.

The keys are constants (no gradient flows to them): this is the loss of a batch
against a `CrossBatchMemory`, whose rows are stop-gradient copies. They may be
given as the memory's variable (or `CrossBatchMemory.keys()`), which is read
densely. That read copies nothing as long as the variable has not been written
by a scatter outside XLA (which puts it in TensorFlow's copy-on-read mode): the
memory's enqueue scatters inside XLA for that reason.
"""

from __future__ import annotations

import tensorflow as tf

from xbm_tf.losses.base import PairLoss, check_pair_reduction
from xbm_tf.losses.contrastive import ContrastiveLoss, mean_weights
from xbm_tf.losses.matmul_dtype import matmul_dtype
from xbm_tf.losses.pairs import check_labels, pair_masks

MATMUL_DTYPES = ("float32", "bfloat16", "float16")


def dense_keys(key_embeddings):
    """The keys as one dense tensor in their own dtype, never a gradient source.

    A `CrossBatchMemory.keys()` (anything with `handle`, `dtype`,
    `storage_dtype` and `shape`), a `tf.Variable` or a Keras variable of the
    TensorFlow backend is read through its resource handle (the variable's
    buffer, not a copy, unless a scatter outside XLA switched it to
    copy-on-read) and, when it stores bit patterns, bit-cast to `dtype`;
    anything else is converted to a tensor.
    """
    handle = getattr(key_embeddings, "handle", None)
    if isinstance(handle, tf.Tensor) and handle.dtype == tf.resource:
        dtype = tf.as_dtype(key_embeddings.dtype)
        storage_dtype = tf.as_dtype(getattr(key_embeddings, "storage_dtype", dtype))
        keys = tf.raw_ops.ReadVariableOp(resource=handle, dtype=storage_dtype)
        keys.set_shape(key_embeddings.shape)
        if storage_dtype != dtype:
            keys = tf.bitcast(keys, dtype)
        key_embeddings = keys
    return tf.stop_gradient(tf.convert_to_tensor(key_embeddings))


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def _masked_pass(sim, query_labels, key_labels, key_mask, own, margin, mean):
    """Per-query losses and `dL/ds` from the similarities, in one XLA function.

    Args:
        sim: `(B, M)` similarities, in the keys' dtype.
        query_labels, key_labels: int64 `(B,)` and `(M,)`.
        key_mask: bool `(M,)`.
        own: int32 `(B,)`, the key index of each query's own copy (-1: none).
        margin: float32 scalar.
        mean: Python bool, `pair_reduction == "mean"`: the pair costs and
            coefficients are scaled by `mean_weights` (1 / the query's number of
            positives, or of hard negatives).

    Returns:
        `(losses (B,) float32, coefficients (B, M) in the dtype of sim)`.
    """
    s = tf.cast(sim, tf.float32)
    positive, negative = pair_masks(query_labels, key_labels, key_mask, own)
    hard = tf.logical_and(negative, tf.greater(s, margin))
    zero = tf.zeros_like(s)
    cost = tf.where(positive, 1.0 - s, tf.where(hard, s, zero))
    coefficients = tf.where(positive, -1.0, tf.where(hard, 1.0, zero))
    if mean:  # the counts are piecewise constant in s: dL/ds is scaled alike
        weights = mean_weights(positive, hard)
        cost, coefficients = cost * weights, coefficients * weights
    return tf.reduce_sum(cost, axis=1), tf.cast(coefficients, sim.dtype)


def fused_contrastive_loss(
    query_embeddings,
    query_labels,
    key_embeddings,
    key_labels,
    key_mask=None,
    query_key_index=None,
    neg_margin: float = 0.5,
    pair_reduction: str = "sum",
):
    """`contrastive_loss` against constant keys, with a hand-written gradient.

    The values equal `contrastive_loss` (same pairs, same per-query sums, float32
    results); the gradient with respect to the queries equals its automatic
    gradient. The similarity matmul and the gradient matmul run in the dtype of
    `key_embeddings` (the queries are cast to it), so a bfloat16 or float16
    memory is read as stored, never copied to float32; without XLA they run on
    TensorFlow's kernels (oneDNN on a CPU), the masked pass between them in XLA.

    Args:
        query_embeddings: `(B, D)` L2-normalised embeddings (float32).
        query_labels: `(B,)` integer labels.
        key_embeddings: `(M, D)` L2-normalised embeddings, float32, bfloat16 or
            float16; treated as constants (their gradient is None). A tensor,
            a variable, or `CrossBatchMemory.keys()` (read as `dense_keys`).
        key_labels: `(M,)` integer labels.
        key_mask: optional boolean `(M,)`, False for keys that must be ignored.
        query_key_index: optional integer `(B,)`, the index of each query's own copy
            among the keys (excluded); negative for none.
        neg_margin: negatives at or below this similarity cost nothing.
        pair_reduction: `"sum"` (default) or `"mean"`, as in `contrastive_loss`.

    Returns:
        The per-query losses, float32 of shape `(B,)`.

    Example:
    >>> import numpy as np
    >>> from xbm_tf import CrossBatchMemory
    >>> memory = CrossBatchMemory(memory_size=8, embedding_dim=2)
    >>> _ = memory.enqueue(np.array([[1, 0], [0, 1]], "float32"), np.array([0, 1]))
    >>> key_labels, valid = memory.read_labels()  # 2 of 8 rows valid
    >>> q = np.array([[0.6, 0.8]], "float32")  # one query, of class 1
    >>> y = np.array([1])
    >>> losses = fused_contrastive_loss(
    ...     q, y, memory.keys(), key_labels, key_mask=valid)
    >>> round(float(losses[0]), 4)  # positive: 1 - 0.8; hard negative: 0.6 > 0.5
    0.8
    """
    mean = check_pair_reduction(pair_reduction) == "mean"
    keys = dense_keys(key_embeddings)
    dtype = keys.dtype
    if dtype.name not in MATMUL_DTYPES:
        raise ValueError(
            f"key_embeddings must be one of {MATMUL_DTYPES}, got {dtype.name}"
        )
    if matmul_dtype(dtype) != dtype:  # no fast half matmul on this machine
        dtype = tf.float32
        keys = tf.cast(keys, dtype)
    queries = tf.cast(query_embeddings, tf.float32)
    query_labels = check_labels(tf.reshape(query_labels, (-1,)), "query_labels")
    key_labels = check_labels(tf.reshape(key_labels, (-1,)), "key_labels")
    num_keys = tf.shape(key_labels)[0]
    if key_mask is None:
        key_mask = tf.ones((num_keys,), tf.bool)
    key_mask = tf.cast(tf.reshape(key_mask, (-1,)), tf.bool)
    if query_key_index is None:
        query_key_index = -tf.ones_like(query_labels)
    own = tf.cast(tf.reshape(query_key_index, (-1,)), tf.int32)
    margin = tf.cast(neg_margin, tf.float32)

    @tf.custom_gradient
    def loss(queries):
        sim = tf.matmul(tf.cast(queries, dtype), keys, transpose_b=True)
        losses, coefficients = _masked_pass(
            sim, query_labels, key_labels, key_mask, own, margin, mean
        )

        def gradient(upstream):
            # d(sum_i g_i L_i)/dq_i = g_i * sum_j c_ij k_j.
            grad = tf.cast(tf.matmul(coefficients, keys), tf.float32)
            return grad * tf.cast(upstream, tf.float32)[:, tf.newaxis]

        return losses, gradient

    return loss(queries)


def memory_pair_loss(
    pair_loss: PairLoss,
    query_embeddings,
    query_labels,
    key_embeddings,
    key_labels,
    key_mask=None,
    query_key_index=None,
):
    """Per-query losses of queries against constant keys (a memory).

    A `ContrastiveLoss` runs as `fused_contrastive_loss`. Every other loss runs
    its own function on the keys read densely (`dense_keys`), whose
    `similarity_matrix` multiplies a half-precision memory as stored.

    Args:
        pair_loss: the `PairLoss` of the model.
        query_embeddings, query_labels, key_embeddings, key_labels, key_mask,
            query_key_index: as in `contrastive_loss`; `key_embeddings` may be
            `CrossBatchMemory.keys()` or a variable (read by `dense_keys`).

    Returns:
        The per-query losses, float32 of shape `(B,)`.
    """
    if type(pair_loss) is ContrastiveLoss:
        return fused_contrastive_loss(
            query_embeddings,
            query_labels,
            key_embeddings,
            key_labels,
            key_mask=key_mask,
            query_key_index=query_key_index,
            neg_margin=pair_loss.neg_margin,
            pair_reduction=pair_loss.pair_reduction,
        )
    return pair_loss.pair_loss(
        query_embeddings,
        query_labels,
        dense_keys(key_embeddings),
        key_labels,
        key_mask=key_mask,
        query_key_index=query_key_index,
    )
