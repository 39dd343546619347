"""The contrastive loss against constant keys, with a hand-written gradient.

`contrastive_loss` builds its result from a chain of elementwise operations over
the `(B, M)` pairs (label comparison, masks, selects, a sum), and its automatic
gradient runs a similar chain backwards. Without XLA every one of them is a
separate pass over `B x M` values, and against a large memory these passes cost
about as much as the two matmuls. `fused_contrastive_loss` gives the same values
and the same query gradients with two XLA-compiled functions, whatever the
compile mode of the caller:

- forward: the matmul `q @ k.T` in the keys' dtype (float32, bfloat16 or
  float16) and the masked pass that produces the per-query losses in float32 and
  the `(B, M)` matrix `dL/ds`, which is -1 on positives, +1 on hard negatives and
  0 elsewhere;
- backward: the matmul of that matrix with the keys, in the keys' dtype, scaled
  by the upstream gradient per query.

The keys are constants (no gradient flows to them): this is the loss of a batch
against a `CrossBatchMemory`, whose rows are stop-gradient copies. They may be
given as the memory's variable itself, which the two functions then read inside
XLA. That matters without XLA: once a variable has been written by a scatter (the
enqueue), TensorFlow's graph executor copies the whole variable on every dense
read (its "copy-on-read" mode for sparsely updated variables), 140 ms for a
65,536 x 512 float32 memory on our CPU, while an XLA function reads it in place.
"""

from __future__ import annotations

import tensorflow as tf

from xbm_tf.losses.base import PairLoss, check_pair_reduction
from xbm_tf.losses.contrastive import ContrastiveLoss, mean_weights
from xbm_tf.losses.pairs import check_labels, pair_masks

MATMUL_DTYPES = ("float32", "bfloat16", "float16")


def _keys_of(key_embeddings):
    """`(keys, (dtype, storage_dtype, shape))`: the keys as a tensor, or a handle,
    and how to read them (Python values).

    A `CrossBatchMemory.keys()` (anything with `handle`, `dtype`, `storage_dtype`
    and `shape`), a `tf.Variable` or a Keras variable of the TensorFlow backend
    is passed on as its resource handle, to be read inside XLA; anything else is
    converted to a tensor.
    """
    handle = getattr(key_embeddings, "handle", None)
    if isinstance(handle, tf.Tensor) and handle.dtype == tf.resource:
        dtype = tf.as_dtype(key_embeddings.dtype)
        storage_dtype = tf.as_dtype(getattr(key_embeddings, "storage_dtype", dtype))
        shape = tf.TensorShape(key_embeddings.shape)
        return handle, (dtype, storage_dtype, shape)
    keys = tf.stop_gradient(tf.convert_to_tensor(key_embeddings))
    return keys, (keys.dtype, keys.dtype, keys.shape)


def _read(keys, spec):
    """The key values: a handle is read in place (inside XLA) and, when it
    stores bit patterns, bit-cast to `dtype`."""
    if keys.dtype != tf.resource:
        return keys
    dtype, storage_dtype, shape = spec
    value = tf.raw_ops.ReadVariableOp(resource=keys, dtype=storage_dtype)
    value.set_shape(shape)
    if storage_dtype != dtype:
        value = tf.bitcast(value, dtype)
    return tf.stop_gradient(value)


