"""Tests for xbm_tf.retrieval.callback on a tiny Dense + L2-normalise model."""

from __future__ import annotations

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from xbm_tf import retrieval as ev
from xbm_tf.retrieval import RetrievalEvaluation, embed_dataset


def _clustered(n=120, num_classes=12, dim=8, noise=0.8, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    centers = rng.standard_normal((num_classes, dim))
    x = centers[labels] + noise * rng.standard_normal((n, dim))
    return x.astype(np.float32), labels


def _embedder(dim_in=8, dim_out=6):
    return keras.Sequential(
        [
            keras.Input((dim_in,)),
            keras.layers.Dense(dim_out),
            keras.layers.UnitNormalization(),
        ]
    )


class _LogRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.logs = []

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs))


def _fit(model, x, callbacks, epochs):
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    targets = np.random.default_rng(1).standard_normal((len(x), 6)).astype("float32")
    return model.fit(
        x, targets, batch_size=32, epochs=epochs, callbacks=callbacks, verbose=0
    )


def test_logs_hold_recall_and_map_equal_to_direct_computation():
    x, y = _clustered()
    model = _embedder()
    evaluation = RetrievalEvaluation((x, y), ks=(1, 2, 4, 8))
    recorder = _LogRecorder()
    history = _fit(model, x, [evaluation, recorder], epochs=2)
    emb = model.predict(x, verbose=0)
    want = ev.recall_at_k(emb, y, ks=(1, 2, 4, 8))
    keys = {f"val_recall@{k}" for k in (1, 2, 4, 8)} | {"val_map@r", "val_r_precision"}
    assert keys <= set(recorder.logs[-1]) and keys <= set(history.history)
    for k in (1, 2, 4, 8):
        assert recorder.logs[-1][f"val_recall@{k}"] == pytest.approx(want[k])
        assert history.history[f"val_recall@{k}"][-1] == pytest.approx(want[k])
    assert recorder.logs[-1]["val_map@r"] == pytest.approx(ev.map_at_r(emb, y))
    assert 0.0 < want[1] < 1.0
    # The on-demand evaluation returns the same values.
    now = evaluation.evaluate()
    assert now["val_recall@1"] == pytest.approx(want[1])
    assert now["val_r_precision"] == pytest.approx(ev.r_precision(emb, y))


def test_every_n_epochs_and_prefix():
    x, y = _clustered()
    evaluation = RetrievalEvaluation(
        (x, y), ks=(1, 3), every_n_epochs=2, prefix="test_", backend="exact"
    )
    recorder = _LogRecorder()
    _fit(_embedder(), x, [evaluation, recorder], epochs=5)
    evaluated = ["test_recall@3" in logs for logs in recorder.logs]
    assert evaluated == [False, True, False, True, False]
    assert "val_recall@1" not in recorder.logs[1]
    # The embeddings of the last evaluated epoch (index 3) are kept for reuse.
    epoch, (q, ql, g, gl) = evaluation.last_epoch_embeddings
    assert epoch == 3 and g is None and gl is None
    assert q.shape == (len(x), 6) and (ql == y).all()


def test_gallery_dataset_and_embedding_submodel():
    x, y = _clustered(n=160, seed=2)
    queries = tf.data.Dataset.from_tensor_slices((x[:60], y[:60])).batch(16)
    gallery = tf.data.Dataset.from_tensor_slices((x[60:], y[60:])).batch(32)
    embedder = _embedder()
    model = keras.Sequential([embedder, keras.layers.Dense(6)])
    evaluation = RetrievalEvaluation(
        queries, gallery, ks=(1, 10), embedding_model=embedder
    )
    recorder = _LogRecorder()
    _fit(model, x, [evaluation, recorder], epochs=1)
    q, g = embedder.predict(x[:60], verbose=0), embedder.predict(x[60:], verbose=0)
    want = ev.recall_at_k(q, y[:60], g, y[60:], ks=(1, 10))
    assert recorder.logs[0]["val_recall@1"] == pytest.approx(want[1])
    assert recorder.logs[0]["val_recall@10"] == pytest.approx(want[10])
    want_map = ev.map_at_r(q, y[:60], g, y[60:])
    assert recorder.logs[0]["val_map@r"] == pytest.approx(want_map)


def test_embed_dataset_keeps_labels_aligned_when_shuffled():
    labels = np.arange(50) % 5
    images = np.eye(5, dtype=np.float32)[labels] * 3.0
    ds = tf.data.Dataset.from_tensor_slices((images, labels[:, None]))
    ds = ds.shuffle(50, seed=3).batch(8)
    model = keras.Sequential([keras.Input((5,)), keras.layers.UnitNormalization()])
    emb, lab = embed_dataset(model, ds)
    assert emb.shape == (50, 5) and emb.dtype == np.float32
    np.testing.assert_array_equal(emb.argmax(axis=1), lab)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    assert sorted(lab.tolist()) == sorted(labels.tolist())


