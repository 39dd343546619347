"""XBMContrastiveModel: an embedding model trained with in-batch + cross-batch loss."""

from __future__ import annotations

import functools

import keras
import tensorflow as tf
from keras import ops

from xbm_tf.losses import ContrastiveLoss, PairLoss
from xbm_tf.losses.fused import memory_pair_loss
from xbm_tf.losses.pairs import check_labels
from xbm_tf.memory import CrossBatchMemory


@keras.saving.register_keras_serializable(package="xbm_tf")
class XBMContrastiveModel(keras.Model):
    """Trains an embedding model with a pair loss and a Cross-Batch Memory.

    Each training step embeds the batch, computes `loss(batch, batch)`, and, once
    the optimizer has applied `xbm_start_step` updates, first enqueues the batch's
    embeddings (no gradient) and labels into the memory, then adds
    `xbm_weight * loss(batch, memory)`. A query is never paired with itself: not in
    the batch, and not with its own copy just written to the memory. Each total is
    the sum of per-query losses divided by the (global) batch size, so it grows with
    the number of keys, as in the paper.

    Under a `tf.distribute` strategy (see `xbm_tf.distribute`) the memory enqueues
    the global batch (all replicas' rows, gathered in replica order) so every
    replica keeps the same memory, and each replica's queries are compared with the
    whole global batch and the whole memory: losses, gradients and memory equal
    those of one device trained on the same global batches.

    Besides the losses, each step logs `neg_similarity`, the mean cosine
    similarity of the global batch's different-class pairs (see
    `negative_similarity`): it climbs towards 1 when the embeddings collapse.

    `call()` returns the L2-normalised float32 embeddings, so `predict` gives
    retrieval features; `test_step` reports the in-batch loss.

    Labels are integers of any dtype but uint64; they are compared and stored in
    the memory as int64, so no label is truncated or merged (float labels are a
    TypeError).

    `compile(loss=...)` takes a `PairLoss`, which replaces the constructor's
    `loss`; `compile(metrics=...)`, `loss_weights` and sample weights (or
    `class_weight`) in the data raise a ValueError, since the pair losses have no
    per-sample target (use `xbm_tf.RetrievalEvaluation` for Recall@K).

    The warm-up counts the optimizer's applied updates (`optimizer.iterations`),
    like its learning-rate schedule: under a `keras.optimizers.LossScaleOptimizer`
    a step skipped for non-finite gradients changes no weight and does not count.

    Args:
        embedding_model: a Keras model mapping inputs to `(B, D)` embeddings.
        memory_size: M, the number of rows in the memory (>= the global batch).
        xbm_weight: the weight of the memory loss.
        xbm_start_step: the number of applied optimizer updates
            (`optimizer.iterations`) after which the memory is used (the paper
            waits ~1,000 iterations while features still drift fast).
        loss: a `xbm_tf.losses.PairLoss`; default `ContrastiveLoss(neg_margin=0.5)`.
        embedding_dim: D, needed only if `embedding_model` has no static output
            shape.
        memory_dtype: the dtype the memory stores its embeddings in:
            `"float32"`, `"bfloat16"` or `"float16"` (half the bytes). The
            batch-vs-memory matmuls run in it (the queries are cast to it);
            with a `ContrastiveLoss` through
            `xbm_tf.losses.fused_contrastive_loss`.

    During warm-up (`optimizer.iterations < xbm_start_step`) `fit` runs a second
    compiled train function without the memory (no enqueue, no memory matmul);
    see `make_train_function`.

    Example:
    >>> import numpy as np
    >>> import tensorflow as tf
    >>> from xbm_tf import build_embedding_model
    >>> backbone = build_embedding_model("tiny", 8, input_shape=(28, 28, 1))
    >>> model = XBMContrastiveModel(backbone, memory_size=64, xbm_start_step=2)
    >>> model.compile(optimizer=keras.optimizers.Adam(1e-3))
    >>> rng = np.random.default_rng(0)
    >>> images = rng.uniform(0, 255, (8, 28, 28, 1)).astype("float32")
    >>> labels = np.repeat(np.arange(4), 2)  # P x K = 4 classes x 2 images
    >>> train_ds = tf.data.Dataset.from_tensors((images, labels)).repeat()
    >>> history = model.fit(
    ...     train_ds, epochs=2, steps_per_epoch=2, shuffle=False, verbose=0
    ... )
    >>> history.history["memory_fill"]  # the memory joins after 2 updates
    [0.0, 0.25]
    >>> model.predict(images, verbose=0).shape
    (8, 8)

    Reference:
        Wang et al., "Cross-Batch Memory for Embedding Learning", CVPR 2020.
    """

    def __init__(
        self,
        embedding_model: keras.Model,
        memory_size: int,
        xbm_weight: float = 1.0,
        xbm_start_step: int = 0,
        loss: PairLoss | None = None,
        embedding_dim: int | None = None,
        memory_dtype: str = "float32",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if embedding_dim is None:
            embedding_dim = embedding_model.output_shape[-1]
        if embedding_dim is None:
            raise ValueError(
                "embedding_model has no static output width: pass embedding_dim"
            )
        if xbm_start_step < 0:
            raise ValueError(f"xbm_start_step must be >= 0, got {xbm_start_step}")
        if loss is not None and not isinstance(loss, PairLoss):
            raise TypeError(
                "loss must be an xbm_tf.losses.PairLoss (e.g. ContrastiveLoss), got "
                f"{type(loss).__name__}"
            )
        self.embedding_model = embedding_model
        self.memory_size = int(memory_size)
        self.embedding_dim = int(embedding_dim)
        self.xbm_weight = float(xbm_weight)
        self.xbm_start_step = int(xbm_start_step)
        self.pair_loss = loss if loss is not None else ContrastiveLoss(neg_margin=0.5)
        self.memory = CrossBatchMemory(
            self.memory_size,
            self.embedding_dim,
            memory_dtype=memory_dtype,
            name="cross_batch_memory",
        )
        self.memory_dtype = memory_dtype
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.batch_loss_tracker = keras.metrics.Mean(name="batch_loss")
        self.xbm_loss_tracker = keras.metrics.Mean(name="xbm_loss")
        self.neg_similarity_tracker = keras.metrics.Mean(name="neg_similarity")

    def call(self, inputs, training=False):
        embeddings = ops.cast(
            self.embedding_model(inputs, training=training), "float32"
        )
        return embeddings / ops.maximum(
            ops.sqrt(ops.sum(ops.square(embeddings), axis=-1, keepdims=True)), 1e-12
        )

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        loss_weights=None,
        metrics=None,
        weighted_metrics=None,
        **kwargs,
    ):
        """Configures training; a `PairLoss` given as `loss` replaces the model's.

        Args:
            optimizer: as in `keras.Model.compile`.
            loss: None (keep the constructor's `loss`) or a
                `xbm_tf.losses.PairLoss`, which replaces it.
            loss_weights: must be None: `xbm_weight` weights the memory loss.
            metrics: must be None; the model logs `loss`, `batch_loss`,
                `xbm_loss`, `neg_similarity`
                and `memory_fill`.
            weighted_metrics: must be None, as `metrics`.
            **kwargs: the other arguments of `keras.Model.compile` (e.g.
                `jit_compile`, `steps_per_execution`).
        """
        if loss is not None and not isinstance(loss, PairLoss):
            raise TypeError(
                "XBMContrastiveModel.compile(loss=...) takes an "
                "xbm_tf.losses.PairLoss (e.g. TripletLoss()), which replaces the "
                "constructor's loss= argument; got "
                f"{type(loss).__name__}"
            )
        for name, value in (
            ("metrics", metrics),
            ("weighted_metrics", weighted_metrics),
            ("loss_weights", loss_weights),
        ):
            if value is not None:
                raise ValueError(
                    f"XBMContrastiveModel.compile does not take {name}={value!r}: "
                    "pair losses have no per-sample target for Keras metrics, and "
                    "the memory loss is weighted by the constructor's xbm_weight. "
                    "Use the xbm_tf.RetrievalEvaluation callback for Recall@K "
                    "and MAP@R"
                )
        if loss is not None:
            self.pair_loss = loss
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        """Compiles a loaded model as saved (Keras skips a custom `compile`)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.batch_loss_tracker,
            self.xbm_loss_tracker,
            self.neg_similarity_tracker,
        ]

    def compute_losses(self, embeddings, labels, training_step, use_memory=True):
        """The in-batch and memory losses of one (local) batch, with the enqueue.

        The queries are this replica's rows; the keys are the global batch (all
        replicas' rows) and the memory.

        Args:
            embeddings: `(B, D)` L2-normalised embeddings of this replica's batch.
            labels: `(B,)` integer labels (any integer dtype but uint64).
            training_step: the optimizer's applied updates, to gate the memory.
            use_memory: False leaves the memory out of the step entirely (no
                enqueue, no memory loss; the xbm loss is 0): the warm-up step.

        Returns:
            `(batch_loss, xbm_loss)`, each a sum over local queries divided by the
            global batch size.
        """
        labels = check_labels(ops.reshape(labels, (-1,)), "labels")
        local_batch = embeddings.shape[0]
        if local_batch is None:
            raise ValueError(
                "XBMContrastiveModel needs a static batch size: batch the dataset "
                "with drop_remainder=True (or use xbm_tf.data's P x K pipeline), "
                "and under a tf.distribute strategy use a global batch divisible "
                "by the number of replicas"
            )
        num_replicas = _num_replicas()
        global_batch = float(local_batch * num_replicas)
        # The keys are the global batch: every replica's rows, in replica order. The
        # gather is differentiable (its gradient sums the replicas' key gradients)
        # and runs on every step, so every replica takes part in the collective.
        all_embeddings, all_labels, own = _gather_global_batch(embeddings, labels)
        batch_losses = self.pair_loss.pair_loss(
            embeddings, labels, all_embeddings, all_labels, query_key_index=own
        )
        batch_loss = ops.sum(batch_losses) / global_batch
        if not use_memory:
            return batch_loss, ops.zeros_like(batch_loss)

        # No tf.cond for the warm-up: under XLA a conditional around the memory
        # copies the whole (M, D) buffer and slows the step 2x (see
        # benchmarks/xbm_overhead.py). Before `xbm_start_step` the enqueue leaves
        # the memory as it is, and the (then empty) memory loss is zeroed.
        active = ops.greater_equal(training_step, self.xbm_start_step)
        rows = self.memory.enqueue(all_embeddings, all_labels, active=active)
        # The enqueue scatters inside XLA, so this dense read is the memory's own
        # buffer, not a copy, and the loss's matmuls run on TensorFlow's kernels
        # (oneDNN on a CPU) unless the whole step is compiled with XLA.
        keys, key_labels, valid = self.memory.read()
        losses = memory_pair_loss(
            self.pair_loss,
            embeddings,
            labels,
            keys,
            key_labels,
            key_mask=valid,
            query_key_index=ops.take(rows, own),
        )
        xbm_loss = ops.where(active, ops.sum(losses) / global_batch, 0.0)
        return batch_loss, xbm_loss

    def train_step(self, data, use_memory=True):
        images, labels = _unpack(data)
        step = ops.convert_to_tensor(self.optimizer.iterations)
        with tf.GradientTape() as tape:
            embeddings = self(images, training=True)
            batch_loss, xbm_loss = self.compute_losses(
                embeddings, labels, step, use_memory=use_memory
            )
            loss = batch_loss + self.xbm_weight * xbm_loss
            # Layers' own losses (e.g. kernel regularizers), shared by the replicas.
            if self.losses:
                loss = loss + ops.sum(self.losses) / _num_replicas()
            scaled = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply(gradients, variables)
        self.neg_similarity_tracker.update_state(
            negative_similarity(ops.stop_gradient(embeddings), labels)
        )
        return self._report(loss, batch_loss, xbm_loss)

    def make_train_function(self, force=False):
        """Two compiled train functions, switched at `xbm_start_step`.

        The warm-up function (`train_step(data, use_memory=False)`) has no
        enqueue and no memory matmul; the other is the full step, whose enqueue
        and memory loss are still gated by the optimizer step, so a call that
        spans the boundary (`steps_per_execution > 1`) stays exact. Each call
        reads `optimizer.iterations`, so the choice is right after a restore from
        a checkpoint or backup, and under a `tf.distribute` strategy (Keras wraps
        both functions in `strategy.run`). No `tf.cond` is involved: under XLA a
        conditional around the memory copies the whole buffer.
        """
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=True)
        if self.xbm_start_step <= 0 or not hasattr(self, "_make_function"):
            return self.train_function
        with_memory = self.train_function
        warm_up = self._make_function(
            functools.partial(self.train_step, use_memory=False)
        )

        def train_function(iterator):
            steps = int(self.steps_per_execution or 1)
            step = int(self.optimizer.iterations.numpy())
            if step + steps <= self.xbm_start_step:
                return warm_up(iterator)
            return with_memory(iterator)

        self.train_function = train_function
        return self.train_function

    def test_step(self, data):
        images, labels = _unpack(data)
        embeddings = self(images, training=False)
        labels = check_labels(ops.reshape(labels, (-1,)), "labels")
        all_embeddings, all_labels, own = _gather_global_batch(embeddings, labels)
        losses = self.pair_loss.pair_loss(
            embeddings, labels, all_embeddings, all_labels, query_key_index=own
        )
        # The global-batch mean: Keras averages the replicas' reports.
        global_batch = ops.cast(ops.shape(all_embeddings)[0], "float32")
        loss = ops.sum(losses) / global_batch * float(_num_replicas())
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def _report(self, loss, batch_loss, xbm_loss):
        num_replicas = _num_replicas()
        # Trackers hold the global-batch losses: sum the replicas' shares.
        scale = float(num_replicas)
        self.loss_tracker.update_state(loss * scale)
        self.batch_loss_tracker.update_state(batch_loss * scale)
        self.xbm_loss_tracker.update_state(xbm_loss * scale)
        logs = {m.name: m.result() for m in self.metrics}
        logs["memory_fill"] = self.memory.fill_fraction()
        return logs

    def save(self, filepath, *args, **kwargs):
        """`keras.Model.save`, after checking that the model can be serialized.

        Keras opens (and so empties) the file before it serializes the model; a
        loss that cannot be saved (an unregistered custom function or subclass)
        then left an empty file in place of the one that was there. Serializing
        the config first raises that error before the file is touched.
        """
        self.get_config()
        return super().save(filepath, *args, **kwargs)

    def get_config(self):
        return {
            **super().get_config(),
            "embedding_model": keras.saving.serialize_keras_object(
                self.embedding_model
            ),
            "memory_size": self.memory_size,
            "xbm_weight": self.xbm_weight,
            "xbm_start_step": self.xbm_start_step,
            "loss": keras.saving.serialize_keras_object(self.pair_loss),
            "embedding_dim": self.embedding_dim,
            "memory_dtype": self.memory_dtype,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["embedding_model"] = keras.saving.deserialize_keras_object(
            config["embedding_model"]
        )
        config["loss"] = keras.saving.deserialize_keras_object(config["loss"])
        return cls(**config)


def negative_similarity(embeddings, labels):
    """The mean cosine similarity of the different-class pairs of the global batch.

    A cheap sign of an embedding collapse: it is near 0 for spread-out random
    embeddings (a freshly initialised network is often well above it, since its
    embeddings share a direction), falls as training separates the classes, and
    climbs towards 1 when the embeddings collapse onto one point, whatever the
    loss says. Every replica computes it over the whole global batch (the same
    value as on one device).

    Args:
        embeddings: `(B, D)` L2-normalised embeddings of this replica's batch.
        labels: `(B,)` integer labels.

    Returns:
        A float32 scalar (0 if the batch has a single class).
    """
    labels = check_labels(ops.reshape(labels, (-1,)), "labels")
    all_embeddings, all_labels, _ = _gather_global_batch(embeddings, labels)
    sim = ops.matmul(all_embeddings, ops.transpose(all_embeddings))
    different = ops.not_equal(all_labels[:, None], all_labels[None, :])
    total = ops.sum(ops.where(different, sim, 0.0))
    count = ops.sum(ops.cast(different, "float32"))
    return total / ops.maximum(count, 1.0)


def _unpack(data):
    """`(images, labels)` -> images, labels; sample weights are a ValueError."""
    if not isinstance(data, (tuple, list)) or len(data) < 2:
        raise ValueError(
            "XBMContrastiveModel trains on (images, labels) batches; got "
            f"{type(data).__name__}"
        )
    if len(data) > 2 and data[2] is not None:
        raise ValueError(
            "XBMContrastiveModel does not support sample weights (nor fit's "
            "class_weight): each pair loss is a sum over (query, key) pairs, "
            "which a per-sample weight does not define. Pass (images, labels) "
            "batches; to rebalance classes, change the P x K sampler"
        )
    return data[0], data[1]


def _num_replicas() -> int:
    """Replicas in sync in the current replica context (1 outside a strategy)."""
    replica = tf.distribute.get_replica_context()
    return replica.num_replicas_in_sync if replica is not None else 1


def _gather_global_batch(embeddings, labels):
    """All replicas' `(embeddings, labels)` in replica order, and this replica's rows.

    Outside a strategy (or with one replica) the local batch is the global batch.
    The gather is differentiable: its gradient sums every replica's gradient with
    respect to this replica's rows.

    Returns:
        `(all_embeddings (G, D), all_labels (G,), own (B,))`: `own` indexes this
        replica's B rows among the G rows of the global batch.
    """
    local_batch = embeddings.shape[0]
    replica = tf.distribute.get_replica_context()
    if replica is None or replica.num_replicas_in_sync == 1:
        own = ops.arange(ops.shape(embeddings)[0], dtype="int32")
        return embeddings, labels, own
    num_replicas = replica.num_replicas_in_sync
    replica_id = ops.cast(replica.replica_id_in_sync_group, "int32")
    all_embeddings = replica.all_gather(embeddings, axis=0)
    all_labels = replica.all_gather(labels, axis=0)
    if local_batch is not None:
        # Training: equal static batches. Restore the static shape all_gather
        # loses, which the ring buffer needs.
        global_rows = local_batch * num_replicas
        all_embeddings = tf.ensure_shape(
            all_embeddings, [global_rows, *embeddings.shape[1:]]
        )
        all_labels = tf.ensure_shape(all_labels, [global_rows])
        offset = replica_id * local_batch
    else:
        # Evaluation may end on a partial batch, split unevenly over replicas.
        size = ops.reshape(ops.shape(embeddings)[0], (1,))
        sizes = ops.cast(replica.all_gather(size, axis=0), "int32")
        before = ops.arange(num_replicas, dtype="int32") < replica_id
        offset = ops.sum(ops.where(before, sizes, 0))
    own = offset + ops.arange(ops.shape(embeddings)[0], dtype="int32")
    return all_embeddings, all_labels, own
