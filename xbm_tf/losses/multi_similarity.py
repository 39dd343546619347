"""Multi-similarity loss (Wang et al. CVPR 2019), on the (query, key) signature."""

from __future__ import annotations

import keras
from keras import ops

from xbm_tf.losses.base import PairLoss, hyper_parameters
from xbm_tf.losses.pairs import masked_max, masked_min, pair_masks, similarity_matrix


def _soft_sum(values, mask, scale):
    """`log(1 + sum_{mask} exp(scale * values)) / scale`, computed stably."""
    logits = ops.where(mask, scale * values, -1e9)
    zeros = ops.zeros_like(logits[:, :1])
    return ops.logsumexp(ops.concatenate([zeros, logits], axis=1), axis=1) / scale


@keras.saving.register_keras_serializable(package="xbm_tf")
def multi_similarity_loss(
    query_embeddings,
    query_labels,
    key_embeddings,
    key_labels,
    key_mask=None,
    query_key_index=None,
    alpha: float = 2.0,
    beta: float = 40.0,
    threshold: float = 0.5,
    epsilon: float = 0.1,
):
    """Per-query multi-similarity loss with its pair mining.

    Mining (as in the reference XBM code): a negative is kept if
    `s_neg + epsilon > min(s_pos)`, a positive if `s_pos - epsilon < max(s_neg)`,
    over all the query's positives and negatives. The query's loss is
    `log(1 + sum_pos exp(-alpha (s - threshold))) / alpha
    + log(1 + sum_neg exp(beta (s - threshold))) / beta`, and 0 if mining leaves no
    positive or no negative.

    `query_embeddings`, `query_labels`, `key_embeddings`, `key_labels`, `key_mask`
    and `query_key_index` are as in `contrastive_loss`.

    Args:
        alpha: the scale of the positive term (> 0).
        beta: the scale of the negative term (> 0).
        threshold: the similarity offset, lambda in the paper.
        epsilon: the mining margin.

    Returns:
        The per-query losses, float32 of shape `(B,)`.
    """
    for name, scale in (("alpha", alpha), ("beta", beta)):
        if isinstance(scale, (int, float)) and not scale > 0:
            raise ValueError(f"multi_similarity_loss: {name} must be > 0, got {scale}")
    sim = similarity_matrix(query_embeddings, key_embeddings)
    positive, negative = pair_masks(query_labels, key_labels, key_mask, query_key_index)
    min_pos = ops.expand_dims(masked_min(sim, positive), 1)
    max_neg = ops.expand_dims(masked_max(sim, negative), 1)
    mined_neg = ops.logical_and(negative, ops.greater(sim + epsilon, min_pos))
    mined_pos = ops.logical_and(positive, ops.less(sim - epsilon, max_neg))
    pos_loss = _soft_sum(-(sim - threshold), mined_pos, alpha)
    neg_loss = _soft_sum(sim - threshold, mined_neg, beta)
    usable = ops.logical_and(ops.any(mined_pos, axis=1), ops.any(mined_neg, axis=1))
    return ops.where(usable, pos_loss + neg_loss, 0.0)


_DEFAULTS = hyper_parameters(multi_similarity_loss)


@keras.saving.register_keras_serializable(package="xbm_tf")
class MultiSimilarityLoss(PairLoss):
    """Multi-similarity loss as a `keras.losses.Loss`.

    The defaults are the reference XBM code's.

    Args:
        alpha: the scale of the positive term, 2.
        beta: the scale of the negative term, 40.
        threshold: the similarity offset lambda, 0.5.
        epsilon: the mining margin, 0.1.
        **kwargs: `name`, `reduction` and `dtype`, as in `keras.losses.Loss`.

    Example:
    >>> import numpy as np
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8]], "float32")
    >>> loss = MultiSimilarityLoss(alpha=2.0, beta=40.0)
    >>> round(float(loss(labels, embeddings)), 4)
    0.3394

    Reference:
        Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep
        Metric Learning", CVPR 2019.
    """

    def __init__(
        self,
        alpha: float = _DEFAULTS["alpha"],
        beta: float = _DEFAULTS["beta"],
        threshold: float = _DEFAULTS["threshold"],
        epsilon: float = _DEFAULTS["epsilon"],
        **kwargs,
    ):
        super().__init__(
            multi_similarity_loss,
            alpha=alpha,
            beta=beta,
            threshold=threshold,
            epsilon=epsilon,
            **kwargs,
        )
