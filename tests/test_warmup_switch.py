"""The warm-up train function: no memory before xbm_start_step, exact after it."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from xbm_tf import XBMContrastiveModel

DIM_IN, DIM_OUT, BATCH, START = 10, 4, 8, 3


def _embedder():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((DIM_IN,)),
            keras.layers.Dense(12, activation="relu"),
            keras.layers.Dense(DIM_OUT),
        ]
    )


def _dataset(steps):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(steps * BATCH, DIM_IN)).astype(np.float32)
    y = (np.arange(steps * BATCH) // 2 % 5).astype(np.int32)  # label 0 included
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True)


class GatedModel(XBMContrastiveModel):
    """Today's single train function: the memory term gated by the step only."""

    def make_train_function(self, force=False):
        return keras.Model.make_train_function(self, force)


class _Record(keras.callbacks.Callback):
    """The logs and the memory after every batch."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def on_train_batch_end(self, batch, logs=None):
        memory = [np.asarray(w).copy() for w in self.model.memory.weights]
        self.steps.append(({k: float(v) for k, v in logs.items()}, memory))


def _train(cls, jit, steps, steps_per_execution=1):
    model = cls(_embedder(), memory_size=20, xbm_start_step=START)
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        jit_compile=jit,
        steps_per_execution=steps_per_execution,
    )
    record = _Record()
    model.fit(_dataset(steps), epochs=1, verbose=0, shuffle=False, callbacks=[record])
    return model, record.steps


@pytest.mark.parametrize("jit,steps_per_execution", [(False, 1), (True, 1), (True, 2)])
def test_switch_equals_the_gated_step_across_the_boundary(
    jit, steps_per_execution, float32_gap
):
    steps = START + 3
    switched, got = _train(XBMContrastiveModel, jit, steps, steps_per_execution)
    gated, want = _train(GatedModel, jit, steps, steps_per_execution)
    assert len(got) == len(want) == steps // steps_per_execution
    # The two train functions are different graphs, which XLA may fuse and
    # order differently. The sums on the way: fan-ins 10 and 12, the L2 norm and
    # the similarities over 4, each query's 8 + 20 keys and the mean over 8 rows;
    # backward, the 4- and 12-wide products and the weight gradients over 8
    # rows: 90 terms; Adam moves a weight at most about lr = 0.01 a step
    # (conftest's float32_gap): 1.1e-5. The memories are written by the same
    # forward pass and must be equal bit for bit.
    gap = float32_gap(90, lr=0.01, steps=steps)
    for (logs, memory), (want_logs, want_memory) in zip(got, want):
        for key in ("loss", "batch_loss", "xbm_loss", "memory_fill"):
            assert logs[key] == pytest.approx(want_logs[key], rel=gap, abs=gap)
        for a, b in zip(memory, want_memory):
            np.testing.assert_array_equal(a, b)
    assert got[-1][0]["xbm_loss"] > 0 and got[-1][0]["memory_fill"] == 1.0
    for a, b in zip(switched.trainable_weights, gated.trainable_weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=gap, atol=gap)


@pytest.mark.parametrize("jit", [False, True])
def test_warm_up_step_never_touches_the_memory(jit, monkeypatch):
    model = XBMContrastiveModel(_embedder(), memory_size=20, xbm_start_step=START)
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit)
    traced = {"read_labels": 0, "enqueue": 0}
    for name in traced:
        method = getattr(model.memory, name)

        def counted(*args, _name=name, _method=method, **kwargs):
            traced[_name] += 1  # runs when a train function is traced
            return _method(*args, **kwargs)

        monkeypatch.setattr(model.memory, name, counted)
    # Rows that are not valid (count 0) but are not zero either: the warm-up
    # function must leave them bit for bit.
    model.memory.embeddings.assign(np.full((20, DIM_OUT), 0.25, np.float32))
    before = [np.asarray(w).copy() for w in model.memory.weights]
    history = model.fit(_dataset(START), epochs=1, verbose=0, shuffle=False)
    assert traced == {"read_labels": 0, "enqueue": 0}
    assert history.history["xbm_loss"] == [0.0]
    assert history.history["memory_fill"] == [0.0]
    for a, b in zip(before, model.memory.weights):
        np.testing.assert_array_equal(a, np.asarray(b))
    history = model.fit(_dataset(2), epochs=1, verbose=0, shuffle=False)
    assert traced["read_labels"] >= 1 and traced["enqueue"] >= 1
    assert history.history["xbm_loss"][0] > 0
    assert int(model.memory.count.numpy()) == 2 * BATCH


def test_the_switch_follows_a_restored_optimizer_step():
    model = XBMContrastiveModel(_embedder(), memory_size=20, xbm_start_step=START)
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    # As after restoring a backup taken at step START - 1: one warm-up step left.
    model.optimizer.iterations.assign(START - 1)
    model.fit(_dataset(1), epochs=1, verbose=0, shuffle=False)
    assert int(model.memory.count.numpy()) == 0
    model.fit(_dataset(1), epochs=1, verbose=0, shuffle=False)
    assert int(model.memory.count.numpy()) == BATCH
    # Going back below the boundary (e.g. restoring an older checkpoint) switches
    # back to the warm-up function.
    model.optimizer.iterations.assign(0)
    model.fit(_dataset(1), epochs=1, verbose=0, shuffle=False)
    assert int(model.memory.count.numpy()) == BATCH
