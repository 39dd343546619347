"""train_dataset(start_step=s) continues the stream from step s, exactly."""

from __future__ import annotations

import numpy as np
import pytest

from xbm_tf.data import PKSampler, load_quickstart, train_dataset


@pytest.fixture(scope="module")
def small_set():
    """60 real 28x28 grayscale images of 10 classes (6 each)."""
    return load_quickstart(max_per_class=6).train


def _stream(image_set, implementation, **kwargs):
    ds = train_dataset(
        image_set,
        p=3,
        k=2,
        resize_size=32,
        crop_size=28,
        seed=5,
        implementation=implementation,
        **kwargs,
    )
    return [(x.numpy(), y.numpy()) for x, y in ds]


def test_tf_image_stream_from_a_step_is_the_tail_of_the_whole_stream(small_set):
    whole = _stream(small_set, "tf_image", num_steps=6)
    tail = _stream(small_set, "tf_image", start_step=4, num_steps=2)
    assert len(whole) == 6 and len(tail) == 2
    for (x, y), (x_want, y_want) in zip(tail, whole[4:]):
        np.testing.assert_array_equal(y, y_want)
        np.testing.assert_array_equal(x, x_want)  # the same crops and flips
    sampler = PKSampler(small_set.labels, p=3, k=2, seed=5)
    for step, (_, y) in enumerate(whole):
        np.testing.assert_array_equal(y, small_set.labels[sampler.batch(step)])
    assert not np.array_equal(whole[4][0], whole[5][0])


def test_keras_cv_resumes_the_indices_but_not_the_crops(small_set):
    whole = _stream(small_set, "keras_cv", num_steps=3)
    tail = _stream(small_set, "keras_cv", start_step=2, num_steps=1)
    np.testing.assert_array_equal(tail[0][1], whole[2][1])  # same P x K labels
    # keras-cv's random state is its own: the crops of step 2 differ.
    assert not np.allclose(tail[0][0], whole[2][0])


def test_bad_steps_are_named(small_set):
    with pytest.raises(ValueError, match="start_step must be >= 0, got -2"):
        train_dataset(small_set, p=2, k=2, start_step=-2)
    with pytest.raises(ValueError, match="num_steps must be >= 0 or None, got -1"):
        train_dataset(small_set, p=2, k=2, num_steps=-1)
