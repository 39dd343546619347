from __future__ import annotations

import itertools

import numpy as np
import pytest

from xbm_tf.data import PKSampler

# 6 classes with 1, 2, 5, 5, 8 and 3 images; labels not contiguous, not sorted.
_LABELS = np.array(
    [40] + [7] * 2 + [3] * 5 + [12] * 5 + [99] * 8 + [5] * 3, dtype=np.int64
)[np.random.default_rng(0).permutation(24)]


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("p, k", [(4, 3), (6, 2), (2, 8)])
def test_batches_have_p_classes_with_k_images_each(p, k):
    sampler = PKSampler(_LABELS, p=p, k=k, seed=3)
    for batch in _take(sampler, 50):
        assert batch.shape == (p * k,) and batch.dtype == np.int64
        groups = _LABELS[batch].reshape(p, k)
        assert (groups == groups[:, :1]).all()  # k consecutive of one class
        assert len(set(groups[:, 0])) == p  # p distinct classes
        for indices in batch.reshape(p, k):
            n = int((_LABELS == _LABELS[indices[0]]).sum())
            if n >= k:  # without replacement
                assert len(set(indices)) == k
            else:  # all n images, the rest repeats
                assert len(set(indices)) == n


def test_deterministic_for_a_seed_and_restartable():
    first = _take(PKSampler(_LABELS, p=3, k=4, seed=11), 20)
    again = _take(PKSampler(_LABELS, p=3, k=4, seed=11), 20)
    other = _take(PKSampler(_LABELS, p=3, k=4, seed=12), 20)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    sampler = PKSampler(_LABELS, p=3, k=4, seed=11)
    _take(sampler, 5)
    np.testing.assert_array_equal(_take(sampler, 20), first)  # iter() restarts


def test_classes_are_drawn_uniformly():
    counts = np.zeros(100, np.int64)
    for batch in _take(PKSampler(_LABELS, p=2, k=1, seed=0), 3000):
        np.add.at(counts, _LABELS[batch], 1)
    used = counts[np.unique(_LABELS)]
    # 6000 draws over 6 classes: 1000 each, whatever the class size.
    assert np.abs(used - 1000).max() < 100


def test_errors_name_the_numbers():
    with pytest.raises(ValueError, match=r"p=7 classes per batch.* only 6 classes"):
        PKSampler(_LABELS, p=7, k=2)
    with pytest.raises(ValueError, match="p and k must be >= 1, got p=2, k=0"):
        PKSampler(_LABELS, p=2, k=0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        PKSampler(np.array([], np.int64), p=1, k=1)


def test_batch_of_a_step_depends_on_seed_and_step_only():
    sampler = PKSampler(_LABELS, p=3, k=4, seed=11)
    stream = _take(sampler, 12)
    for step in (0, 5, 11):  # any order, any number of times
        np.testing.assert_array_equal(sampler.batch(step), stream[step])
    # A stream started at step 7 is the tail of the stream from 0.
    np.testing.assert_array_equal(_take(sampler.iter_from(7), 5), stream[7:])
    other = PKSampler(_LABELS.copy(), p=3, k=4, seed=11)
    np.testing.assert_array_equal(other.batch(9), stream[9])
    assert not np.array_equal(sampler.batch(3), sampler.batch(4))
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        sampler.batch(-1)
    with pytest.raises(ValueError, match="seed must be >= 0, got -3"):
        PKSampler(_LABELS, p=2, k=2, seed=-3)
