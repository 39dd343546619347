"""FeatureDrift: how far fixed training images' embeddings move during fit().

The paper's "slow drift" (Wang et al., CVPR 2020, Sec. 3 and Fig. 3) is

    D(x, t; dt) = E_x || f(x; theta_t) - f(x; theta_{t - dt}) ||^2,

the mean squared L2 distance between an instance's embedding now and `dt`
optimizer steps ago. When it is small, embeddings stored `dt` steps ago in the
memory still stand in for fresh ones.
"""

from __future__ import annotations

import logging
import numbers
import os

import keras
import numpy as np
import tensorflow as tf

from xbm_tf.data.pipeline import drop_corrupt_images, eval_dataset
from xbm_tf.data.splits import ImageSet
from xbm_tf.retrieval.callback import embed_dataset

__all__ = ["FeatureDrift"]

#: ImageSet probes whose transformed float32 images fit in this many bytes are
#: decoded once and kept in memory; larger probe sets are read again each time.
CACHE_LIMIT_BYTES = 256 * 2**20


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    return int(value)


class FeatureDrift(keras.callbacks.Callback):
    """Keras callback measuring the feature drift of a fixed probe set.

    Draws a fixed probe set of `num_probes` training images with its own seeded
    numpy `Generator` (the global random state is not touched), and embeds it in
    inference mode every `every_n_steps` optimizer steps (counted by
    `model.optimizer.iterations`, so a resumed run keeps its step numbers), the
    first time just before the first training step. After each embedding at step
    `t`, for every `dt` in `deltas` whose embedding at `t - dt` is held, it
    computes `drift@<dt>`: the mean over probes of
    `||f(x; theta_t) - f(x; theta_{t-dt})||^2`.

    Where the values go:

    * `series`: the full list of `(step, dt, value)` triples, for
      `xbm_tf.plots.plot_feature_drift`.
    * TensorBoard: with `log_dir`, scalars `drift@<dt>` at their exact step in
      `log_dir/drift`.
    * The epoch logs: at every epoch end, `drift@<dt>` holds the latest value
      (NaN until the first one exists), so `CSVLogger` (which fixes its columns at
      the first epoch), `History` and `TensorBoard` see every key from epoch 0
      on. Put this callback before those in the `callbacks` list. Keras' batch
      logs are left alone.

    Only the embeddings the largest `dt` still needs are kept: at most
    `max(deltas) // every_n_steps` arrays of `(num_probes, dim)` floats.

    Cost: one forward pass of the probe set every `every_n_steps` steps, about
    `num_probes / (3 * batch_size_of_training * every_n_steps)` of the training
    compute (1,000 probes every 10 steps at batch 64: about half; the quickstart
    uses 250 probes every 20 steps, 4.6% measured by
    `benchmarks/drift_step_cost.py`).

    Args:
        probe_data: where the probes come from:
            an `xbm_tf.data.ImageSet` (e.g. the training split; `num_probes` of
            its images are drawn and read with the evaluation transform, see
            `resize_size`, `crop_size`, `channels`; corrupt files among them are
            dropped; kept in memory after the first pass when the transformed
            images take at most `CACHE_LIMIT_BYTES`); a float or uint8 array
            `(N, H, W, C)` of model inputs (`num_probes` rows are drawn); or a
            `tf.data.Dataset` of `(images, labels)` batches that yields the
            same images in the same order every pass (its first `num_probes`
            images are the probes).
        deltas: the `dt` in optimizer steps; each a multiple of `every_n_steps`.
        every_n_steps: embed the probes every this many optimizer steps.
        num_probes: the number of probe images (fewer if the data hold fewer).
        seed: seed of the probe draw.
        log_dir: TensorBoard directory, or `None` for no summaries.
        embedding_model: model to embed with; defaults to the model being
            trained (`self.model`).
        batch_size: batch size of the probe embedding.
        resize_size: evaluation resize of `ImageSet` probes.
        crop_size: evaluation centre crop of `ImageSet` probes.
        channels: output channels of `ImageSet` probes (None: as stored).

    Example:
    ```python
    drift = xbm_tf.FeatureDrift(
        splits.train, deltas=(10, 100, 1000), every_n_steps=10, log_dir="tb"
    )
    model.fit(train_ds, epochs=10, steps_per_epoch=500,
              callbacks=[drift, keras.callbacks.CSVLogger("log.csv")])
    xbm_tf.plots.plot_feature_drift(drift.series, "feature_drift.png")
    ```

    Reference:
        Wang, Zhang, Huang, Scott, "Cross-Batch Memory for Embedding Learning",
        CVPR 2020, Sec. 3 and Fig. 3.
    """

    def __init__(
        self,
        probe_data,
        deltas=(10, 100, 1000),
        every_n_steps: int = 10,
        num_probes: int = 1000,
        seed: int = 0,
        log_dir: str | None = None,
        embedding_model=None,
        batch_size: int = 256,
        resize_size: int = 256,
        crop_size: int = 224,
        channels: int | None = None,
    ):
        super().__init__()
        self.every_n_steps = _positive_int(every_n_steps, "every_n_steps")
        self.num_probes = _positive_int(num_probes, "num_probes")
        self.batch_size = _positive_int(batch_size, "batch_size")
        if isinstance(deltas, numbers.Integral):
            deltas = (deltas,)
        deltas = [_positive_int(dt, "deltas") for dt in deltas]
        if not deltas:
            raise ValueError("`deltas` is empty: give at least one dt.")
        bad = [dt for dt in deltas if dt % self.every_n_steps]
        if bad:
            raise ValueError(
                f"`deltas` must be multiples of every_n_steps={self.every_n_steps}; "
                f"got {bad}."
            )
        self.deltas = tuple(sorted(set(deltas)))
        self.seed = seed
        self.log_dir = log_dir
        self.embedding_model = embedding_model
        self.probe_data = self._probes(probe_data, resize_size, crop_size, channels)
        #: `(step, dt, value)` for every drift computed, in order.
        self.series: list[tuple[int, int, float]] = []
        self._history: dict[int, np.ndarray] = {}
        self._latest: dict[int, float] = {}
        self._writer = None

    @property
    def history_steps(self) -> list[int]:
        """The steps whose probe embeddings are held, oldest first."""
        return sorted(self._history)

    def _draw(self, num_items: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        size = min(self.num_probes, num_items)
        return np.sort(rng.choice(num_items, size=size, replace=False))

    def _probes(self, data, resize_size, crop_size, channels):
        if isinstance(data, ImageSet):
            if len(data) == 0:
                raise ValueError(f"The probe ImageSet {data.name!r} is empty.")
            subset = data.subset(self._draw(len(data)), f"{data.name} probes")
            if subset.kind != "array":
                subset, skipped = drop_corrupt_images(subset)
                if skipped:
                    logging.getLogger(__name__).warning(
                        "FeatureDrift: dropped %d corrupt probe images.", len(skipped)
                    )
            probes = eval_dataset(
                subset,
                batch_size=self.batch_size,
                resize_size=resize_size,
                crop_size=crop_size,
                channels=channels,
            )
            # Decode and transform once when the probe tensors are small.
            pixels = len(subset) * crop_size * crop_size * (channels or 3)
            return probes.cache() if 4 * pixels <= CACHE_LIMIT_BYTES else probes
        if isinstance(data, tf.data.Dataset):
            return (
                data.map(lambda images, labels, *_: (images, labels))
                .unbatch()
                .take(self.num_probes)
                .batch(self.batch_size)
            )
        if isinstance(data, np.ndarray) or tf.is_tensor(data):
            images = np.asarray(data)
            if images.ndim < 2 or len(images) == 0:
                raise ValueError(
                    "Probe images must be a non-empty array (N, ...) of model "
                    f"inputs; got shape {images.shape}."
                )
            images = images[self._draw(len(images))]
            return images, np.zeros(len(images), np.int64)
        raise ValueError(
            "`probe_data` must be an ImageSet, an array of images or a "
            f"tf.data.Dataset of (images, labels) batches; got {type(data).__name__}."
        )

    def _embedder(self):
        model = self.embedding_model or self.model
        if model is None:
            raise ValueError(
                "FeatureDrift has no model: pass `embedding_model=` or use it in "
                "`fit()` (or call `set_model()`)."
            )
        return model

    def embed(self) -> np.ndarray:
        """Embeds the probe set now (inference mode): `(num_probes, dim)`."""
        embeddings, _ = embed_dataset(
            self._embedder(), self.probe_data, self.batch_size
        )
        return embeddings

    def _step(self) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            raise ValueError("FeatureDrift needs a compiled model (an optimizer).")
        # convert_to_numpy reads a mirrored variable too (`int()` of it fails).
        return int(keras.ops.convert_to_numpy(optimizer.iterations))

    def record(self, step: int, embeddings: np.ndarray) -> dict[str, float]:
        """Stores the probe embeddings of `step` and returns the new drift values.

        Called by the callback after each embedding; public so that drift can be
        measured outside `fit()` too.

        Args:
            step: the optimizer step the embeddings belong to.
            embeddings: `(num_probes, dim)` probe embeddings at that step.

        Returns:
            `{"drift@<dt>": value}` for every `dt` whose history exists.
        """
        embeddings = np.asarray(embeddings, np.float32)
        results = {}
        for dt in self.deltas:
            before = self._history.get(step - dt)
            if before is None:
                continue
            diff = embeddings.astype(np.float64) - before
            value = float(np.mean(np.sum(diff * diff, axis=1)))
            self.series.append((step, dt, value))
            self._latest[dt] = value
            results[f"drift@{dt}"] = value
        self._history[step] = embeddings
        horizon = step - self.deltas[-1]  # later steps never need older ones
        for old in [s for s in self._history if s <= horizon]:
            del self._history[old]
        if results and self.log_dir:
            self._write_summaries(results, step)
        return results

    def _measure(self):
        step = self._step()
        if step % self.every_n_steps or step in self._history:
            return
        self.record(step, self.embed())

    def _write_summaries(self, results, step):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, "drift")
            )
        with self._writer.as_default():
            for name, value in results.items():
                tf.summary.scalar(name, value, step=step)

    def on_train_batch_begin(self, batch, logs=None):
        # Before the first step of a run: after every on_train_begin (a
        # BackupAndRestore has restored the weights by then).
        if not self._history:
            self._measure()

    def on_train_batch_end(self, batch, logs=None):
        self._measure()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            for dt in self.deltas:
                logs[f"drift@{dt}"] = self._latest.get(dt, float("nan"))

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
