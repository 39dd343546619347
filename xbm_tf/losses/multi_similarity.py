"""Multi-similarity loss (Wang et al. CVPR 2019), on the (query, key) signature."""

from __future__ import annotations

import keras
from keras import ops

from xbm_tf.losses.base import PairLoss
from xbm_tf.losses.pairs import masked_max, masked_min, pair_masks, similarity_matrix


def _soft_sum(values, mask, scale):
    """`log(1 + sum_{mask} exp(scale * values)) / scale`, computed stably."""
    logits = ops.where(mask, scale * values, -1e9)
    zeros = ops.zeros_like(logits[:, :1])
    return ops.logsumexp(ops.concatenate([zeros, logits], axis=1), axis=1) / scale


def multi_similarity_loss(
    query_embeddings,
    query_labels,
    key_embeddings,
    key_labels,
    key_mask=None,
    query_key_index=None,
    scale_pos: float = 2.0,
    scale_neg: float = 40.0,
    thresh: float = 0.5,
    margin: float = 0.1,
):
    """Per-query multi-similarity loss with its pair mining.

    Mining (as in the reference XBM code): a negative is kept if
    `s_neg + margin > min(s_pos)`, a positive if `s_pos - margin < max(s_neg)`,
    over all the query's positives and negatives. The query's loss is
    `log(1 + sum_pos exp(-alpha (s - lambda))) / alpha
    + log(1 + sum_neg exp(beta (s - lambda))) / beta`, and 0 if mining leaves no
    positive or no negative.

    Args:
        query_embeddings, query_labels, key_embeddings, key_labels, key_mask,
            query_key_index: as in `contrastive_loss`.
        scale_pos: alpha. scale_neg: beta. thresh: lambda. margin: the mining margin.

    Returns:
        The per-query losses, float32 of shape `(B,)`.
    """
    sim = similarity_matrix(query_embeddings, key_embeddings)
    positive, negative = pair_masks(query_labels, key_labels, key_mask, query_key_index)
    min_pos = ops.expand_dims(masked_min(sim, positive), 1)
    max_neg = ops.expand_dims(masked_max(sim, negative), 1)
    mined_neg = ops.logical_and(negative, ops.greater(sim + margin, min_pos))
    mined_pos = ops.logical_and(positive, ops.less(sim - margin, max_neg))
    pos_loss = _soft_sum(-(sim - thresh), mined_pos, scale_pos)
    neg_loss = _soft_sum(sim - thresh, mined_neg, scale_neg)
    usable = ops.logical_and(ops.any(mined_pos, axis=1), ops.any(mined_neg, axis=1))
    return ops.where(usable, pos_loss + neg_loss, 0.0)


@keras.saving.register_keras_serializable(package="xbm_tf")
class MultiSimilarityLoss(PairLoss):
    """Multi-similarity loss as a `keras.losses.Loss`.

    Args:
        scale_pos: alpha, 2 in the reference XBM code.
        scale_neg: beta, 40.
        thresh: lambda, 0.5.
        margin: the mining margin epsilon, 0.1.

    Reference:
        Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep
        Metric Learning", CVPR 2019.
    """

    def __init__(
        self,
        scale_pos: float = 2.0,
        scale_neg: float = 40.0,
        thresh: float = 0.5,
        margin: float = 0.1,
        **kwargs,
    ):
        super().__init__(
            multi_similarity_loss,
            scale_pos=scale_pos,
            scale_neg=scale_neg,
            thresh=thresh,
            margin=margin,
            **kwargs,
        )
