"""The thin `keras.losses.Loss` wrapper shared by every pair loss."""

from __future__ import annotations

import keras
from keras import ops


class PairLoss(keras.losses.Loss):
    """A loss between queries and keys, used in-batch as a `keras.losses.Loss`.

    Subclasses implement `pair_loss(query_embeddings, query_labels, key_embeddings,
    key_labels, key_mask=None, query_key_index=None)` returning per-query losses
    `(B,)`. As a Keras loss, `loss(y_true, y_pred)` takes integer labels as `y_true`
    and L2-normalised embeddings as `y_pred`, compares the batch with itself (each
    sample excluded from its own pairs) and reduces the per-query losses with the
    usual Keras reduction (by default the mean over queries, as in the paper).
    `XBMContrastiveModel` calls `pair_loss` directly, once with the batch as keys and
    once with the memory as keys.
    """

    def __init__(
        self, name: str | None = None, reduction="sum_over_batch_size", dtype=None
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def pair_loss(
        self,
        query_embeddings,
        query_labels,
        key_embeddings,
        key_labels,
        key_mask=None,
        query_key_index=None,
    ):
        raise NotImplementedError(
            f"{type(self).__name__} must implement pair_loss(...)"
        )

    def call(self, y_true, y_pred):
        labels = ops.reshape(y_true, (-1,))
        batch_size = ops.shape(y_pred)[0]
        own = ops.arange(batch_size, dtype="int32")
        return self.pair_loss(y_pred, labels, y_pred, labels, query_key_index=own)
