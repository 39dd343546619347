"""Pair masks shared by every loss of the (query, key) signature.

Every loss in `xbm_tf.losses` compares a set of queries with a set of keys. The keys
are either the queries themselves (the in-batch loss) or the rows of a
`CrossBatchMemory` (the XBM loss). This module builds the masks that tell which
(query, key) pairs are positives and negatives, once, for all of them.
"""

from __future__ import annotations

from keras import ops


def similarity_matrix(query_embeddings, key_embeddings):
    """Cosine similarities `(B, M)` of L2-normalised query and key embeddings."""
    query_embeddings = ops.cast(query_embeddings, "float32")
    key_embeddings = ops.cast(key_embeddings, "float32")
    return ops.matmul(query_embeddings, ops.transpose(key_embeddings))


def pair_masks(query_labels, key_labels, key_mask=None, query_key_index=None):
    """Boolean masks of the positive and negative (query, key) pairs.

    Args:
        query_labels: integer labels, shape `(B,)`.
        key_labels: integer labels, shape `(M,)`.
        key_mask: optional boolean `(M,)`; keys where it is False take part in no
            pair (the empty rows of a memory).
        query_key_index: optional integer `(B,)`; entry `i` is the index of the key
            that *is* query `i` (the same sample), which is then paired with
            nothing. A negative entry means that query has no copy among the keys.

    Returns:
        `(positive, negative)`, two boolean tensors of shape `(B, M)`.
    """
    query_labels = ops.reshape(query_labels, (-1, 1))
    key_labels = ops.reshape(key_labels, (1, -1))
    same = ops.equal(query_labels, ops.cast(key_labels, query_labels.dtype))
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
