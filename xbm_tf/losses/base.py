"""The thin `keras.losses.Loss` wrapper shared by every pair loss."""

from __future__ import annotations

import keras
from keras import ops


class PairLoss(keras.losses.Loss):
    """A loss between queries and keys, used in-batch as a `keras.losses.Loss`.

    Wraps a pure per-query function `fn(query_embeddings, query_labels,
    key_embeddings, key_labels, key_mask=None, query_key_index=None, **fn_kwargs)`
    (e.g. `contrastive_loss`). As a Keras loss, `loss(y_true, y_pred)` takes integer
    labels as `y_true` and L2-normalised embeddings as `y_pred`, compares the batch
    with itself (each sample excluded from its own pairs) and reduces the per-query
    losses with the usual Keras reduction (by default the mean over queries, as in
    the paper). `XBMContrastiveModel` calls `pair_loss` directly, once with the
    batch as keys and once with the memory as keys.

    Args:
        fn: the per-query loss function.
        name, reduction, dtype: as in `keras.losses.Loss`.
        **fn_kwargs: the function's hyper-parameters (e.g. `margin`); each is also
            an attribute of the loss and an entry of its config.
    """

    def __init__(
        self,
        fn,
        name: str | None = None,
        reduction="sum_over_batch_size",
        dtype=None,
        **fn_kwargs,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.fn = fn
        self.fn_kwargs = fn_kwargs
        for key, value in fn_kwargs.items():
            setattr(self, key, value)

    def pair_loss(
        self,
        query_embeddings,
        query_labels,
        key_embeddings,
        key_labels,
        key_mask=None,
        query_key_index=None,
    ):
        """Per-query losses `(B,)` of the queries against the keys."""
        return self.fn(
            query_embeddings,
            query_labels,
            key_embeddings,
            key_labels,
            key_mask=key_mask,
            query_key_index=query_key_index,
            **self.fn_kwargs,
        )

    def call(self, y_true, y_pred):
        labels = ops.reshape(y_true, (-1,))
        batch_size = ops.shape(y_pred)[0]
        own = ops.arange(batch_size, dtype="int32")
        return self.pair_loss(y_pred, labels, y_pred, labels, query_key_index=own)

    def get_config(self):
        return {**super().get_config(), **self.fn_kwargs}
