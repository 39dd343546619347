"""memory_dtype: a half-precision memory stores half the bytes and is saved."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from xbm_tf import CrossBatchMemory, XBMContrastiveModel
from xbm_tf.losses import contrastive_loss

DIM_IN, DIM_OUT, BATCH, MEMORY = 10, 6, 8, 24
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_memory_stores_half_the_bytes_rounded_rows(dtype):
    full = CrossBatchMemory(32, 16)
    half = CrossBatchMemory(32, 16, memory_dtype=dtype)
    # Half precision is stored as its bit patterns (XLA scatters uint16 in place).
    assert half.embeddings.dtype == "uint16" and full.embeddings.dtype == "float32"
    assert np.asarray(full.embeddings).nbytes == 32 * 16 * 4
    assert np.asarray(half.embeddings).nbytes == 32 * 16 * 2
    rows = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)
    half.enqueue(rows, np.arange(4))
    keys, _, valid = half.read()
    assert keys.dtype == dtype
    want = tf.cast(tf.cast(rows, dtype), "float32").numpy()
    np.testing.assert_array_equal(tf.cast(keys[:4], "float32").numpy(), want)
    assert np.abs(want - rows).max() > 0 and valid.numpy().sum() == 4
    np.testing.assert_array_equal(
        np.asarray(half.embeddings)[:4],
        tf.bitcast(tf.cast(rows, dtype), tf.uint16).numpy(),
    )
    keys_in_place = half.keys()
    assert keys_in_place.dtype == dtype and keys_in_place.storage_dtype == "uint16"
    clone = CrossBatchMemory.from_config(half.get_config())
    assert clone.memory_dtype == dtype and clone.read()[0].dtype == dtype

    half.assign_embeddings(np.full((32, 16), 0.1, np.float32))
    np.testing.assert_array_equal(
        tf.cast(half.read()[0], "float32").numpy(),
        np.full((32, 16), tf.cast(tf.cast(0.1, dtype), "float32").numpy()),
    )


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_enqueue_under_xla_writes_the_eager_bits(dtype):
    rng = np.random.default_rng(2)
    memories = [CrossBatchMemory(12, 5, memory_dtype=dtype) for _ in range(2)]
    enqueue_xla = tf.function(memories[1].enqueue, jit_compile=True)
    for step in range(4):  # wraps the ring; step 2 is gated off
        rows = rng.normal(size=(5, 5)).astype(np.float32)
        labels = np.arange(5) + 10 * step
        memories[0].enqueue(rows, labels, active=tf.constant(step != 2))
        enqueue_xla(tf.constant(rows), tf.constant(labels), tf.constant(step != 2))
    for a, b in zip(memories[0].weights, memories[1].weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(memories[1].count.numpy()) == 12


def test_bad_memory_dtype_is_named():
    with pytest.raises(ValueError, match="memory_dtype must be one of .* 'int8'"):
        CrossBatchMemory(8, 4, memory_dtype="int8")


def _embedder(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((DIM_IN,)), keras.layers.Dense(DIM_OUT)], name="embedder"
    )


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) // 2 % 6).astype(np.int32)
    return rng.normal(size=(n, DIM_IN)).astype(np.float32), labels


def _fit(jit, dtype="bfloat16", epochs=1):
    model = XBMContrastiveModel(
        _embedder(), memory_size=MEMORY, xbm_start_step=2, memory_dtype=dtype
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), jit_compile=jit)
    x, y = _data()
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=False)
    return model, history.history


def test_memory_loss_is_the_loss_against_the_rounded_history():
    model = XBMContrastiveModel(
        _embedder(), memory_size=MEMORY, memory_dtype="bfloat16"
    )
    step = tf.function(lambda e, y: model.compute_losses(e, y, 0), jit_compile=True)
    rng = np.random.default_rng(1)
    seen_e, seen_y = [], []
    for _ in range(4):  # 32 rows through a ring of 24
        e = rng.normal(size=(BATCH, DIM_OUT))
        e = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)
        y = rng.integers(0, 3, BATCH).astype(np.int32)
        with tf.GradientTape() as tape:
            queries = tf.constant(e)
            tape.watch(queries)
            _, xbm_loss = step(queries, tf.constant(y))
        grad = tape.gradient(xbm_loss, queries).numpy()
        seen_e.append(tf.cast(tf.cast(e, "bfloat16"), "float32").numpy())
        seen_y.append(y)
        keys = np.concatenate(seen_e)[-MEMORY:]
        key_labels = np.concatenate(seen_y)[-MEMORY:]
        own = np.arange(len(keys) - BATCH, len(keys))
        with tf.GradientTape() as tape:
            queries = tf.constant(e)
            tape.watch(queries)
            want = tf.reduce_sum(
                contrastive_loss(queries, y, keys, key_labels, query_key_index=own)
            ) / float(BATCH)
        want_grad = tape.gradient(want, queries).numpy()
        # The reference reads the same rounded keys in float32; the difference is
        # the bfloat16 rounding of the queries and of each similarity (<= 2 *
        # 2^-9 per term, at most MEMORY terms per query) and of the gradient's
        # matmul result (2^-9 relative, per term of |keys| summed).
        assert float(xbm_loss) == pytest.approx(float(want), abs=2 * 2.0**-9 * MEMORY)
        bound = 2.0**-8 * (np.abs(keys).sum(axis=0) / BATCH) + 1e-6
        assert np.all(np.abs(grad - want_grad) <= bound)
        assert float(want) > 0


def test_eager_and_xla_agree_with_a_bfloat16_memory():
    eager, h_eager = _fit(False)
    xla, h_xla = _fit(True)
    # XLA and the eager kernels round the bfloat16 similarities differently
    # (XLA computes the dot in float32 and rounds the result once): each of the
    # <= MEMORY terms of a query's memory loss may differ by one bfloat16 step
    # (2^-8 for values below 2), and the weights follow these gradients.
    for key in ("loss", "batch_loss", "xbm_loss"):
        np.testing.assert_allclose(h_eager[key], h_xla[key], atol=MEMORY * 2.0**-8)
    assert h_xla["xbm_loss"][0] > 0
    np.testing.assert_array_equal(
        np.asarray(eager.memory.labels), np.asarray(xla.memory.labels)
    )
    np.testing.assert_allclose(
        tf.cast(eager.memory.read()[0], "float32").numpy(),
        tf.cast(xla.memory.read()[0], "float32").numpy(),
        atol=2.0**-7,  # one bfloat16 step of a unit-vector component
    )


def _same_memory(a, b):
    assert b.memory.embeddings.dtype == a.memory.embeddings.dtype
    for x, y in zip(a.memory.weights, b.memory.weights):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_keras_weights_and_checkpoint_files_restore_a_half_memory(dtype, tmp_path):
    model, _ = _fit(False, dtype=dtype)
    assert int(model.memory.count.numpy()) == MEMORY
    model.save(tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras")
    assert restored.memory_dtype == dtype
    _same_memory(model, restored)

    fresh = XBMContrastiveModel(_embedder(seed=3), MEMORY, memory_dtype=dtype)
    fresh(np.zeros((1, DIM_IN), np.float32))
    model.save_weights(tmp_path / "m.weights.h5")
    fresh.load_weights(tmp_path / "m.weights.h5")
    _same_memory(model, fresh)

    fresh = XBMContrastiveModel(_embedder(seed=4), MEMORY, memory_dtype=dtype)
    fresh(np.zeros((1, DIM_IN), np.float32))
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(model=fresh).read(path).assert_existing_objects_matched()
    _same_memory(model, fresh)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_files_saved_with_half_values_load_as_bits(dtype):
    # Written by the code before half-precision memories were stored as bit
    # patterns (commit 6bd4f40): the memory variable held bfloat16 / float16
    # values, rows linspace(-1, 1, 32).reshape(8, 4), count 8.
    path = FIXTURES / f"half_memory_values_{dtype}.keras"
    model = keras.models.load_model(path)
    want = tf.cast(np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4), dtype)
    assert model.memory.embeddings.dtype == "uint16"
    np.testing.assert_array_equal(
        tf.cast(model.memory.read()[0], "float32").numpy(),
        tf.cast(want, "float32").numpy(),
    )
    assert int(model.memory.count.numpy()) == 8
