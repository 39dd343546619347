from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from xbm_tf.data import MissingDatasetFileError, eval_dataset, load_tfds

# 0-based TFDS labels per split; class ids are label + 1.
_LABELS = {"train": [0, 99, 150, 7], "test": [100, 199, 5]}


def _mock_as_dataset(images):
    """Returns an `as_dataset_fn` serving chosen labels and real JPEG bytes."""

    def as_dataset(self, split, *args, **kwargs):
        key = "class_id" if self.name == "stanford_online_products" else "label"
        offset = 0 if split == "train" else len(_LABELS["train"])
        labels = _LABELS[split]
        return tf.data.Dataset.from_tensor_slices(
            {
                "image": images[offset : offset + len(labels)],
                key: tf.constant(labels, tf.int64),
            }
        )

    return as_dataset


@pytest.fixture(scope="module")
def encoded(real_images):
    out = []
    for image in real_images[:7]:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        out.append(buffer.getvalue())
    return out


@pytest.mark.parametrize(
    "name, train_classes, test_classes",
    [
        ("caltech_birds2011", [1, 100, 8, 6], [151, 101, 200]),
        ("cars196", [1, 8, 6], [100, 151, 101, 200]),
    ],
)
def test_cub_and_cars_are_resplit_by_class(name, train_classes, test_classes, encoded):
    with tfds.testing.mock_data(as_dataset_fn=_mock_as_dataset(encoded)):
        splits = load_tfds(name)
    assert splits.train.kind == "encoded"
    np.testing.assert_array_equal(splits.train.labels, train_classes)
    np.testing.assert_array_equal(splits.test.labels, test_classes)
    # Merged order is train split then test split; check the bytes follow labels.
    merged = _LABELS["train"] + _LABELS["test"]
    for image, label in zip(splits.test.images, splits.test.labels):
        assert image == encoded[merged.index(label - 1)]


def test_sop_keeps_its_split(encoded):
    with tfds.testing.mock_data(as_dataset_fn=_mock_as_dataset(encoded)):
        splits = load_tfds("stanford_online_products")
    np.testing.assert_array_equal(splits.train.labels, [1, 100, 151, 8])
    np.testing.assert_array_equal(splits.test.labels, [101, 200, 6])
    assert splits.test.images[2] == encoded[6]


@pytest.mark.parametrize("name", ["caltech_birds2011", "cars196"])
def test_random_mock_through_real_features(name):
    # The default mock builds examples from the builders' real feature specs.
    # The mock's random examples depend on the selected features: select the same.
    decoders = tfds.decode.PartialDecoding(
        {"image": True, "label": True},
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    with tfds.testing.mock_data(num_examples=6):
        splits = load_tfds(name)
        expected = sorted(
            int(ex["label"]) + 1
            for split in ("train", "test")
            for ex in tfds.load(
                name, split=split, decoders=decoders
            ).as_numpy_iterator()
        )
    limit = 100 if name == "caltech_birds2011" else 98
    assert sorted(splits.train.labels.tolist() + splits.test.labels.tolist()) == (
        expected
    )
    assert (splits.train.labels <= limit).all() and (splits.test.labels > limit).all()
    images, labels = next(
        iter(eval_dataset(splits.train, batch_size=3, resize_size=8, crop_size=8))
    )
    assert images.shape[1:] == (8, 8, 3)


def test_unprepared_builder_is_reported(tmp_path):
    with pytest.raises(MissingDatasetFileError, match=r"'cars196' is not prepared"):
        load_tfds("cars196", data_dir=str(tmp_path))


def test_unknown_name():
    with pytest.raises(ValueError, match="must be one of"):
        load_tfds("mnist")
