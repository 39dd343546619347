from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from xbm_tf.data import (
    ImageSet,
    drop_corrupt_images,
    eval_dataset,
    find_corrupt_images,
    load_quickstart,
    train_dataset,
)


@pytest.fixture(scope="module")
def small_set():
    """60 real 28x28 grayscale images of 10 classes (6 each)."""
    return load_quickstart(max_per_class=6).train


def _batches(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


@pytest.mark.parametrize("implementation", ["tf_image", "keras_cv"])
def test_train_batches_are_pk_aligned_and_deterministic(small_set, implementation):
    def make(seed):
        # Full-image crops at native size: every output is a source image or its
        # mirror, which lets us check that images stay with their labels.
        return train_dataset(
            small_set,
            p=4,
            k=3,
            resize_size=28,
            crop_size=28,
            scale=(1.0, 1.0),
            ratio=(1.0, 1.0),
            seed=seed,
            implementation=implementation,
        )

    batches = _batches(make(7), 8)  # 96 images: more than the set has (infinite)
    sources = small_set.images.astype(np.float32)
    for images, labels in batches:
        assert images.shape == (12, 28, 28, 1) and images.dtype == np.float32
        groups = labels.reshape(4, 3)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == 4
        for image, label in zip(images, labels):
            candidates = sources[small_set.labels == label]
            match = (candidates == image).all(axis=(1, 2, 3)) | (
                candidates[:, :, ::-1] == image
            ).all(axis=(1, 2, 3))
            assert match.any()
    again = _batches(make(7), 8)
    for (x1, y1), (x2, y2) in zip(batches, again):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    other = _batches(make(8), 2)
    assert not np.array_equal(batches[0][1], other[0][1])


def test_train_channels_and_augmented_size(small_set):
    ds = train_dataset(
        small_set,
        p=2,
        k=2,
        resize_size=32,
        crop_size=24,
        channels=3,
        seed=0,
        implementation="tf_image",
    )
    images, labels = next(iter(ds))
    assert images.shape == (4, 24, 24, 3) and labels.dtype == tf.int64
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    assert 0.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255


def test_eval_is_ordered_complete_and_exact(small_set):
    batches = list(eval_dataset(small_set, batch_size=16, resize_size=28, crop_size=28))
    assert [int(y.shape[0]) for _, y in batches] == [16, 16, 16, 12]
    images = np.concatenate([x.numpy() for x, _ in batches])
    labels = np.concatenate([y.numpy() for _, y in batches])
    np.testing.assert_array_equal(labels, small_set.labels)
    np.testing.assert_array_equal(images, small_set.images.astype(np.float32))


def _native_28(real_images):
    """The real images whose shorter side is 28 (so resize_size=28 is a no-op)."""
    return [x for x in real_images if min(x.shape[:2]) == 28][:6]


@pytest.fixture
def png_set(tmp_path, real_images):
    paths = []
    for i, image in enumerate(_native_28(real_images)):
        path = str(tmp_path / f"class{i % 3}" / f"{i}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(path)
    return ImageSet(paths, np.array([0, 1, 2, 0, 1, 2]), "png")


def test_files_and_encoded_bytes_decode_exactly(png_set, real_images):
    encoded = np.empty(len(png_set), object)
    encoded[:] = [open(p, "rb").read() for p in png_set.images]
    for image_set in (png_set, ImageSet(encoded, png_set.labels)):
        ds = eval_dataset(image_set, batch_size=6, resize_size=28, crop_size=28)
        images, labels = next(iter(ds))
        for out, source in zip(images.numpy(), _native_28(real_images)):
            h, w = source.shape[:2]
            top, left = (h - 28) // 2, (w - 28) // 2
            np.testing.assert_array_equal(out, source[top : top + 28, left : left + 28])
    train = train_dataset(png_set, p=3, k=2, resize_size=40, crop_size=32, seed=1)
    images, labels = next(iter(train))
    assert images.shape == (6, 32, 32, 3)
    assert sorted(labels.numpy().tolist()) == [0, 0, 1, 1, 2, 2]


def test_corrupt_images_are_found_counted_and_dropped(tmp_path, real_images):
    def jpeg(name, image):
        path = str(tmp_path / name)
        Image.fromarray(image).save(path, format="JPEG", quality=90)
        return path

    good = [jpeg(f"good{i}.jpg", real_images[i]) for i in range(4)]
    truncated = jpeg("truncated.jpg", real_images[4])
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    with pytest.raises(tf.errors.InvalidArgumentError):  # why we check beforehand
        tf.io.decode_image(tf.io.read_file(truncated))
    empty = str(tmp_path / "empty.jpg")
    open(empty, "wb").close()
    text = str(tmp_path / "notes.jpg")
    open(text, "w").write("not an image")
    garbage = str(tmp_path / "garbage.jpg")
    noise = np.random.default_rng(0).bytes(300)
    open(garbage, "wb").write(b"\xff\xd8\xff" + noise + b"\xff\xd9")
    missing = str(tmp_path / "missing.jpg")
    paths = [good[0], truncated, good[1], empty, text, garbage, missing] + good[2:]
    image_set = ImageSet(paths, np.array([0, 0, 1, 1, 2, 2, 3, 3, 0]), "mixed")

    cheap = find_corrupt_images(image_set)
    assert list(cheap) == [1, 3, 4, 6]
    assert cheap[1] == "truncated JPEG (no end-of-image marker)"
    assert cheap[3] == "empty file" and cheap[6].startswith("unreadable")
    full = find_corrupt_images(image_set, decode=True)
    assert list(full) == [1, 3, 4, 5, 6] and full[5] == "cannot be decoded"

    clean, skipped = drop_corrupt_images(image_set, decode=True)
    assert len(skipped) == 5 and set(skipped) == {
        truncated,
        empty,
        text,
        garbage,
        missing,
    }
    assert clean.images == good and clean.labels.tolist() == [0, 1, 3, 0]
    images, _ = next(iter(train_dataset(clean, p=3, k=2, resize_size=32, crop_size=28)))
    assert images.shape == (6, 28, 28, 3)


def test_arguments_are_checked_before_any_work(small_set):
    with pytest.raises(ValueError, match=r"p=11 classes per batch.* only 10 classes"):
        train_dataset(small_set, p=11, k=2)
    with pytest.raises(ValueError, match="channels must be None, 1 or 3"):
        eval_dataset(small_set, batch_size=4, resize_size=28, crop_size=28, channels=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        eval_dataset(small_set, batch_size=0)
    with pytest.raises(ValueError, match="resize_size=28, crop_size=32"):
        eval_dataset(small_set, batch_size=4, resize_size=28, crop_size=32)


@pytest.mark.parametrize("implementation", ["tf_image", "keras_cv"])
def test_flip_false_never_mirrors(small_set, implementation):
    def images(flip):
        ds = train_dataset(
            small_set,
            p=5,
            k=4,
            resize_size=28,
            crop_size=28,
            scale=(1.0, 1.0),
            ratio=(1.0, 1.0),
            seed=3,
            flip=flip,
            implementation=implementation,
        )
        return [(x.numpy(), y.numpy()) for x, y in ds.take(3)]

    sources = small_set.images.astype(np.float32)

    def is_source(image, label):
        return (sources[small_set.labels == label] == image).all(axis=(1, 2, 3)).any()

    unflipped = [is_source(x, y) for b in images(False) for x, y in zip(*b)]
    assert all(unflipped)
    flipped = [is_source(x, y) for b in images(True) for x, y in zip(*b)]
    assert not all(flipped)  # with flips, some outputs are mirror images
