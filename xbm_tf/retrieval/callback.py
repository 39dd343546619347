"""RetrievalEvaluation: Recall@K and MAP@R of the evaluation split(s) during fit().

Also `embed_dataset`, which embeds an evaluation split batch by batch.
"""

from __future__ import annotations

import numbers
import os
import weakref

import keras
import numpy as np
import tensorflow as tf

from xbm_tf.retrieval import engines, inputs, metrics

__all__ = ["RetrievalEvaluation", "embed_dataset"]


def _check_data(data, name: str) -> None:
    if isinstance(data, tf.data.Dataset):
        return
    if isinstance(data, (tuple, list)) and len(data) == 2:
        n_images, n_labels = len(data[0]), len(data[1])
        if n_images != n_labels:
            raise ValueError(f"`{name}` has {n_images} images but {n_labels} labels.")
        if n_images == 0:
            raise ValueError(f"`{name}` is empty.")
        return
    raise ValueError(
        f"`{name}` must be a tf.data.Dataset of (images, labels) batches or a "
        f"tuple (images, labels) of arrays; got {type(data).__name__}."
    )


def _flat_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(
            f"Labels must have shape (batch,) or (batch, 1); got {labels.shape}."
        )
    return labels


def _check_embeddings(emb, num_images) -> np.ndarray:
    if not isinstance(emb, np.ndarray) or emb.ndim != 2 or len(emb) != num_images:
        shape = getattr(emb, "shape", type(emb).__name__)
        raise ValueError(
            f"The embedding model must return one (batch, dim) tensor for "
            f"{num_images} images; got {shape}."
        )
    return emb.astype(np.float32, copy=False)


# model -> its inference function (a weak key: the model may be freed).
_INFERENCE = weakref.WeakKeyDictionary()


def _inference(model):
    """A function `images -> embeddings` of `model`, one row per image.

    Keras' `predict_on_batch` under a `MirroredStrategy` hands every replica the
    whole batch and concatenates their outputs (R x the rows). Here a Keras
    model is called in a `tf.function` of its own, which runs in the
    cross-replica context on this worker's device, reading the local copies of
    the variables with no collective: one row per image, in order, under any
    strategy, and each worker of a multi-worker job can embed alone. Objects that
    are not Keras layers (e.g. a SavedModel's function wrapper) are used through
    their `predict_on_batch`.
    """
    if not isinstance(model, keras.layers.Layer):
        return model.predict_on_batch
    function = _INFERENCE.get(model)
    if function is None:
        reference = weakref.ref(model)

        def call(images):
            return reference()(images, training=False)

        function = tf.function(call, reduce_retracing=True)
        _INFERENCE[model] = function
    return function


def _embed_batch(embed, images) -> np.ndarray:
    num = int(tf.shape(images)[0])
    return _check_embeddings(keras.ops.convert_to_numpy(embed(images)), num)


