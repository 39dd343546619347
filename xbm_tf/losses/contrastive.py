"""Contrastive loss of the XBM paper, on the (query, key) signature."""

from __future__ import annotations

import keras
from keras import ops

from xbm_tf.losses.base import PairLoss, check_pair_reduction, hyper_parameters
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
    pair_reduction: str = "sum",
):
    """Per-query contrastive loss (Hadsell et al. 2006, as used by XBM).

    For query `i` with similarities `s_ij` to the keys, with `P_i` its positive
    keys and `N_i` its active negatives (`s_ij > neg_margin`):

    - `pair_reduction="sum"` (the paper's): `sum_{P_i} (1 - s_ij) + sum_{N_i}
      s_ij`. Summing over queries and dividing by the number of queries gives
      the paper's loss, which grows with the number of keys: against a memory
      of M rows it is about M / B times the in-batch loss.
    - `pair_reduction="mean"`: `mean_{P_i} (1 - s_ij) + mean_{N_i} s_ij`, each
      mean 0 when its set is empty (the negatives' mean is over the active, non-zero
      ones, like pytorch-metric-learning's `AvgNonZeroReducer`). Its scale does
      not grow with the number of keys.

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
        pair_reduction: `"sum"` (default) or `"mean"`, as above.

    Returns:
        The per-query losses, float32 of shape `(B,)`.
    """
    check_pair_reduction(pair_reduction)
    sim = similarity_matrix(query_embeddings, key_embeddings)
    positive, negative = pair_masks(query_labels, key_labels, key_mask, query_key_index)
    hard_negative = ops.logical_and(negative, ops.greater(sim, neg_margin))
    # One pass over the (B, M) pairs: positives cost 1 - s, hard negatives s.
    cost = ops.where(positive, 1.0 - sim, ops.where(hard_negative, sim, 0.0))
    if pair_reduction == "mean":
        cost = cost * mean_weights(positive, hard_negative)
    return ops.sum(cost, axis=1)


def mean_weights(positive, negative):
    """`(B, M)` weights: `1 / |P_i|` on positives, `1 / |N_i|` on `negative`, else 0.

    Scaling a query's pair costs by them and summing gives the mean over its
    positives plus the mean over its (active) negatives, each 0 when empty.
    """
    num_pos = ops.sum(ops.cast(positive, "float32"), axis=1, keepdims=True)
    num_neg = ops.sum(ops.cast(negative, "float32"), axis=1, keepdims=True)
    return ops.where(
        positive,
        1.0 / ops.maximum(num_pos, 1.0),
        ops.where(negative, 1.0 / ops.maximum(num_neg, 1.0), 0.0),
    )


_DEFAULTS = hyper_parameters(contrastive_loss)


@keras.saving.register_keras_serializable(package="xbm_tf")
class ContrastiveLoss(PairLoss):
    """Contrastive loss as a `keras.losses.Loss` (`y_true` labels, `y_pred` embeddings).

    Args:
        neg_margin: negatives with cosine similarity at or below it cost nothing
            (default 0.5, the paper's).
        pair_reduction: `"sum"` (default, the paper's: each query's sum over its
            pairs, which grows with the number of keys) or `"mean"` (its mean
            over its positives plus its mean over its active negatives); see
            `contrastive_loss`.
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

    def __init__(
        self,
        neg_margin: float = _DEFAULTS["neg_margin"],
        pair_reduction: str = _DEFAULTS["pair_reduction"],
        **kwargs,
    ):
        check_pair_reduction(pair_reduction)
        super().__init__(
            contrastive_loss,
            neg_margin=neg_margin,
            pair_reduction=pair_reduction,
            **kwargs,
        )
