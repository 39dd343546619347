"""CUB, Cars196 and SOP from prepared TensorFlow Datasets builders.

TFDS splits CUB and Cars196 by image (its train/test is the classification
split), so both TFDS splits are merged and re-split by class as in the
metric-learning protocol; SOP keeps its own train/test split, which already
separates products. TFDS labels are 0-based: the class id used here is
`label + 1`, equal to the id in the original annotation files (and to the
labels returned by `load_cub`, `load_cars196` and `load_sop`).

Images are kept as encoded JPEG bytes in memory (`ImageSet.kind == "encoded"`)
and decoded lazily by the input pipeline: about 1.1 GB for CUB, 1.9 GB for
Cars196 and 3 GB for SOP.
"""

from __future__ import annotations

import numpy as np

from xbm_tf.data import layout
from xbm_tf.data.splits import ImageSet, RetrievalSplits

# name -> (label feature, number of training classes when re-split by class
# or None to keep the TFDS train/test split, short name)
_BUILDERS = {
    "caltech_birds2011": ("label", 100, "cub"),
    "cars196": ("label", 98, "cars196"),
    "stanford_online_products": ("class_id", None, "sop"),
}
TFDS_NAMES = tuple(_BUILDERS)


def _read_split(dataset) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    images, labels = [], []
    for example in tfds.as_numpy(dataset):
        images.append(example["image"])
        labels.append(example["label"])
    encoded = np.empty(len(images), dtype=object)
    encoded[:] = images
    return encoded, np.asarray(labels, np.int64)


def load_tfds(
    name: str, *, data_dir: str | None = None, download: bool = False
) -> RetrievalSplits:
    """Loads a TFDS builder with the metric-learning protocol split.

    Args:
        name: `"caltech_birds2011"` (classes 1-100 train, 101-200 test),
            `"cars196"` (classes 1-98 train, 99-196 test) or
            `"stanford_online_products"` (its own train/test split).
        data_dir: the TFDS data directory; None for the TFDS default
            (`~/tensorflow_datasets`).
        download: let TFDS download and prepare the data if missing. False by
            default: nothing is fetched from the network.

    Returns:
        `RetrievalSplits` with `train` and `test` `ImageSet`s of encoded images;
        labels are the 1-based class ids (`label + 1`).

    Raises:
        ValueError: `name` is not one of `TFDS_NAMES`.
        MissingDatasetFileError: the builder is not prepared in `data_dir` and
            `download` is False.

    Example:

    ```python
    splits = load_tfds("caltech_birds2011")
    len(splits.train), len(splits.test)  # (5864, 5924)
    ```
    """
    if name not in _BUILDERS:
        raise ValueError(f"name must be one of {TFDS_NAMES}, got {name!r}.")
    import tensorflow_datasets as tfds

    label_key, num_train_classes, short = _BUILDERS[name]
    decoders = tfds.decode.PartialDecoding(
        {"image": True, label_key: True},
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    try:
        datasets = tfds.load(
            name,
            split=["train", "test"],
            data_dir=data_dir,
            download=download,
            decoders=decoders,
            shuffle_files=False,
        )
    except AssertionError as e:  # TFDS signals an unprepared builder this way.
        raise layout.MissingDatasetFileError(
            f"TFDS builder {name!r} is not prepared in data_dir={data_dir!r} "
            f"({e}). Prepare it with `tfds build {name}` (or pass download=True), "
            "or use the loader for the extracted files."
        ) from e
    datasets = [
        ds.map(lambda ex: {"image": ex["image"], "label": ex[label_key]})
        for ds in datasets
    ]
    (train_images, train_labels), (test_images, test_labels) = map(
        _read_split, datasets
    )
    train_labels, test_labels = train_labels + 1, test_labels + 1
    if num_train_classes is None:
        train = ImageSet(train_images, train_labels, f"{short}/train")
        test = ImageSet(test_images, test_labels, f"{short}/test")
    else:
        merged = ImageSet(
            np.concatenate([train_images, test_images]),
            np.concatenate([train_labels, test_labels]),
            short,
        )
        is_train = merged.labels <= num_train_classes
        train = merged.subset(is_train, f"{short}/train")
        test = merged.subset(~is_train, f"{short}/test")
    return RetrievalSplits(train=train, test=test, name=short)
