"""Tests for xbm_tf.FeatureDrift: closed-form drift, history bound, log.csv."""

from __future__ import annotations

import csv
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from xbm_tf import FeatureDrift
from xbm_tf.data import ImageSet

# Every training batch is 4 copies of X0, so with the loss sum(y_pred * C) the
# gradient of the kernel W (2 x 2, no bias) is outer(X0, C) = [[1, 2], [0, 0]] at
# every step, and SGD(lr) moves W by -lr * outer(X0, C) per step: a probe p moves
# by -lr * dt * p[0] * C in dt steps, so drift@dt = lr^2 dt^2 |C|^2 mean(p[0]^2).
X0 = np.array([1.0, 0.0], np.float32)
C = np.array([1.0, 2.0], np.float32)


def _linear_model(lr: float) -> keras.Model:
    inputs = keras.Input((2,))
    outputs = keras.layers.Dense(2, use_bias=False, kernel_initializer="ones")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=lr),
        loss=lambda y_true, y_pred: ops.sum(y_pred * C, axis=-1),
    )
    return model


def _train_data(steps: int):
    x = np.tile(X0, (4 * steps, 1))
    return x, np.zeros((4 * steps, 2), np.float32)


def _probes():
    # Integer inputs: every product and sum below is exact in float32.
    return np.array([[1, 3], [2, -1], [-3, 0], [0, 5], [4, 2]], np.float32)


def _expected(lr, dt, probes):
    return lr**2 * dt**2 * float(C @ C) * float(np.mean(probes[:, 0] ** 2))


def test_hand_computed_drift_of_a_linear_model():
    probes = _probes()
    drift = FeatureDrift(probes, deltas=(2, 4), every_n_steps=2, num_probes=5)
    model = _linear_model(lr=0.5)
    x, y = _train_data(8)
    model.fit(x, y, batch_size=4, epochs=1, callbacks=[drift], verbose=0)
    # Embeddings at steps 0, 2, 4, 6, 8; drift@2 from step 2, drift@4 from step 4.
    assert [(s, dt) for s, dt, _ in drift.series] == [
        (2, 2),
        (4, 2),
        (4, 4),
        (6, 2),
        (6, 4),
        (8, 2),
        (8, 4),
    ]
    for _, dt, value in drift.series:
        assert value == _expected(0.5, dt, probes)  # 5 * mean(p0^2) * dt^2 / 4
    # lr^2 |C|^2 mean(p0^2) = 0.25 * 5 * 6 = 7.5 per dt^2.
    assert {dt: v for _, dt, v in drift.series} == {2: 30.0, 4: 120.0}


def test_learning_rate_zero_without_batch_norm_gives_exactly_zero():
    probes = np.random.default_rng(0).normal(size=(50, 8, 8, 1)).astype(np.float32)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalMaxPooling2D(),
            keras.layers.Dense(3),
            keras.layers.UnitNormalization(),
        ]
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    drift = FeatureDrift(probes, deltas=(1, 3), every_n_steps=1, num_probes=20)
    x = np.random.default_rng(1).normal(size=(24, 8, 8, 1)).astype(np.float32)
    model.fit(x, np.ones((24, 3)), batch_size=4, epochs=1, callbacks=[drift], verbose=0)
    assert len(drift.series) == 6 + 4  # dt=1 at steps 1-6, dt=3 at steps 3-6
    assert all(value == 0.0 for _, _, value in drift.series)
    # ... while a positive learning rate moves the embeddings.
    model.optimizer.learning_rate.assign(0.5)
    model.fit(x, np.ones((24, 3)), batch_size=4, epochs=1, callbacks=[drift], verbose=0)
    assert all(value > 0 for step, _, value in drift.series if step >= 7)


