"""Triplet loss with hard or semi-hard negative mining, (query, key) signature."""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

from xbm_tf.losses.base import PairLoss, check_pair_reduction, hyper_parameters
from xbm_tf.losses.pairs import masked_max, masked_min, pair_masks, similarity_matrix

MINING_MODES = ("hard", "semihard")


@keras.saving.register_keras_serializable(package="xbm_tf")
def triplet_loss(
    query_embeddings,
    query_labels,
    key_embeddings,
    key_labels,
    key_mask=None,
    query_key_index=None,
    margin: float = 0.1,
    mining: str = "semihard",
    pair_reduction: str = "sum",
):
    """Per-query triplet loss on cosine similarities.

    With `s` the query-key similarities (for unit vectors, a larger similarity is a
    smaller distance, `d^2 = 2 - 2 s`, so mining on either is the same):

    - `mining="hard"` (batch-hard, Hermans et al. 2017): the least similar positive
      and the most similar negative, `max(0, s_neg - s_pos + margin)`.
    - `mining="semihard"` (FaceNet, Schroff et al. 2015): for every positive `p`, the
      most similar negative that is still less similar than `p`; where no negative
      is, the least similar negative (as TF-Addons did). The query's loss is the
      mean over its positives of `max(0, s_neg - s_pos + margin)`.

    A query without any positive or without any negative key costs 0.

    `pair_reduction` says how a query's triplets (one per positive with
    `"semihard"`, one with `"hard"`) combine. `"sum"` (the default) is the loss
    above, which already divides the sum by the number of positives. `"mean"`
    divides it by the number of active (non-zero) triplets instead, like
    pytorch-metric-learning's `AvgNonZeroReducer`: the loss then keeps its scale
    as more of the triplets become easy. With `mining="hard"` both are the same.

    `query_embeddings`, `query_labels`, `key_embeddings`, `key_labels`, `key_mask`
    and `query_key_index` are as in `contrastive_loss`.

    Args:
        margin: the required similarity gap between positive and negative.
        mining: `"hard"` or `"semihard"`.
        pair_reduction: `"sum"` (default) or `"mean"`, as above.

    Returns:
        The per-query losses, float32 of shape `(B,)`.
    """
    if mining not in MINING_MODES:
        raise ValueError(f"mining must be one of {MINING_MODES}, got {mining!r}")
    check_pair_reduction(pair_reduction)
    sim = similarity_matrix(query_embeddings, key_embeddings)
    positive, negative = pair_masks(query_labels, key_labels, key_mask, query_key_index)
    has_pos = ops.any(positive, axis=1)
    has_neg = ops.any(negative, axis=1)
    usable = ops.logical_and(has_pos, has_neg)
    if mining == "hard":
        hardest_pos = masked_min(sim, positive)
        hardest_neg = masked_max(sim, negative)
        loss = ops.relu(hardest_neg - hardest_pos + margin)
        return ops.where(usable, loss, 0.0)

    # Semi-hard, in O(B M log M) memory-free of any (B, M, M) tensor: sort each
    # query's negative similarities ascending (non-negatives pushed below -1 to the
    # front); for a positive with similarity s_p, the number of sorted entries below
    # s_p locates the most similar negative that is still less similar than it.
    neg_sorted = ops.sort(ops.where(negative, sim, -3.0), axis=1)
    num_non_neg = ops.sum(ops.cast(ops.logical_not(negative), "int32"), axis=1)
    below = tf.searchsorted(neg_sorted, sim, side="left", out_type=tf.int32)
    has_semihard = ops.greater(below, ops.expand_dims(num_non_neg, 1))
    num_keys = ops.shape(sim)[1]
    semihard_at = ops.clip(below - 1, 0, num_keys - 1)
    easiest_at = ops.clip(ops.expand_dims(num_non_neg, 1), 0, num_keys - 1)
    chosen_at = ops.where(has_semihard, semihard_at, easiest_at)
    chosen = ops.take_along_axis(neg_sorted, chosen_at, axis=1)
    per_pair = ops.where(positive, ops.relu(chosen - sim + margin), 0.0)
    if pair_reduction == "mean":
        counted = ops.logical_and(positive, ops.greater(per_pair, 0.0))
    else:
        counted = positive
    count = ops.maximum(ops.sum(ops.cast(counted, "float32"), axis=1), 1.0)
    loss = ops.sum(per_pair, axis=1) / count
    return ops.where(usable, loss, 0.0)


_DEFAULTS = hyper_parameters(triplet_loss)


@keras.saving.register_keras_serializable(package="xbm_tf")
class TripletLoss(PairLoss):
    """Triplet loss with hard or semi-hard mining as a `keras.losses.Loss`.

    Args:
        margin: the required similarity gap between positive and negative
            (default 0.1).
        mining: `"hard"` or `"semihard"` (default).
        pair_reduction: `"sum"` (default: each query's mean over its positives'
            triplets) or `"mean"` (its mean over its active, non-zero triplets);
            see `triplet_loss`.
        **kwargs: `name`, `reduction` and `dtype`, as in `keras.losses.Loss`.

    Example:
    >>> import numpy as np
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8]], "float32")
    >>> loss = TripletLoss(margin=0.1, mining="hard")
    >>> # Queries 1 and 3: hardest negative 0.96 against positive 0.8, + 0.1.
    >>> round(float(loss(labels, embeddings)), 4)  # (0 + 0.26 + 0 + 0.26) / 4
    0.13

    Reference:
        Schroff et al., "FaceNet", CVPR 2015; Hermans et al., "In Defense of the
        Triplet Loss", 2017.
    """

    def __init__(
        self,
        margin: float = _DEFAULTS["margin"],
        mining: str = _DEFAULTS["mining"],
        pair_reduction: str = _DEFAULTS["pair_reduction"],
        **kwargs,
    ):
        if mining not in MINING_MODES:
            raise ValueError(f"mining must be one of {MINING_MODES}, got {mining!r}")
        check_pair_reduction(pair_reduction)
        super().__init__(
            triplet_loss,
            margin=margin,
            mining=mining,
            pair_reduction=pair_reduction,
            **kwargs,
        )
