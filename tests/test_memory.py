"""CrossBatchMemory: a true ring buffer with fixed-shape state."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from xbm_tf import CrossBatchMemory


def _batches(num, batch, dim, seed=0):
    rng = np.random.default_rng(seed)
    for step in range(num):
        e = rng.normal(size=(batch, dim)).astype(np.float32)
        labels = np.arange(step * batch, (step + 1) * batch) % 11  # 0 included
        yield e, labels


def _valid_rows(memory):
    e, labels, valid = (np.asarray(t) for t in memory.read())
    return e[valid], labels[valid]


@pytest.mark.parametrize("jit", [False, True])
def test_ring_keeps_exactly_the_last_rows(jit):
    m, b, d = 10, 4, 3  # M is not a multiple of B: batches straddle the end
    memory = CrossBatchMemory(m, d)
    enqueue = tf.function(memory.enqueue, jit_compile=True) if jit else memory.enqueue
    history_e, history_l = [], []
    for step, (e, labels) in enumerate(_batches(7, b, d)):
        rows = np.asarray(enqueue(e, labels))
        start = step * b
        np.testing.assert_array_equal(rows, (start + np.arange(b)) % m)
        history_e.append(e)
        history_l.append(labels)
        total = (step + 1) * b
        expect_e = np.concatenate(history_e)[-min(m, total) :]
        expect_l = np.concatenate(history_l)[-min(m, total) :]
        got_e, got_l = _valid_rows(memory)
        # The valid rows are the last min(M, total) rows, as a set of (row, label).
        order_got = np.lexsort(got_e.T)
        order_want = np.lexsort(expect_e.T)
        np.testing.assert_array_equal(got_e[order_got], expect_e[order_want])
        np.testing.assert_array_equal(got_l[order_got], expect_l[order_want])
        assert int(memory.count.numpy()) == min(m, total)
        assert int(memory.pointer.numpy()) == total % m
        assert float(memory.fill_fraction()) == pytest.approx(min(m, total) / m)


def test_label_zero_in_last_slot_is_valid_and_reset_empties():
    memory = CrossBatchMemory(4, 2)
    memory.enqueue(np.ones((3, 2), np.float32), np.array([3, 2, 1]))
    _, labels, valid = (np.asarray(t) for t in memory.read())
    np.testing.assert_array_equal(valid, [True, True, True, False])
    memory.enqueue(np.full((1, 2), 2.0, np.float32), np.array([0]))
    e, labels, valid = (np.asarray(t) for t in memory.read())
    assert valid.all() and labels[-1] == 0 and e[-1, 0] == 2.0
    memory.reset()
    e, labels, valid = (np.asarray(t) for t in memory.read())
    assert not valid.any() and not e.any() and not labels.any()
    assert int(memory.pointer.numpy()) == 0


def test_enqueue_is_in_place_and_stops_gradient():
    memory = CrossBatchMemory(8, 2)
    handle_before = memory.embeddings.value.handle
    x = tf.Variable(np.ones((2, 2), np.float32))
    with tf.GradientTape() as tape:
        memory.enqueue(x * 3.0, np.array([1, 2]))
        keys, _, _ = memory.read()
        total = tf.reduce_sum(keys)
    assert tape.gradient(total, x) is None
    assert memory.embeddings.value.handle is handle_before
    assert float(total) == pytest.approx(12.0)


def test_errors_name_the_numbers():
    memory = CrossBatchMemory(5, 3)
    with pytest.raises(ValueError, match="batch of 6 into a memory of 5 rows"):
        memory.enqueue(np.zeros((6, 3), np.float32), np.zeros(6, np.int32))
    with pytest.raises(ValueError, match="width 4 do not fit a memory of width 3"):
        memory.enqueue(np.zeros((2, 4), np.float32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="memory_size must be positive, got 0"):
        CrossBatchMemory(0, 3)


def test_state_is_fixed_shape_non_trainable_and_serialisable():
    memory = CrossBatchMemory(6, 4, name="xbm")
    assert memory.trainable_weights == []
    shapes = sorted(tuple(w.shape) for w in memory.non_trainable_weights)
    assert shapes == [(), (), (6,), (6, 4)]
    clone = CrossBatchMemory.from_config(memory.get_config())
    assert (clone.memory_size, clone.embedding_dim) == (6, 4)
    assert keras.saving.get_registered_object("xbm_tf>CrossBatchMemory") is not None


@pytest.mark.parametrize("jit", [False, True])
def test_inactive_enqueue_leaves_the_memory_unchanged(jit):
    memory = CrossBatchMemory(6, 2)
    enqueue = tf.function(memory.enqueue, jit_compile=jit)
    first = np.arange(8, dtype=np.float32).reshape(4, 2)
    enqueue(first, np.array([1, 2, 3, 4]), tf.constant(True))
    before = [np.asarray(w).copy() for w in memory.weights]
    rows = enqueue(-first, np.array([9, 9, 9, 9]), tf.constant(False))
    np.testing.assert_array_equal(np.asarray(rows), [4, 5, 0, 1])
    for old, new in zip(before, memory.weights):
        np.testing.assert_array_equal(old, np.asarray(new))
    enqueue(-first, np.array([9, 9, 9, 9]), tf.constant(True))
    _, labels, valid = (np.asarray(t) for t in memory.read())
    np.testing.assert_array_equal(labels, [9, 9, 3, 4, 9, 9])
    assert valid.all() and int(memory.pointer.numpy()) == 2
