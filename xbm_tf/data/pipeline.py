"""tf.data input pipelines: infinite P x K training batches and ordered evaluation.

Both yield `(images, labels)`: images float32 `(B, crop_size, crop_size, C)`
with values in [0, 255] (backbone preprocessing belongs to the model), labels
int64 `(B,)` holding the `ImageSet`'s class ids unchanged.

Channels: files and encoded images are decoded to `channels` (3 if None);
in-memory arrays keep their channels unless `channels` is given (1 -> 3
repeats the grey channel, 3 -> 1 converts to luminance).

Corrupt images: `find_corrupt_images` / `drop_corrupt_images` check every image
before training (by default cheaply: format signature and end marker, which is
how a truncated JPEG or PNG fails; with `decode=True` by decoding it) so that
they are skipped, counted and reported instead of stopping training midway.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import tensorflow as tf

from xbm_tf.data.augment import TrainAugmentation, eval_transform
from xbm_tf.data.sampling import PKSampler
from xbm_tf.data.splits import ImageSet

_TAIL_BYTES = 1024


def _check_channels(channels: int | None) -> None:
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be None, 1 or 3, got {channels!r}.")


def _loader(image_set: ImageSet, channels: int | None):
    """Returns `index -> uint8 image (H, W, C)` for a graph-mode map function."""
    _check_channels(channels)
    kind = image_set.kind
    if kind == "array":
        images = tf.constant(image_set.images)
        source_channels = image_set.images.shape[-1]
        target = channels or source_channels

        def load(index):
            image = tf.gather(images, index)
            if target == source_channels:
                return image
            if target == 3:
                return tf.image.grayscale_to_rgb(image)
            return tf.image.rgb_to_grayscale(image)

        return load

    if kind == "paths":
        paths = tf.constant(image_set.images)

        def read(index):
            return tf.io.read_file(tf.gather(paths, index))

    else:
        encoded = image_set.images

        def lookup(index):
            return encoded[int(index)]

        def read(index):
            data = tf.numpy_function(lookup, [index], tf.string, stateful=False)
            return tf.ensure_shape(data, [])

    def load(index):
        return tf.io.decode_image(
            read(index), channels=channels or 3, expand_animations=False
        )

    return load


def train_dataset(
    image_set: ImageSet,
    *,
    p: int,
    k: int,
    resize_size: int = 256,
    crop_size: int = 224,
    seed: int = 0,
    channels: int | None = None,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    implementation: str = "keras_cv",
    num_parallel_calls: int = tf.data.AUTOTUNE,
    start_step: int = 0,
    num_steps: int | None = None,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """An infinite dataset of augmented P x K batches, deterministic for a seed.

    The stream is a function of `(seed, step)`: step `s` holds the indices
    `PKSampler(...).batch(s)` (drawn with stateless TensorFlow ops), and with
    `implementation="tf_image"` the image in row `r` of step `s` is augmented
    with the stateless seed
    `(seed, s * p * k + r)`. So `start_step=s` yields exactly what the stream
    from step 0 yields from its `s`-th batch on: a resumed run continues with the
    batches it would have seen. The `"keras_cv"` layers keep a random state of
    their own (sequential map, order-dependent): with them the indices still
    resume exactly, the crops and flips do not.

    With `input_context` (from `strategy.distribute_datasets_from_function`),
    this is the dataset of one input pipeline (worker): every worker draws the
    same global P x K indices, keeps the contiguous block of rows of its own
    replicas and decodes and augments only those, batched per replica
    (`global // num_replicas_in_sync` rows, a multiple of `k`: each replica holds
    whole classes). Replica `i` gets rows `[i * b, (i + 1) * b)` of the global
    batch, as `experimental_distribute_dataset` would split it.

    Use with `model.fit(..., steps_per_epoch=N)`. Each new iterator restarts at
    `start_step`.

    Args:
        image_set: the training images.
        p: classes per (global) batch (at most the number of classes).
        k: images per class.
        resize_size: the shorter side before the random crop (256).
        crop_size: the output side (224).
        seed: seeds both the sampler and the augmentation (>= 0).
        channels: output channels (see the module docstring).
        scale: the area range of the random resized crop.
        ratio: the aspect-ratio range of the random resized crop.
        flip: random horizontal flips (the paper's; off for digits and text).
        implementation: `"keras_cv"` or `"tf_image"` (see `TrainAugmentation`).
        num_parallel_calls: parallelism of the parallel maps.
        start_step: the first step of the stream (>= 0).
        num_steps: stop after this many steps (default: never).
        input_context: a `tf.distribute.InputContext`: yield only this input
            pipeline's rows, in per-replica batches.

    Returns:
        `tf.data.Dataset` of `(images, labels)`: float32
        `(b, crop_size, crop_size, C)` in [0, 255] and int64 `(b,)` with
        `b = p * k` (or the per-replica share with `input_context`), grouped by
        class (`k` consecutive images per class).

    Raises:
        ValueError: `p` exceeds the number of classes, a bad size/channels/step,
            or a per-replica share that is not a multiple of `k`.

    Example:

    >>> from xbm_tf.data import load_quickstart
    >>> ds = train_dataset(load_quickstart(max_per_class=20).train, p=4, k=2,
    ...                    resize_size=32, crop_size=28)
    >>> images, labels = next(iter(ds))
    >>> images.shape, labels.shape
    (TensorShape([8, 28, 28, 1]), TensorShape([8]))
    """
    sampler = PKSampler(image_set.labels, p, k, seed)
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}.")
    if num_steps is not None and num_steps < 0:
        raise ValueError(f"num_steps must be >= 0 or None, got {num_steps}.")
    augment = TrainAugmentation(
        resize_size=resize_size,
        crop_size=crop_size,
        scale=scale,
        ratio=ratio,
        flip=flip,
        seed=seed,
        implementation=implementation,
    )
    load = _loader(image_set, channels)
    labels = tf.constant(image_set.labels)
    global_batch = sampler.batch_size
    first_row, rows, replica_batch = _input_rows(global_batch, k, input_context)

    def step_rows(step):
        indices = sampler.tf_batch(step)[first_row : first_row + rows]
        row = tf.range(first_row, first_row + rows, dtype=tf.int64)
        return row + step * global_batch, indices

    def decode(position, index):
        element_seed = tf.stack([tf.constant(seed, tf.int64), position])
        return load(index), tf.gather(labels, index), element_seed

    if num_steps is None:
        steps = tf.data.Dataset.counter(start_step)
    else:
        steps = tf.data.Dataset.range(start_step, start_step + num_steps)
    ds = steps.map(step_rows).unbatch()
    ds = ds.map(decode, num_parallel_calls=num_parallel_calls)
    ds = ds.map(
        lambda image, label, element_seed: (augment(image, element_seed), label),
        num_parallel_calls=num_parallel_calls if augment.parallel_safe else None,
    )
    return ds.batch(replica_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def _input_rows(
    global_batch: int, k: int, input_context: tf.distribute.InputContext | None
) -> tuple[int, int, int]:
    """`(first_row, rows, replica_batch)` of an input pipeline's share."""
    if input_context is None:
        return 0, global_batch, global_batch
    replicas = input_context.num_replicas_in_sync
    pipelines = input_context.num_input_pipelines
    if global_batch % replicas or (global_batch // replicas) % k:
        raise ValueError(
            f"The global batch p * k = {global_batch} must split into "
            f"{replicas} replicas of whole classes: each replica's share must be a "
            f"multiple of k={k} (p divisible by {replicas})."
        )
    if replicas % pipelines:
        raise ValueError(
            f"{replicas} replicas do not split evenly over {pipelines} input pipelines."
        )
    replica_batch = global_batch // replicas
    rows = replica_batch * (replicas // pipelines)
    return input_context.input_pipeline_id * rows, rows, replica_batch


def eval_dataset(
    image_set: ImageSet,
    *,
    batch_size: int,
    resize_size: int = 256,
    crop_size: int = 224,
    channels: int | None = None,
    num_parallel_calls: int = tf.data.AUTOTUNE,
) -> tf.data.Dataset:
    """A finite dataset of every image once, in order, with the test transform.

    Args:
        image_set: the images to embed.
        batch_size: images per batch (the last batch may be smaller).
        resize_size: the shorter side before the centre crop (256).
        crop_size: the side of the centre crop (224).
        channels: output channels (see the module docstring).
        num_parallel_calls: parallelism of the decoding map.

    Returns:
        `tf.data.Dataset` of `(images, labels)`: float32
        `(B, crop_size, crop_size, C)` in [0, 255] and int64 `(B,)`, in the order
        of `image_set`.

    Example:

    >>> from xbm_tf.data import load_quickstart
    >>> test = load_quickstart(max_per_class=20).test
    >>> sum(int(y.shape[0]) for _, y in eval_dataset(test, batch_size=64,
    ...     resize_size=28, crop_size=28))
    200
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if crop_size < 1 or resize_size < crop_size:
        raise ValueError(
            "Need 1 <= crop_size <= resize_size, got "
            f"resize_size={resize_size}, crop_size={crop_size}."
        )
    load = _loader(image_set, channels)
    labels = tf.constant(image_set.labels)

    def transform(index):
        image = eval_transform(
            load(index), resize_size=resize_size, crop_size=crop_size
        )
        return image, tf.gather(labels, index)

    ds = tf.data.Dataset.range(len(image_set))
    ds = ds.map(transform, num_parallel_calls=num_parallel_calls, deterministic=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _format_problem(head: bytes, tail: bytes, size: int) -> str | None:
    """Returns why bytes are not a complete JPEG/PNG/GIF/BMP/WebP, else None."""
    if size == 0:
        return "empty file"
    if head.startswith(b"\xff\xd8\xff"):
        if b"\xff\xd9" in tail:
            return None
        return "truncated JPEG (no end-of-image marker)"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        ok = tail.rstrip(b"\x00").endswith(b";")
        return None if ok else "truncated GIF (no trailer)"
    if head.startswith(b"BM") and len(head) >= 6:
        declared = int.from_bytes(head[2:6], "little")
        return None if size >= declared else "truncated BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        declared = int.from_bytes(head[4:8], "little") + 8
        return None if size >= declared else "truncated WebP"
    return "not a JPEG, PNG, GIF, BMP or WebP image"


def _file_problem(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return _format_problem(head, tail, size)


def find_corrupt_images(image_set: ImageSet, *, decode: bool = False) -> dict[int, str]:
    """Finds images that cannot be decoded, before training.

    The default check is cheap (two small reads per file): the file must exist,
    start with a JPEG, PNG, GIF, BMP or WebP signature and, for JPEG and PNG,
    have its end marker in its last kilobyte, which catches truncated files.
    With `decode=True`, the images passing that check are also fully decoded
    with TensorFlow (slower: about the cost of one epoch of decoding).
    In-memory arrays are never corrupt.

    Args:
        image_set: the images to check.
        decode: also decode every image.

    Returns:
        `{index: reason}` for each corrupt image, in index order.

    Example:

    >>> find_corrupt_images(ImageSet(["/nonexistent.jpg"], np.array([1])))
    {0: 'unreadable (No such file or directory)'}
    """
    if image_set.kind == "array":
        return {}
    problems = {}
    if image_set.kind == "paths":
        for i, path in enumerate(image_set.images):
            problem = _file_problem(path)
            if problem is not None:
                problems[i] = problem
    else:
        for i, data in enumerate(image_set.images):
            data = bytes(data)
            problem = _format_problem(data[:16], data[-_TAIL_BYTES:], len(data))
            if problem is not None:
                problems[i] = problem
    if decode:
        candidates = np.setdiff1d(
            np.arange(len(image_set)), np.fromiter(problems, np.int64)
        )
        load = _loader(image_set, channels=3)
        ds = tf.data.Dataset.from_tensor_slices(candidates)
        ds = ds.map(
            lambda i: (i, tf.shape(load(i))), num_parallel_calls=tf.data.AUTOTUNE
        )
        decoded = {int(i) for i, _ in ds.ignore_errors().as_numpy_iterator()}
        for i in candidates:
            if int(i) not in decoded:
                problems[int(i)] = "cannot be decoded"
    return dict(sorted(problems.items()))


def drop_corrupt_images(
    image_set: ImageSet, *, decode: bool = False
) -> tuple[ImageSet, dict[str, str]]:
    """Removes corrupt images (see `find_corrupt_images`) and reports them.

    Args:
        image_set: the images to check.
        decode: also decode every image.

    Returns:
        `(clean_set, skipped)`: the `ImageSet` without the corrupt images, and
        `{name: reason}` for each skipped image (its path, or `"#<index>"` for
        in-memory images). `len(skipped)` is the count to report.

    Example:

    ```python
    clean, skipped = drop_corrupt_images(train_set)
    print(f"skipped {len(skipped)} corrupt images: {list(skipped)[:5]}")
    ```
    """
    problems = find_corrupt_images(image_set, decode=decode)
    if not problems:
        return image_set, {}
    keep = np.ones(len(image_set), bool)
    keep[list(problems)] = False
    if image_set.kind == "paths":
        skipped = {image_set.images[i]: why for i, why in problems.items()}
    else:
        skipped = {f"#{i}": why for i, why in problems.items()}
    logging.getLogger(__name__).warning(
        "%s: skipping %d corrupt images, e.g. %s",
        image_set.name,
        len(skipped),
        list(skipped.items())[:5],
    )
    return image_set.subset(keep), skipped
