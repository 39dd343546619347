"""make_optimizer: the step schedule and weight decay of the paper's recipe."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from xbm_tf.optimization import make_optimizer


def test_step_schedule_values():
    opt = make_optimizer("adam", 1e-3, decay_steps=[10, 20], decay_factor=0.1)
    schedule = opt._learning_rate
    got = [float(schedule(step)) for step in (0, 10, 11, 20, 21, 100)]
    np.testing.assert_allclose(got, [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5], rtol=1e-6)


def test_kinds():
    adam = make_optimizer("adam", 1e-4, weight_decay=5e-4)
    sgd = make_optimizer("sgd", 0.1, weight_decay=0.0, momentum=0.8)
    assert isinstance(adam, keras.optimizers.Adam)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == 0.8
    assert float(keras.ops.convert_to_numpy(sgd.learning_rate)) == pytest.approx(0.1)


def _step_with_zero_gradient(optimizer, values):
    """The weights after one update whose gradient is zero: decay alone."""
    weights = keras.Variable(np.asarray(values, np.float32))
    optimizer.apply([keras.ops.zeros_like(weights)], [weights])
    return keras.ops.convert_to_numpy(weights)


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_weight_decay_is_applied_decoupled(name):
    # Decoupled decay multiplies each weight by 1 - lr * weight_decay, with or
    # without a gradient (a zero gradient moves neither Adam nor SGD).
    got = _step_with_zero_gradient(
        make_optimizer(name, 0.1, weight_decay=0.5), [1.0, -2.0]
    )
    np.testing.assert_allclose(got, [0.95, -1.9], rtol=1e-6)
    # 0 disables it: the weights stay.
    got = _step_with_zero_gradient(
        make_optimizer(name, 0.1, weight_decay=0.0), [1.0, -2.0]
    )
    np.testing.assert_array_equal(got, [1.0, -2.0])


def test_weight_decay_follows_the_learning_rate_schedule():
    # Updates 0 and 1 run at rate 0.1 (factor 1 - 0.1 * 0.5), update 2, past the
    # decay step, at 0.01 (factor 1 - 0.01 * 0.5).
    optimizer = make_optimizer(
        "adam", 0.1, weight_decay=0.5, decay_steps=[1], decay_factor=0.1
    )
    weights = keras.Variable(np.asarray([1.0], np.float32))
    for _ in range(3):
        optimizer.apply([keras.ops.zeros_like(weights)], [weights])
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(weights), [0.95**2 * 0.995], rtol=1e-6
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("rmsprop")
    with pytest.raises(ValueError, match="increasing and positive, got \\[20, 10\\]"):
        make_optimizer("adam", decay_steps=[20, 10])
    with pytest.raises(ValueError, match="learning_rate must be positive, got 0"):
        make_optimizer("adam", learning_rate=0)
