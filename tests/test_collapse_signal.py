"""neg_similarity: the train step's cheap sign of an embedding collapse."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from xbm_tf import XBMContrastiveModel
from xbm_tf.model import negative_similarity


def test_negative_similarity_by_a_plain_loop():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(10, 5)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    y = rng.integers(0, 3, 10)
    sims = [e[i] @ e[j] for i in range(10) for j in range(10) if y[i] != y[j]]
    assert float(negative_similarity(e, y)) == pytest.approx(np.mean(sims), abs=1e-6)
    # Collapsed onto one point: 1; one class only: 0 (no pair).
    same = np.tile(e[:1], (10, 1))
    assert float(negative_similarity(same, y)) == pytest.approx(1.0, abs=1e-6)
    assert float(negative_similarity(e, np.zeros(10, int))) == 0.0


def _model(lr):
    keras.utils.set_random_seed(0)
    embedder = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(4),
        ]
    )
    model = XBMContrastiveModel(embedder, memory_size=16)
    model.compile(optimizer=keras.optimizers.SGD(lr))
    return model


def test_fit_logs_the_signal_of_the_batches_before_each_update():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 6)).astype(np.float32)
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    model = _model(lr=0.0)  # no update: every step sees the same embeddings
    want = float(negative_similarity(model(x, training=True), y))
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert history.history["neg_similarity"][0] == pytest.approx(want, abs=1e-6)