def dense_keys(key_embeddings):
    """The keys as one dense tensor, for a loss that has no in-place read."""
    return _read(*_keys_of(key_embeddings))  # both stop the gradient


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def _forward(
    queries, keys, query_labels, key_labels, key_mask, own, margin, spec, mean
):
    """Per-query losses and `dL/ds`, in one XLA function.

    Args:
        queries: `(B, D)` float32.
        keys: `(M, D)` keys, or a variable's resource handle.
        query_labels, key_labels: int64 `(B,)` and `(M,)`.
        key_mask: bool `(M,)`.
        own: int32 `(B,)`, the key index of each query's own copy (-1: none).
        margin: float32 scalar.
        spec: `(dtype, storage_dtype, shape)` of the keys, Python values.
        mean: Python bool, `pair_reduction == "mean"`: the pair costs and
            coefficients are scaled by `mean_weights` (1 / the query's number of
            positives, or of hard negatives).

    Returns:
        `(losses (B,) float32, coefficients (B, M) in the keys' dtype)`.
    """
    keys = _read(keys, spec)
    sim = tf.matmul(tf.cast(queries, keys.dtype), keys, transpose_b=True)
    s = tf.cast(sim, tf.float32)
    positive, negative = pair_masks(query_labels, key_labels, key_mask, own)
    hard = tf.logical_and(negative, tf.greater(s, margin))
    zero = tf.zeros_like(s)
    cost = tf.where(positive, 1.0 - s, tf.where(hard, s, zero))
    coefficients = tf.where(positive, -1.0, tf.where(hard, 1.0, zero))
    if mean:  # the counts are piecewise constant in s: dL/ds is scaled alike
        weights = mean_weights(positive, hard)
        cost, coefficients = cost * weights, coefficients * weights
    return tf.reduce_sum(cost, axis=1), tf.cast(coefficients, keys.dtype)


@tf.function(jit_compile=True, reduce_retracing=True, autograph=False)
def _backward(coefficients, keys, upstream, spec):
    """`g_i * sum_j c_ij k_j`: one `(B, M) x (M, D)` matmul in the keys' dtype."""
    keys = _read(keys, spec)
    grad = tf.cast(tf.matmul(coefficients, keys), tf.float32)
    return grad * tf.cast(upstream, tf.float32)[:, tf.newaxis]


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
    memory is read as stored, never copied to float32.

    Args:
        query_embeddings: `(B, D)` L2-normalised embeddings (float32).
        query_labels: `(B,)` integer labels.
        key_embeddings: `(M, D)` L2-normalised embeddings, float32, bfloat16 or
            float16; treated as constants (their gradient is None). A tensor,
            a variable, or `CrossBatchMemory.keys()`; the last two are read in
            place inside XLA rather than copied.
        key_labels: `(M,)` integer labels.
        key_mask: optional boolean `(M,)`, False for keys that must be ignored.
        query_key_index: optional integer `(B,)`, the index of each query's own copy
            among the keys (excluded); negative for none.
        neg_margin: negatives at or below this similarity cost nothing.
        pair_reduction: `"sum"` (default) or `"mean"`, as in `contrastive_loss`.

    Returns:
        The per-query losses, float32 of shape `(B,)`.

    Example:
    >>> key_labels, valid = memory.read_labels()
    >>> losses = fused_contrastive_loss(
    ...     q, y, memory.keys(), key_labels, key_mask=valid)
    """
    mean = check_pair_reduction(pair_reduction) == "mean"
    keys, spec = _keys_of(key_embeddings)
    dtype = spec[0]
    if dtype.name not in MATMUL_DTYPES:
        raise ValueError(
            f"key_embeddings must be one of {MATMUL_DTYPES}, got {dtype.name}"
        )
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
        losses, coefficients = _forward(
            queries, keys, query_labels, key_labels, key_mask, own, margin, spec, mean
        )

        def gradient(upstream):
            # d(sum_i g_i L_i)/dq_i = g_i * sum_j c_ij k_j.
            return _backward(coefficients, keys, upstream, spec)

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

    A `ContrastiveLoss` runs as `fused_contrastive_loss` (the matmuls in the keys'
    dtype). Every other loss runs its own function, whose `similarity_matrix`
    casts the keys to float32: correct, but it copies a half-precision memory to
    float32 on every call and keeps the unfused elementwise passes.

    Args:
        pair_loss: the `PairLoss` of the model.
        query_embeddings, query_labels, key_embeddings, key_labels, key_mask,
            query_key_index: as in `contrastive_loss`; `key_embeddings` may be
            `CrossBatchMemory.keys()` or a variable (read in place by the fused
            loss).

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
