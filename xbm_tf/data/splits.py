"""Containers for metric-learning datasets: `ImageSet` and `RetrievalSplits`."""

from __future__ import annotations

import dataclasses

import numpy as np

_KINDS = ("paths", "array", "encoded")


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSet:
    """Images and their class ids, one entry per image.

    `images` is one of three kinds (see `kind`):

    * `"paths"`: a list of absolute file paths (JPEG, PNG, GIF or BMP),
      decoded lazily by the input pipeline.
    * `"array"`: a uint8 array `(N, H, W, C)` of decoded images, `C` in {1, 3}.
    * `"encoded"`: a 1-D object array of encoded image bytes (JPEG/PNG), decoded
      lazily by the input pipeline (used by `load_tfds`).

    Labels are the dataset's own class ids (int64), kept as given: they need not
    be contiguous. Use `remap_labels` for ids in `0..C-1`.

    Args:
        images: the images, as described above.
        labels: int array `(N,)` of class ids.
        name: a short description, e.g. `"cub/train"`.

    Example:

    >>> s = ImageSet(np.zeros((2, 4, 4, 1), np.uint8), np.array([3, 7]), "toy")
    >>> s.kind, len(s), s.num_classes
    ('array', 2, 2)
    """

    images: list[str] | np.ndarray
    labels: np.ndarray
    name: str = ""

    def __post_init__(self):
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"ImageSet {self.name!r}: labels must be a 1-D integer array, got "
                f"dtype {labels.dtype} and shape {labels.shape}."
            )
        object.__setattr__(self, "labels", labels.astype(np.int64))
        images = self.images
        if isinstance(images, np.ndarray):
            if images.dtype == np.uint8:
                if images.ndim != 4 or images.shape[-1] not in (1, 3):
                    raise ValueError(
                        f"ImageSet {self.name!r}: a uint8 image array must have "
                        f"shape (N, H, W, C) with C in (1, 3), got {images.shape}."
                    )
            elif images.dtype != object or images.ndim != 1:
                raise ValueError(
                    f"ImageSet {self.name!r}: images must be a uint8 array "
                    "(N, H, W, C), a 1-D object array of encoded bytes or a list "
                    f"of paths, got an array of dtype {images.dtype} and shape "
                    f"{images.shape}."
                )
        elif isinstance(images, (list, tuple)):
            object.__setattr__(self, "images", [str(p) for p in images])
        else:
            raise ValueError(
                f"ImageSet {self.name!r}: images must be a list of paths or a numpy "
                f"array, got {type(images).__name__}."
            )
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"ImageSet {self.name!r}: {len(self.images)} images but "
                f"{len(self.labels)} labels."
            )

    @property
    def kind(self) -> str:
        """`"paths"`, `"array"` or `"encoded"`."""
        if isinstance(self.images, list):
            return "paths"
        return "array" if self.images.dtype == np.uint8 else "encoded"

    @property
    def classes(self) -> np.ndarray:
        """The sorted distinct class ids."""
        return np.unique(self.labels)

    @property
    def num_classes(self) -> int:
        """The number of distinct class ids."""
        return int(len(self.classes))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices, name: str | None = None) -> ImageSet:
        """Returns the images at `indices` (ints or a boolean mask), in order."""
        indices = np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        indices = indices.astype(np.int64)
        if self.kind == "paths":
            images = [self.images[i] for i in indices]
        else:
            images = self.images[indices]
        return ImageSet(
            images, self.labels[indices], self.name if name is None else name
        )

    def select_classes(self, classes, name: str | None = None) -> ImageSet:
        """Returns the images whose label is in `classes`, in their original order."""
        return self.subset(np.isin(self.labels, np.asarray(classes)), name)

    def describe(self) -> str:
        """A one-line summary, e.g. `"cub/train: 5864 images, 100 classes"`."""
        return f"{self.name}: {len(self)} images, {self.num_classes} classes"


@dataclasses.dataclass(frozen=True, eq=False)
class RetrievalSplits:
    """A metric-learning protocol: training classes and unseen test classes.

    Exactly one evaluation protocol is set:

    * leave-one-out (CUB, Cars196, SOP, quickstart): `test` is set; every test
      image queries all the other test images.
    * query/gallery (In-Shop): `query` and `gallery` are set.

    Args:
        train: the training images.
        test: the test images for the leave-one-out protocol, or None.
        query: the query images for the query/gallery protocol, or None.
        gallery: the gallery images for the query/gallery protocol, or None.
        name: the dataset name, e.g. `"cub"`.
    """

    train: ImageSet
    test: ImageSet | None = None
    query: ImageSet | None = None
    gallery: ImageSet | None = None
    name: str = ""

    def __post_init__(self):
        query_gallery = (self.query is not None, self.gallery is not None)
        if self.test is not None and any(query_gallery):
            raise ValueError(
                f"RetrievalSplits {self.name!r}: set either test or query/gallery, "
                "not both."
            )
        if self.test is None and not all(query_gallery):
            raise ValueError(
                f"RetrievalSplits {self.name!r}: needs test, or both query and gallery."
            )

    @property
    def protocol(self) -> str:
        """`"leave_one_out"` or `"query_gallery"`."""
        return "leave_one_out" if self.test is not None else "query_gallery"

    @property
    def num_train_classes(self) -> int:
        """The number of distinct classes in the training split."""
        return self.train.num_classes

    def describe(self) -> str:
        """A multi-line summary of every split."""
        parts = [self.train, self.test, self.query, self.gallery]
        return "\n".join(s.describe() for s in parts if s is not None)


def remap_labels(labels) -> tuple[np.ndarray, np.ndarray]:
    """Maps class ids to contiguous ids `0..C-1` in sorted order.

    Args:
        labels: int array `(N,)` of class ids.

    Returns:
        `(new_labels, classes)`: int64 `(N,)` with `classes[new_labels] == labels`,
        and the sorted distinct class ids `(C,)`.

    Example:

    >>> remap_labels(np.array([7, 3, 7]))
    (array([1, 0, 1]), array([3, 7]))
    """
    classes, inverse = np.unique(np.asarray(labels), return_inverse=True)
    return inverse.astype(np.int64).reshape(-1), classes