def test_embed_dataset_skips_empty_batches():
    class NonEmpty(keras.layers.Layer):  # fails like oneDNN's batch norm on B=0
        def call(self, x):
            tf.debugging.assert_positive(tf.shape(x)[0], "empty batch")
            return x

    model = keras.Sequential([keras.Input((3,)), NonEmpty()])
    batches = [np.ones((2, 3)), np.zeros((0, 3)), np.full((1, 3), 2.0)]
    ds = tf.data.Dataset.from_generator(
        lambda: ((x.astype("float32"), np.arange(len(x))) for x in batches),
        output_signature=(
            tf.TensorSpec((None, 3), tf.float32),
            tf.TensorSpec((None,), tf.int64),
        ),
    )
    emb, lab = embed_dataset(model, ds)
    np.testing.assert_array_equal(emb[:, 0], [1, 1, 2])
    assert lab.tolist() == [0, 1, 0]


def test_tensorboard_scalars(tmp_path):
    x, y = _clustered()
    evaluation = RetrievalEvaluation((x, y), ks=(1,), log_dir=str(tmp_path))
    recorder = _LogRecorder()
    _fit(_embedder(), x, [evaluation, recorder], epochs=2)
    files = glob.glob(os.path.join(tmp_path, "retrieval", "events.out.tfevents.*"))
    assert len(files) == 1
    scalars = {}
    for event in tf.compat.v1.train.summary_iterator(files[0]):
        for value in event.summary.value:
            scalars[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
    for epoch in (0, 1):
        got = scalars[("val_recall@1", epoch)]
        assert got == pytest.approx(recorder.logs[epoch]["val_recall@1"])
        got = scalars[("val_map@r", epoch)]
        assert got == pytest.approx(recorder.logs[epoch]["val_map@r"])


def test_model_checkpoint_monitors_recall(tmp_path):
    x, y = _clustered()
    path = str(tmp_path / "best.weights.h5")
    checkpoint = keras.callbacks.ModelCheckpoint(
        path,
        monitor="val_recall@1",
        mode="max",
        save_best_only=True,
        save_weights_only=True,
    )
    evaluation = RetrievalEvaluation((x, y), ks=(1,), backend="exact")
    _fit(_embedder(), x, [evaluation, checkpoint], epochs=1)
    assert os.path.getsize(path) > 0
    assert checkpoint.best == pytest.approx(evaluation.evaluate()["val_recall@1"])


def test_errors():
    x, y = _clustered(n=40)
    with pytest.raises(ValueError, match=r"K=50 is too large: leave-one-out over 40"):
        RetrievalEvaluation((x, y), ks=(1, 50))
    with pytest.raises(ValueError, match=r"K=30 is too large: the gallery has 20"):
        RetrievalEvaluation((x, y), (x[:20], y[:20]), ks=(30,))
    with pytest.raises(ValueError, match=r"`query_data` has 40 images but 39 labels"):
        RetrievalEvaluation((x, y[:-1]))
    with pytest.raises(ValueError, match=r"`query_data` must be a tf.data.Dataset"):
        RetrievalEvaluation(x)
    with pytest.raises(ValueError, match=r"`every_n_epochs` must be a positive .* 0"):
        RetrievalEvaluation((x, y), every_n_epochs=0)
    with pytest.raises(ValueError, match=r"`backend` must be one of"):
        RetrievalEvaluation((x, y), backend="annoy")
    with pytest.raises(ValueError, match=r"has no model"):
        RetrievalEvaluation((x, y)).evaluate()
    flat = keras.Sequential([keras.Input((8,)), keras.layers.Reshape((2, 4))])
    with pytest.raises(ValueError, match=r"one \(batch, dim\) tensor for 40 .*"):
        RetrievalEvaluation((x, y), embedding_model=flat).evaluate()
    empty = tf.data.Dataset.from_tensor_slices((x[:0], y[:0])).batch(4)
    with pytest.raises(ValueError, match="yielded no batches"):
        embed_dataset(_embedder(), empty)


def test_approximate_engine_is_labelled_in_the_logs():
    x, y = _clustered()
    recorder = _LogRecorder()
    evaluation = RetrievalEvaluation((x, y), ks=(1, 4), backend="scann_ah")
    _fit(_embedder(), x, [evaluation, recorder], epochs=1)
    assert recorder.logs[-1]["val_approximate"] == 1.0
    exact = RetrievalEvaluation((x, y), ks=(1, 4), embedding_model=_embedder())
    assert "val_approximate" not in exact.evaluate()