def embed_dataset(model, data, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Embeds an evaluation split with `model` and returns numpy arrays.

    Works the same under any `tf.distribute` strategy: the images are embedded
    on this worker alone (see `_inference`), one row per image, in order.

    Args:
        model: a Keras model whose outputs are `(batch, dim)` L2-normalised
            embeddings, called in inference mode; or any object with a
            `predict_on_batch(images)` method returning them.
        data: a `tf.data.Dataset` yielding `(images, labels)` batches (extra
            elements such as sample weights are ignored), or a tuple
            `(images, labels)` of arrays, embedded `batch_size` rows at a time.
            A dataset is read once, batch by batch, so images and labels stay
            aligned even if it shuffles or augments.
        batch_size: batch size for array inputs.

    Returns:
        `(embeddings, labels)`: float32 `(num_items, dim)` and `(num_items,)`.

    Example:
    >>> model = keras.Sequential([keras.layers.Dense(4),
    ...                           keras.layers.UnitNormalization()])
    >>> emb, lab = embed_dataset(model, (np.ones((3, 2)), np.array([0, 1, 1])))
    >>> emb.shape, lab.tolist()
    ((3, 4), [0, 1, 1])
    """
    _check_data(data, "data")
    embed = _inference(model)
    if isinstance(data, tf.data.Dataset):
        embeddings, labels = [], []
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError(
                    "The dataset must yield (images, labels) batches; got an "
                    f"element of type {type(batch).__name__}."
                )
            images, batch_labels = batch[0], batch[1]
            if int(tf.shape(images)[0]) == 0:  # Some kernels fail on an empty
                continue  # batch (oneDNN's batch norm on AVX-512): nothing to embed.
            embeddings.append(_embed_batch(embed, images))
            labels.append(_flat_labels(batch_labels))
        if not embeddings:
            raise ValueError("The evaluation dataset yielded no batches.")
        return np.concatenate(embeddings), np.concatenate(labels)
    images, labels = data
    embeddings = [
        _embed_batch(embed, images[start : start + batch_size])
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(embeddings), _flat_labels(labels)


class RetrievalEvaluation(keras.callbacks.Callback):
    """Keras callback computing retrieval metrics every N epochs.

    Embeds the query split (and the gallery split for In-Shop) with the model,
    then writes `{prefix}recall@K` for every K, `{prefix}map@r` and
    `{prefix}r_precision` into the epoch `logs`, so `ModelCheckpoint`,
    `EarlyStopping`, `History`, `CSVLogger` and `TensorBoard` see them. Put this
    callback *before* those in the `callbacks` list, and give them `mode="max"`
    (Keras would guess `"min"` for these names). On epochs that are skipped
    (`every_n_epochs > 1`) the keys are absent. With `log_dir`, the values are
    also written as TensorBoard scalars to `log_dir/retrieval` at step `epoch`
    (Keras' own epoch index, so curves align with `epoch_loss`).

    Without a gallery the protocol is leave-one-out over the queries (CUB, Cars,
    SOP); with one, queries search the gallery (In-Shop). See
    `xbm_tf.retrieval.metrics` for the metrics.

    Args:
        query_data: a `tf.data.Dataset` of `(images, labels)` batches, or a tuple
            `(images, labels)` of arrays.
        gallery_data: the same for the gallery, or `None` (leave-one-out).
        ks: the K of Recall@K.
        every_n_epochs: evaluate after epochs `N, 2N, ...` (1-based).
        backend: the search engine, `"exact_rank"` (default), `"exact"`,
            `"scann"` or `"scann_ah"` (approximate: then the logs also hold
            `{prefix}approximate = 1.0`); see `xbm_tf.retrieval.engines`.
        log_dir: TensorBoard directory, or `None` for no summaries.
        prefix: prefix of the log keys.
        embedding_model: model to embed with; defaults to the model being
            trained (`self.model`), e.g. pass the backbone of a larger model.
        batch_size: batch size when the data are arrays.
        block_size: search block size, see `nearest_neighbors`.

    Example:
    ```python
    evaluation = RetrievalEvaluation((x_test, y_test), ks=(1, 2, 4, 8))
    checkpoint = keras.callbacks.ModelCheckpoint(
        "best.keras", monitor="val_recall@1", mode="max", save_best_only=True
    )
    model.fit(train_ds, epochs=30, callbacks=[evaluation, checkpoint])
    final = evaluation.evaluate()  # {"val_recall@1": ..., "val_map@r": ...}
    ```
    """

    def __init__(
        self,
        query_data,
        gallery_data=None,
        ks=(1, 2, 4, 8),
        every_n_epochs: int = 1,
        backend: str = metrics.DEFAULT_ENGINE,
        log_dir: str | None = None,
        prefix: str = "val_",
        embedding_model=None,
        batch_size: int = 256,
        block_size: int | None = None,
    ):
        super().__init__()
        _check_data(query_data, "query_data")
        if gallery_data is not None:
            _check_data(gallery_data, "gallery_data")
        if (
            isinstance(every_n_epochs, bool)
            or not isinstance(every_n_epochs, numbers.Integral)
            or every_n_epochs < 1
        ):
            raise ValueError(
                f"`every_n_epochs` must be a positive integer; got {every_n_epochs}."
            )
        engines.check_engine(backend)
        # K limits are known up front for array data; datasets are checked on use.
        sized = gallery_data if gallery_data is not None else query_data
        if isinstance(sized, tf.data.Dataset):
            limit, reason = 2**62, ""
        else:
            loo = gallery_data is None
            limit = len(sized[1]) - int(loo)
            reason = inputs.gallery_reason(len(sized[1]), loo)
        self.ks = inputs.check_ks(ks, limit, reason)
        self.query_data = query_data
        self.gallery_data = gallery_data
        self.every_n_epochs = int(every_n_epochs)
        self.backend = backend
        self.log_dir = log_dir
        self.prefix = prefix
        self.embedding_model = embedding_model
        self.batch_size = batch_size
        self.block_size = block_size
        self._writer = None
        # (epoch, embeddings) of the last evaluation run by `on_epoch_end`, so a
        # caller can reuse the final epoch's embeddings instead of embedding again.
        self.last_epoch_embeddings = None

    def _embedding_model(self):
        model = self.embedding_model or self.model
        if model is None:
            raise ValueError(
                "RetrievalEvaluation has no model: pass `embedding_model=` or use "
                "it in `fit()` (or call `set_model()`)."
            )
        return model

    def embed(self):
        """Embeds the split(s).

        Returns:
            `(query_embeddings, query_labels, gallery_embeddings, gallery_labels)`
            as numpy arrays; the gallery entries are `None` for leave-one-out.
        """
        model = self._embedding_model()
        q, ql = embed_dataset(model, self.query_data, self.batch_size)
        if self.gallery_data is None:
            return q, ql, None, None
        g, gl = embed_dataset(model, self.gallery_data, self.batch_size)
        return q, ql, g, gl

    def evaluate(self, step: int | None = None) -> dict[str, float]:
        """Embeds and evaluates now.

        Args:
            step: if given and `log_dir` is set, also write TensorBoard scalars
                at this step.

        Returns:
            `{f"{prefix}recall@{k}": ..., f"{prefix}map@r": ...,
            f"{prefix}r_precision": ...}`.
        """
        return self._evaluate(self.embed(), step)

    def _evaluate(self, embedded, step):
        results = metrics.retrieval_metrics(
            *embedded,
            ks=self.ks,
            backend=self.backend,
            block_size=self.block_size,
        )
        results = {f"{self.prefix}{name}": value for name, value in results.items()}
        if step is not None and self.log_dir:
            self._write_summaries(results, int(step))
        return results

    def _write_summaries(self, results, step):
        if self._writer is None:
            path = os.path.join(self.log_dir, "retrieval")
            self._writer = tf.summary.create_file_writer(path)
        with self._writer.as_default():
            for name, value in results.items():
                tf.summary.scalar(name, value, step=step)
        self._writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        embedded = self.embed()
        self.last_epoch_embeddings = (epoch, embedded)
        results = self._evaluate(embedded, step=epoch)
        if logs is not None:
            logs.update(results)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
