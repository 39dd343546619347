"""XBMContrastiveModel's Keras API: compile, labels, weights, gradients, scaling."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from xbm_tf import ContrastiveLoss, TripletLoss, XBMContrastiveModel
from xbm_tf.backup import TrainingBackup
from xbm_tf.losses import PairLoss, contrastive_loss, triplet_loss
from xbm_tf.terminate_on_nonfinite import NonFiniteLossError, TerminateOnNonFinite

DIM_IN, DIM_OUT, BATCH = 6, 4, 8


def _embedder(seed=0, dtype=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((DIM_IN,)),
            keras.layers.Dense(8, activation="tanh", dtype=dtype),
            keras.layers.Dense(DIM_OUT, dtype=dtype),
        ]
    )


def _data(n=32, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n // classes)
    rng.shuffle(labels)
    x = rng.normal(size=(classes, DIM_IN))[labels] + rng.normal(size=(n, DIM_IN))
    return x.astype(np.float32), labels.astype(np.int32)


# --- compile ----------------------------------------------------------------------


def test_compile_loss_replaces_the_constructor_loss(float32_gap):
    x, y = _data(n=BATCH)
    model = XBMContrastiveModel(_embedder(), memory_size=16, xbm_start_step=100)
    loss = TripletLoss(margin=0.3, mining="hard")
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss)
    assert model.pair_loss is loss
    e = model.predict(x, verbose=0)
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    own = np.arange(BATCH)
    want = np.mean(
        triplet_loss(e, y, e, y, query_key_index=own, margin=0.3, mining="hard")
    )
    contrastive = np.mean(contrastive_loss(e, y, e, y, query_key_index=own))
    assert abs(want - contrastive) > 1e-3
    # fit and predict run the network in two graphs, then the loss: fan-ins 6
    # and 8, the L2 norm and similarities over 4, 8 keys, the mean over 8 rows.
    gap = float32_gap(38)
    assert history.history["batch_loss"][0] == pytest.approx(
        float(want), rel=gap, abs=gap
    )


def test_compile_arguments_that_cannot_apply_are_errors():
    model = XBMContrastiveModel(_embedder(), memory_size=16)
    with pytest.raises(TypeError, match="constructor's loss= argument"):
        model.compile(optimizer="sgd", loss=keras.losses.MeanSquaredError())
    with pytest.raises(TypeError, match="got str"):
        model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="metrics=\\['accuracy'\\].*Retrieval"):
        model.compile(optimizer="sgd", metrics=["accuracy"])
    with pytest.raises(ValueError, match="loss_weights"):
        model.compile(optimizer="sgd", loss_weights=[1.0])
    model.compile(optimizer="sgd")
    x, y = _data(n=BATCH)
    with pytest.raises(ValueError, match="does not support sample weights"):
        model.fit(x, y, sample_weight=np.ones(BATCH), batch_size=BATCH, verbose=0)
    with pytest.raises(ValueError, match="does not support sample weights"):
        model.fit(x, y, class_weight={0: 1.0, 1: 2.0, 2: 1, 3: 1}, verbose=0)


def test_custom_pair_loss_round_trips_through_a_keras_file(
    tmp_path, scaled_contrastive
):
    x, y = _data(n=BATCH)
    model = XBMContrastiveModel(
        _embedder(), memory_size=16, loss=PairLoss(scaled_contrastive, scale=2.5)
    )
    model.compile(optimizer="sgd")
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
    path = tmp_path / "custom.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert restored.pair_loss.fn is scaled_contrastive
    assert restored.pair_loss.hyper_parameters == {"scale": 2.5}
    assert restored.compiled and restored.optimizer.name == model.optimizer.name
    e = model.predict(x, verbose=0)
    np.testing.assert_allclose(restored.predict(x, verbose=0), e, rtol=1e-6)


def test_saving_an_unregistered_custom_loss_fails_with_a_clear_message(tmp_path):
    def my_loss(
        query_embeddings,
        query_labels,
        key_embeddings,
        key_labels,
        key_mask=None,
        query_key_index=None,
    ):
        return contrastive_loss(
            query_embeddings, query_labels, key_embeddings, key_labels
        )

    # A good file already at the path must survive the failed save.
    path = tmp_path / "m.keras"
    good = XBMContrastiveModel(_embedder(), memory_size=16)
    good(np.zeros((1, DIM_IN), np.float32))
    good.save(path)
    before = path.read_bytes()
    model = XBMContrastiveModel(_embedder(), memory_size=16, loss=PairLoss(my_loss))
    model(np.zeros((1, DIM_IN), np.float32))
    with pytest.raises(ValueError, match="PairLoss\\(my_loss\\) cannot be saved.*"):
        model.save(path)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="cannot be saved"):
        model.save(tmp_path / "new.keras")
    assert not (tmp_path / "new.keras").exists()


def test_saving_an_unregistered_loss_subclass_fails_with_a_clear_message(tmp_path):
    class HalfContrastive(ContrastiveLoss):  # not registered with Keras
        pass

    model = XBMContrastiveModel(
        _embedder(), memory_size=16, loss=HalfContrastive(neg_margin=0.4)
    )
    model(np.zeros((1, DIM_IN), np.float32))
    with pytest.raises(ValueError, match="HalfContrastive cannot be saved.*register"):
        model.save(tmp_path / "m.keras")
    assert not (tmp_path / "m.keras").exists()
    # Registered, it round-trips.
    registered = keras.saving.register_keras_serializable(package="test_api")(
        type("RegisteredContrastive", (ContrastiveLoss,), {})
    )
    model = XBMContrastiveModel(
        _embedder(), memory_size=16, loss=registered(neg_margin=0.4)
    )
    model(np.zeros((1, DIM_IN), np.float32))
    model.save(tmp_path / "r.keras")
    restored = keras.models.load_model(tmp_path / "r.keras")
    assert type(restored.pair_loss) is registered
    assert restored.pair_loss.neg_margin == 0.4


# --- Labels -----------------------------------------------------------------------


def test_int64_labels_are_not_truncated_by_the_model_or_the_memory(float32_gap):
    # 5 and 2^32 + 5 are different classes that int32 would merge.
    big = 2**32
    y = np.array([5, 5, big + 5, big + 5, 2**31, 2**31, 7, 7], np.int64)
    e = tf.constant(
        _unit(np.random.default_rng(4).normal(size=(BATCH, DIM_OUT))), tf.float32
    )
    model = XBMContrastiveModel(_embedder(), memory_size=BATCH, xbm_start_step=0)
    batch_loss, xbm_loss = tf.function(lambda e, y: model.compute_losses(e, y, 0))(
        e, tf.constant(y)
    )
    own = np.arange(BATCH)
    want = np.mean(contrastive_loss(e, y, e, y, query_key_index=own))
    truncated = y.astype(np.int32)
    merged = np.mean(contrastive_loss(e, truncated, e, truncated, query_key_index=own))
    assert abs(want - merged) > 1e-3
    # A tf.function against eager: 4-wide similarities, sums over 8 keys, the
    # mean over 8 rows (conftest's float32_gap).
    gap = float32_gap(20)
    assert float(batch_loss) == pytest.approx(float(want), rel=gap, abs=gap)
    assert float(xbm_loss) == pytest.approx(float(want), rel=gap, abs=gap)
    np.testing.assert_array_equal(np.asarray(model.memory.labels), y)
    with pytest.raises(TypeError, match="labels must be integers, got float32"):
        model.compute_losses(e, y.astype(np.float32), 0)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --- loss = batch_loss + xbm_weight * xbm_loss, and one step's gradient -------------


def test_total_loss_weights_the_memory_term():
    x, y = _data(n=3 * BATCH)
    model = XBMContrastiveModel(
        _embedder(), memory_size=24, xbm_weight=0.25, xbm_start_step=1
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    h = history.history
    assert h["xbm_loss"][0] > 0.1
    assert h["loss"][0] == pytest.approx(h["batch_loss"][0] + 0.25 * h["xbm_loss"][0])


def _contrastive_gradient(x, kernel, labels, neg_margin, xbm_weight):
    """dL/dkernel of one step by hand: z = x W, u = z/|z|, loss on u (numpy).

    Also returns the sum of the absolute values of each entry's terms, the
    scale of its float32 rounding error."""
    z = x @ kernel
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    u = z / norm
    b = len(x)
    grad_u = np.zeros_like(u)
    grad_u_abs = np.zeros_like(u)
    kinds = {"positive": 0, "hard negative": 0, "easy negative": 0}
    for i in range(b):
        for j in range(b):
            if i == j:
                continue
            s = u[i] @ u[j]
            if labels[i] == labels[j]:
                g = -1.0  # d(1 - s)/ds
                kinds["positive"] += 1
            elif s > neg_margin:
                g = 1.0  # d(s)/ds
                kinds["hard negative"] += 1
            else:
                g = 0.0
                kinds["easy negative"] += 1
            # The in-batch pair (i, j) is differentiated through both u_i and
            # u_j (query i and key j); the memory pair only through the query
            # (the memory holds stop-gradient copies of the batch).
            grad_u[i] += (1.0 + xbm_weight) * g * u[j] / b
            grad_u[j] += g * u[i] / b
            grad_u_abs[i] += (1.0 + xbm_weight) * abs(g * u[j]) / b
            grad_u_abs[j] += abs(g * u[i]) / b
    grad_z = np.stack(
        [
            (np.eye(len(u[i])) - np.outer(u[i], u[i])) @ grad_u[i] / norm[i]
            for i in range(b)
        ]
    )
    grad_z_abs = np.stack(
        [
            np.abs(np.eye(len(u[i])) - np.outer(u[i], u[i])) @ grad_u_abs[i] / norm[i]
            for i in range(b)
        ]
    )
    return x.T @ grad_z, kinds, np.abs(x).T @ grad_z_abs


def test_one_train_step_matches_a_hand_derived_gradient(float32_gap):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(BATCH, 2)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)
    kernel = rng.normal(size=(2, 2)).astype(np.float32)
    embedder = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(2, use_bias=False)]
    )
    embedder.layers[0].kernel.assign(kernel)
    lr, weight, margin = 0.1, 0.5, 0.2
    model = XBMContrastiveModel(
        embedder,
        memory_size=BATCH,
        xbm_weight=weight,
        xbm_start_step=0,
        loss=ContrastiveLoss(neg_margin=margin),
    )
    model.compile(optimizer=keras.optimizers.SGD(lr))
    model.fit(x, labels, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    grad, kinds, scale = _contrastive_gradient(
        x.astype(np.float64), kernel.astype(np.float64), labels, margin, weight
    )
    assert min(kinds.values()) > 0, kinds  # every kind of pair takes part
    assert np.abs(grad).max() > 1e-2
    got = np.asarray(embedder.layers[0].kernel)
    # float32 against float64: z (2 terms), the norm (2 + a root), s (2), each
    # u's 14 pairs, the projection (2 + a division) and the 8 rows: 32 roundings
    # of the gradient's terms (one side exact: half of float32_gap), then the
    # update rounds once.
    want = kernel - lr * grad
    bound = float32_gap(32) / 2 * lr * scale + 2.0**-24 * np.abs(want)
    assert np.all(np.abs(got - want) <= bound), (np.abs(got - want), bound)


# --- Loss scaling: warm-up counting and mixed precision ---------------------------


class _GradientFactor(keras.layers.Layer):
    """Identity whose backward pass multiplies the gradient by `factor`."""

    def build(self, input_shape):
        self.factor = self.add_weight(
            shape=(), initializer="ones", trainable=False, name="factor"
        )

    def call(self, x):
        factor = tf.convert_to_tensor(self.factor)

        @tf.custom_gradient
        def identity(x):
            return tf.identity(x), lambda dy: dy * factor

        return identity(x)


class _InfGradientOnBatch(keras.callbacks.Callback):
    def __init__(self, layer, batch):
        super().__init__()
        self.layer, self.batch = layer, batch

    def on_train_batch_begin(self, batch, logs=None):
        self.layer.factor.assign(np.inf if batch == self.batch else 1.0)


def test_nonfinite_weights_after_a_finite_loss_stop_before_the_backup(tmp_path):
    # Step 2's gradient overflows while its loss is finite: the update makes the
    # weights non-finite, and a backup after that step would save them.
    def build():
        factor = _GradientFactor()
        embedder = keras.Sequential(
            [
                keras.Input((DIM_IN,)),
                keras.layers.Dense(8),
                factor,
                keras.layers.Dense(4),
            ]
        )
        model = XBMContrastiveModel(embedder, memory_size=40, xbm_start_step=0)
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        return model, embedder, factor

    keras.utils.set_random_seed(0)
    model, embedder, factor = build()
    x, y = _data(n=4 * BATCH)
    losses = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"]))
    )
    backup = TrainingBackup(str(tmp_path / "backup"), every_steps=1)
    with pytest.raises(
        NonFiniteLossError,
        match=r"weights became non-finite although every loss was finite .* "
        r"at training step 2 \(epoch 1, step 2 of 4\)",
    ):
        model.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=1,
            verbose=0,
            shuffle=False,
            callbacks=[
                _InfGradientOnBatch(factor, batch=1),
                record,
                TerminateOnNonFinite(),
                backup,
            ],
        )
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    assert not np.all(np.isfinite(embedder.layers[0].kernel.numpy()))
    kept = sorted(p.name for p in (tmp_path / "backup").iterdir())
    assert kept == ["step_000000001"]
    restored, _, _ = build()
    restored(x[:1])
    assert TrainingBackup(str(tmp_path / "backup")).restore(restored) == 1
    assert all(np.all(np.isfinite(w)) for w in restored.get_weights())


def test_warm_up_counts_applied_updates_under_loss_scaling():
    keras.utils.set_random_seed(0)
    factor = _GradientFactor()
    embedder = keras.Sequential(
        [keras.Input((DIM_IN,)), keras.layers.Dense(8), factor, keras.layers.Dense(4)]
    )
    model = XBMContrastiveModel(embedder, memory_size=40, xbm_start_step=2)
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.01), initial_scale=1024.0
    )
    model.compile(optimizer=optimizer)
    x, y = _data(n=4 * BATCH)
    skip = _InfGradientOnBatch(factor, batch=1)
    history = model.fit(
        x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=[skip]
    )
    # Batch 1's gradients were infinite: the step was skipped and the scale
    # halved. Batches 0, 2, 3 were applied.
    assert int(optimizer.iterations.numpy()) == 3
    assert float(optimizer.dynamic_scale.numpy()) == 512.0
    assert np.isfinite(history.history["loss"][0])
    # The memory joins once 2 updates were applied: at batch 3 only (counting
    # attempted steps it would have joined at batch 2 and hold 16 rows).
    assert int(model.memory.count.numpy()) == BATCH


def test_mixed_float16_with_loss_scaling_matches_float32():
    x, y = _data(n=BATCH)
    updates = {}
    for policy in ("float32", "mixed_float16"):
        embedder = _embedder(seed=3, dtype=policy)
        model = XBMContrastiveModel(embedder, memory_size=16, xbm_start_step=0)
        optimizer = keras.optimizers.SGD(0.5)
        if policy == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        model.compile(optimizer=optimizer)
        before = [np.asarray(w).copy() for w in embedder.trainable_weights]
        history = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0)
        after = [np.asarray(w) for w in embedder.trainable_weights]
        updates[policy] = (
            [a - b for a, b in zip(after, before)],
            history.history["loss"][0],
        )
        assert embedder.layers[0].compute_dtype == (
            "float16" if policy == "mixed_float16" else "float32"
        )
    (d32, loss32), (d16, loss16) = updates["float32"], updates["mixed_float16"]
    # float16 rounds to 2**-11. The float16 part is the network: the inputs and
    # outputs rounded, fan-ins 6 and 8: 16 roundings for the loss (computed in
    # float32 from the embeddings); the gradients add the 4- and 8-wide backward
    # products and the sums over 8 rows: 36 roundings, relative to the largest
    # update of each weight (the scale of the gradient's terms).
    f16 = 2.0**-11
    assert loss16 == pytest.approx(loss32, rel=16 * f16)
    for a, b in zip(d32, d16):
        assert np.abs(a).max() > 1e-3
        gap = 36 * f16
        np.testing.assert_allclose(b, a, rtol=gap, atol=gap * np.abs(a).max())
