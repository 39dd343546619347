"""Pair masks shared by every loss of the (query, key) signature.

Every loss in `xbm_tf.losses` compares a set of queries with a set of keys. The keys
are either the queries themselves (the in-batch loss) or the rows of a
`CrossBatchMemory` (the XBM loss). This module builds the masks that tell which
(query, key) pairs are positives and negatives, once, for all of them.
"""

from __future__ import annotations

import keras
from keras import ops

from xbm_tf.losses.matmul_dtype import matmul_dtype


def check_labels(labels, name: str):
    """`labels` as an int64 tensor, or a TypeError if they cannot compare exactly.

    Labels are compared for equality, so they must be integers: floats (for
    instance labels Keras cast to the loss dtype) merge large labels (float32
    from 2^24, float16 from 2048), and uint64 labels above 2^63 do not fit int64.
    Every other integer dtype is widened to int64, so any two label tensors
    compare exactly whatever their dtypes.
    """
    labels = ops.convert_to_tensor(labels)
    dtype = keras.backend.standardize_dtype(labels.dtype)
    if dtype == "uint64":
        raise TypeError(
            f"{name} are uint64, which int64 cannot hold exactly: use int64 labels"
        )
    if "int" not in dtype:
        raise TypeError(
            f"{name} must be integers, got {dtype}: float labels merge large "
            "labels (float32 from 2^24, float16 from 2048); pass integer labels"
        )
    return ops.cast(labels, "int64")


def similarity_matrix(query_embeddings, key_embeddings):
    """Cosine similarities `(B, M)` of L2-normalised query and key embeddings.

    The result is float32. Half-precision keys (a bfloat16 or float16 memory)
    are multiplied as stored where this machine has a fast matmul for them (a
    GPU, a CPU with AVX-512 BF16 or AMX; see `matmul_dtype`), with the queries
    cast to their dtype, and the product (rounded to that dtype, as in
    `fused_contrastive_loss`) is cast to float32: casting the keys instead
    would copy all `M x D` of them on every call. Elsewhere, and for other
    keys, the matmul is float32.
    """
    key_embeddings = ops.convert_to_tensor(key_embeddings)
    dtype = keras.backend.standardize_dtype(key_embeddings.dtype)
    if dtype not in ("bfloat16", "float16"):
        dtype = "float32"
    dtype = matmul_dtype(dtype).name
    query_embeddings = ops.cast(query_embeddings, dtype)
    key_embeddings = ops.cast(key_embeddings, dtype)
    sim = ops.matmul(query_embeddings, ops.transpose(key_embeddings))
    return ops.cast(sim, "float32")


def pair_masks(query_labels, key_labels, key_mask=None, query_key_index=None):
    """Boolean masks of the positive and negative (query, key) pairs.

    Args:
        query_labels: integer labels, shape `(B,)`, any integer dtype but uint64.
        key_labels: integer labels, shape `(M,)`, any integer dtype but uint64;
            both are widened to int64 (float labels are a TypeError).
        key_mask: optional boolean `(M,)`; keys where it is False take part in no
            pair (the empty rows of a memory).
        query_key_index: optional integer `(B,)`; entry `i` is the index of the key
            that *is* query `i` (the same sample), which is then paired with
            nothing. A negative entry means that query has no copy among the keys.

    Returns:
        `(positive, negative)`, two boolean tensors of shape `(B, M)`.
    """
    # Both widened to int64: labels compare exactly whatever their integer dtypes.
    query_labels = ops.reshape(check_labels(query_labels, "query_labels"), (-1, 1))
    key_labels = ops.reshape(check_labels(key_labels, "key_labels"), (1, -1))
    same = ops.equal(query_labels, key_labels)
    valid = ops.ones_like(same)
    if key_mask is not None:
        valid = ops.logical_and(valid, ops.reshape(ops.cast(key_mask, "bool"), (1, -1)))
    if query_key_index is not None:
        num_keys = ops.shape(key_labels)[1]
        key_ids = ops.arange(num_keys, dtype="int32")
        own = ops.reshape(ops.cast(query_key_index, "int32"), (-1, 1))
        valid = ops.logical_and(
            valid, ops.not_equal(own, ops.reshape(key_ids, (1, -1)))
        )
    positive = ops.logical_and(same, valid)
    negative = ops.logical_and(ops.logical_not(same), valid)
    return positive, negative


def masked_max(values, mask, axis=-1):
    """Max of `values` over `mask` along `axis`; -inf-free (returns -2 if empty).

    Similarities of unit vectors lie in [-1, 1], so -2 is below every real value.
    """
    return ops.max(ops.where(mask, values, -2.0), axis=axis)


def masked_min(values, mask, axis=-1):
    """Min of `values` over `mask` along `axis`; returns 2 if the mask is empty."""
    return ops.min(ops.where(mask, values, 2.0), axis=axis)
