"""Contrastive loss of the XBM paper, on the (query, key) signature."""

from __future__ import annotations

import keras
from keras import ops

from xbm_tf.losses.base import PairLoss, hyper_parameters
from xbm_tf.losses.pairs import pair_masks, similarity_matrix


@keras.saving.register_keras_serializable(package="xbm_tf")
def contrastive_loss(
    query_embeddings,
    query_labels,
    key_embeddings,
    key_labels,
    key_mask=None,
    query_key_index=None,
    neg_margin: float = 0.5,
):
    """Per-query contrastive loss (Hadsell et al. 2006, as used by XBM).

    For query `i` with similarities `s_ij` to the keys:
    `sum_{j positive} (1 - s_ij) + sum_{j negative, s_ij > neg_margin} s_ij`.
    Summing over queries and dividing by the number of queries gives the paper's
    loss, which grows with the number of keys.

    Args:
        query_embeddings: `(B, D)` L2-normalised embeddings.
        query_labels: `(B,)` integer labels.
        key_embeddings: `(M, D)` L2-normalised embeddings.
        key_labels: `(M,)` integer labels.
        key_mask: optional boolean `(M,)`, False for keys that must be ignored.
        query_key_index: optional integer `(B,)`, the index of each query's own copy
            among the keys (excluded); negative for none.
        neg_margin: the similarity threshold of negatives: negatives at or below
            it cost nothing (the paper's margin lambda).

    Returns:
        The per-query losses, float32 of shape `(B,)`.
    """
    sim = similarity_matrix(query_embeddings, key_embeddings)
    positive, negative = pair_masks(query_labels, key_labels, key_mask, query_key_index)
    hard_negative = ops.logical_and(negative, ops.greater(sim, neg_margin))
    # One pass over the (B, M) pairs: positives cost 1 - s, hard negatives s.
    cost = ops.where(positive, 1.0 - sim, ops.where(hard_negative, sim, 0.0))
    return ops.sum(cost, axis=1)


_DEFAULTS = hyper_parameters(contrastive_loss)


@keras.saving.register_keras_serializable(package="xbm_tf")
class ContrastiveLoss(PairLoss):
    """Contrastive loss as a `keras.losses.Loss` (`y_true` labels, `y_pred` embeddings).

    Args:
        neg_margin: negatives with cosine similarity at or below it cost nothing
            (default 0.5, the paper's).
        **kwargs: `name`, `reduction` and `dtype`, as in `keras.losses.Loss`.

    Example:
    >>> import numpy as np
    >>> labels = np.array([0, 0, 1, 1])
    >>> embeddings = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8]], "float32")
    >>> loss = ContrastiveLoss(neg_margin=0.5)
    >>> # Per query: 0.2 (positive) + 0.6 or 0.6 + 0.96 (negatives above 0.5).
    >>> round(float(loss(labels, embeddings)), 4)  # in-batch, mean over queries
    1.28

    Reference:
        Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020.
    """

    def __init__(self, neg_margin: float = _DEFAULTS["neg_margin"], **kwargs):
        super().__init__(contrastive_loss, neg_margin=neg_margin, **kwargs)
