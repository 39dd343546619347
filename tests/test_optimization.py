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


def test_kinds_and_weight_decay():
    adam = make_optimizer("adam", 1e-4, weight_decay=5e-4)
    sgd = make_optimizer("sgd", 0.1, weight_decay=0.0, momentum=0.8)
    assert isinstance(adam, keras.optimizers.Adam) and adam.weight_decay == 5e-4
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.weight_decay is None
    assert sgd.momentum == 0.8
    assert float(keras.ops.convert_to_numpy(sgd.learning_rate)) == pytest.approx(0.1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer("rmsprop")
    with pytest.raises(ValueError, match="increasing and positive, got \\[20, 10\\]"):
        make_optimizer("adam", decay_steps=[20, 10])
    with pytest.raises(ValueError, match="learning_rate must be positive, got 0"):
        make_optimizer("adam", learning_rate=0)