def test_history_keeps_only_what_the_largest_dt_needs():
    drift = FeatureDrift(_probes(), deltas=(3, 9), every_n_steps=3, num_probes=5)
    emb = np.zeros((5, 2), np.float32)
    for step in range(0, 31, 3):
        drift.record(step, emb + step)
        held = drift.history_steps
        assert held[-1] == step and held[0] == max(0, step - 6)
        assert len(held) <= 9 // 3
    # The full series is kept: dt=3 from step 3 on, dt=9 from step 9 on.
    assert len(drift.series) == 10 + 8
    # Every probe moved by (dt, dt) in dt steps: squared distance 2 dt^2.
    assert {(dt, v) for _, dt, v in drift.series} == {(3, 18.0), (9, 162.0)}


def test_log_csv_gets_drift_columns_through_fit(tmp_path):
    drift = FeatureDrift(
        _probes(), deltas=(2, 6), every_n_steps=2, num_probes=5, log_dir=tmp_path
    )
    model = _linear_model(lr=0.25)
    x, y = _train_data(4)
    path = tmp_path / "log.csv"
    model.fit(
        x,
        y,
        batch_size=4,
        epochs=3,  # 4 steps per epoch
        callbacks=[drift, keras.callbacks.CSVLogger(str(path))],
        verbose=0,
    )
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 3
    assert {"drift@2", "drift@6"} <= set(rows[0])
    probes = _probes()
    assert float(rows[0]["drift@2"]) == pytest.approx(_expected(0.25, 2, probes))
    assert math.isnan(float(rows[0]["drift@6"]))  # step 4: no step -2 yet
    assert float(rows[2]["drift@6"]) == pytest.approx(_expected(0.25, 6, probes))
    events = list((tmp_path / "drift").iterdir())
    assert events and events[0].stat().st_size > 0


def test_image_set_probes_are_seeded_and_leave_global_rng_alone():
    # Image i is constant with value i.
    images = np.broadcast_to(
        np.arange(40, dtype=np.uint8)[:, None, None, None], (40, 4, 4, 1)
    ).copy()
    image_set = ImageSet(images, np.arange(40) % 5, "toy")
    state = np.random.get_state()[1].copy()
    drawn = []
    for _ in range(2):
        drift = FeatureDrift(
            image_set,
            deltas=(1,),
            every_n_steps=1,
            num_probes=7,
            seed=3,
            resize_size=4,
            crop_size=4,
            batch_size=3,
        )
        drawn.append([int(b[0, 0, 0]) for b, _ in drift.probe_data.unbatch()])
    np.testing.assert_array_equal(np.random.get_state()[1], state)
    assert drawn[0] == drawn[1] and len(set(drawn[0])) == 7
    expected = np.sort(np.random.default_rng(3).choice(40, 7, replace=False))
    assert drawn[0] == expected.tolist()


def test_dataset_probes_take_the_first_images(float32_gap):
    images = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    ds = tf.data.Dataset.from_tensor_slices((images, np.zeros(10))).batch(4)
    drift = FeatureDrift(ds, deltas=(1,), every_n_steps=1, num_probes=6, batch_size=5)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, "linear")])
    drift.set_model(model)
    emb = drift.embed()
    assert emb.shape == (6, 1)
    # Batches of 5 and 1 against one of 6: other kernels for x @ w + b, 3 terms,
    # relative to the sum of their absolute values (conftest's float32_gap).
    kernel, bias = model.get_weights()
    terms = np.abs(images[:6]) @ np.abs(kernel) + np.abs(bias)
    want = model.predict(images[:6], verbose=0)
    assert np.all(np.abs(emb - want) <= float32_gap(3) * terms)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"deltas": (10, 25), "every_n_steps": 10}, r"multiples of every_n_steps=10"),
        ({"deltas": ()}, "`deltas` is empty"),
        ({"every_n_steps": 0}, "`every_n_steps` must be a positive integer"),
        ({"num_probes": -1}, "`num_probes` must be a positive integer"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FeatureDrift(_probes(), **kwargs)


def test_bad_probe_data_is_named():
    with pytest.raises(ValueError, match="must be an ImageSet, an array"):
        FeatureDrift([[1, 2]], deltas=(1,), every_n_steps=1)
