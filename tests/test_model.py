"""XBMContrastiveModel: the paper's equivalences, XLA parity, saving, learning."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from xbm_tf import (
    ContrastiveLoss,
    MultiSimilarityLoss,
    TripletLoss,
    XBMContrastiveModel,
)
from xbm_tf.losses import contrastive_loss

DIM_IN, DIM_OUT, BATCH = 12, 6, 8


def _embedder(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((DIM_IN,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(DIM_OUT),
        ]
    )


def _data(n=96, classes=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int32)
    centers = rng.normal(size=(classes, DIM_IN))
    x = centers[labels] + 0.5 * rng.normal(size=(n, DIM_IN))
    return x.astype(np.float32), labels


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_memory_of_one_batch_equals_in_batch_loss(float32_gap):
    model = XBMContrastiveModel(_embedder(), memory_size=BATCH, xbm_start_step=0)
    rng = np.random.default_rng(1)
    for _ in range(3):
        e = _unit(rng.normal(size=(BATCH, DIM_OUT))).astype(np.float32)
        y = rng.integers(0, 3, BATCH)
        batch_loss, xbm_loss = model.compute_losses(tf.constant(e), y, 0)
        # The memory and the batch run the loss through other kernels: 6-wide
        # similarities, sums over 8 keys and the mean over 8 rows (float32_gap).
        gap = float32_gap(22)
        assert float(xbm_loss) == pytest.approx(float(batch_loss), rel=gap, abs=gap)
        assert float(batch_loss) > 0


@pytest.mark.parametrize(
    "loss", [ContrastiveLoss(), TripletLoss(margin=0.3), MultiSimilarityLoss()]
)
def test_memory_loss_equals_loss_against_concatenated_history(loss, float32_gap):
    memory_size = 20  # not a multiple of BATCH
    model = XBMContrastiveModel(_embedder(), memory_size=memory_size, loss=loss)
    step = tf.function(lambda e, y: model.compute_losses(e, y, 0), jit_compile=True)
    rng = np.random.default_rng(2)
    seen_e, seen_y = [], []
    for _ in range(6):
        e = _unit(rng.normal(size=(BATCH, DIM_OUT))).astype(np.float32)
        y = rng.integers(0, 4, BATCH).astype(np.int32)
        _, xbm_loss = step(tf.constant(e), tf.constant(y))
        seen_e.append(e)
        seen_y.append(y)
        keys = np.concatenate(seen_e)[-memory_size:]
        key_labels = np.concatenate(seen_y)[-memory_size:]
        own = np.arange(len(keys) - BATCH, len(keys))  # the batch is the newest rows
        want = np.sum(loss.pair_loss(e, y, keys, key_labels, query_key_index=own))
        # XLA against eager numpy-fed kernels: 6-wide similarities, sums over
        # 20 keys and the mean over 8 rows (conftest's float32_gap).
        gap = float32_gap(34)
        assert float(xbm_loss) == pytest.approx(float(want) / BATCH, rel=gap, abs=gap)


def test_warm_up_leaves_memory_empty_then_fills():
    x, y = _data()
    model = XBMContrastiveModel(_embedder(), memory_size=40, xbm_start_step=5)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    history = model.fit(
        x[:40], y[:40], batch_size=BATCH, epochs=1, verbose=0, shuffle=False
    )  # 5 steps: all warm-up
    assert history.history["xbm_loss"][0] == 0.0
    assert int(model.memory.count.numpy()) == 0
    history = model.fit(
        x[:24], y[:24], batch_size=BATCH, epochs=1, verbose=0, shuffle=False
    )  # 3 steps with the memory
    assert history.history["xbm_loss"][0] > 0.0
    assert int(model.memory.count.numpy()) == 24
    assert history.history["memory_fill"][0] == pytest.approx(24 / 40)


def _fit(jit_compile, loss=None, epochs=2):
    x, y = _data()
    model = XBMContrastiveModel(
        _embedder(), memory_size=36, xbm_start_step=3, loss=loss
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=False)
    return model, history.history


@pytest.mark.parametrize("loss", [None, TripletLoss(mining="semihard")])
def test_eager_and_xla_train_steps_agree(loss, float32_gap):
    eager, h_eager = _fit(False, loss)
    xla, h_xla = _fit(True, loss)
    # XLA fuses and orders the sums differently. The sums on the way: fan-ins
    # 12 and 16, the L2 norm and the similarities over 6, each query's 8 + 36
    # keys and the mean over 8 rows; backward, the 6- and 16-wide products and
    # the weight gradients over 8 rows: 122 terms. Adam moves a weight by at
    # most about lr = 0.01 a step, over 24 steps (conftest's float32_gap):
    # 1.8e-5 (seen: 4e-7).
    gap = float32_gap(122, lr=0.01, steps=24)
    for key in ("loss", "batch_loss", "xbm_loss"):
        np.testing.assert_allclose(h_eager[key], h_xla[key], rtol=gap, atol=gap)
    for a, b in zip(eager.weights, xla.weights):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=gap, atol=gap, err_msg=a.path
        )
    assert int(eager.memory.count.numpy()) == 36


def test_call_returns_unit_float32_embeddings():
    model = XBMContrastiveModel(_embedder(), memory_size=16)
    out = model.predict(_data()[0][:5], verbose=0)
    assert out.dtype == np.float32 and out.shape == (5, DIM_OUT)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_test_step_reports_in_batch_loss(float32_gap):
    x, y = _data()
    model = XBMContrastiveModel(_embedder(), memory_size=16)
    model.compile(optimizer="adam")
    got = model.evaluate(
        x[:BATCH], y[:BATCH], batch_size=BATCH, verbose=0, return_dict=True
    )
    e = model.predict(x[:BATCH], verbose=0)
    want = np.mean(
        contrastive_loss(e, y[:BATCH], e, y[:BATCH], query_key_index=np.arange(BATCH))
    )
    # evaluate and predict run the network in two graphs, then the loss: fan-ins
    # 12 and 16, the L2 norm and similarities over 6, 8 keys, the mean over 8.
    gap = float32_gap(56)
    assert got["loss"] == pytest.approx(float(want), rel=gap, abs=gap)


def _memory_state(model):
    return [np.asarray(v) for v in model.memory.weights]


def test_keras_file_round_trip_restores_memory_and_training(tmp_path):
    model, _ = _fit(False, loss=MultiSimilarityLoss(beta=30.0))
    path = tmp_path / "m.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.pair_loss, MultiSimilarityLoss)
    assert restored.pair_loss.beta == 30.0
    assert restored.xbm_start_step == 3 and restored.memory_size == 36
    for a, b in zip(_memory_state(model), _memory_state(restored)):
        np.testing.assert_array_equal(a, b)
    assert int(restored.memory.pointer.numpy()) == int(model.memory.pointer.numpy())
    # Resumed training continues identically (same memory, optimizer, step).
    x, y = _data(seed=5)
    h1 = model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    h2 = restored.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(h1.history["loss"], h2.history["loss"], rtol=1e-5)


def test_checkpoint_round_trip_restores_memory(tmp_path):
    model, _ = _fit(False)
    ckpt = tf.train.Checkpoint(model=model)
    path = ckpt.write(str(tmp_path / "ckpt"))
    fresh = XBMContrastiveModel(_embedder(seed=9), memory_size=36, xbm_start_step=3)
    fresh(np.zeros((1, DIM_IN), np.float32))
    tf.train.Checkpoint(model=fresh).read(path).assert_existing_objects_matched()
    for a, b in zip(_memory_state(model), _memory_state(fresh)):
        np.testing.assert_array_equal(a, b)
    assert int(fresh.memory.count.numpy()) == 36


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="PairLoss"):
        XBMContrastiveModel(
            _embedder(), memory_size=8, loss=keras.losses.MeanSquaredError()
        )
    with pytest.raises(ValueError, match="xbm_start_step must be >= 0, got -1"):
        XBMContrastiveModel(_embedder(), memory_size=8, xbm_start_step=-1)
    model = XBMContrastiveModel(_embedder(), memory_size=4)
    model.compile(optimizer="sgd")
    x, y = _data()
    with pytest.raises(ValueError, match="batch of 8 into a memory of 4 rows"):
        model.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)


def _recall_at_1(e, y):
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return float(np.mean(y[np.argmax(sim, axis=1)] == y))


def test_fit_on_clustered_data_improves_held_out_recall():
    # 20 classes whose centres differ only in 4 of 24 dimensions; the other 20 carry
    # strong shared noise. Train on classes 0-9, retrieve among unseen 10-19.
    rng = np.random.default_rng(0)
    centers = np.zeros((20, 24))
    centers[:, :4] = 2.0 * rng.normal(size=(20, 4))
    labels = np.repeat(np.arange(20), 30)
    x = centers[labels] + np.concatenate(
        [0.3 * rng.normal(size=(600, 4)), 2.0 * rng.normal(size=(600, 20))], axis=1
    )
    x = x.astype(np.float32)
    train, test = labels < 10, labels >= 10
    keras.utils.set_random_seed(0)
    embedder = keras.Sequential([keras.Input((24,)), keras.layers.Dense(8)])
    model = XBMContrastiveModel(embedder, memory_size=120, xbm_start_step=10)
    model.compile(optimizer=keras.optimizers.Adam(0.01), jit_compile=True)
    before = _recall_at_1(model.predict(x[test], verbose=0), labels[test])
    order = rng.permutation(np.flatnonzero(train))
    model.fit(x[order], labels[order], batch_size=20, epochs=8, verbose=0)
    after = _recall_at_1(model.predict(x[test], verbose=0), labels[test])
    assert after > before + 0.2, (before, after)
    assert after > 0.8
