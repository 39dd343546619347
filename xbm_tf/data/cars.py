"""Cars196 (Stanford Cars) from `cars_annos.mat`, split by class (1-98 / 99-196)."""

from __future__ import annotations

import os

import numpy as np

from xbm_tf.data import layout
from xbm_tf.data.splits import ImageSet, RetrievalSplits

CARS196_NUM_CLASSES = 196
CARS196_NUM_TRAIN_CLASSES = 98
#: Split sizes of the standard protocol (classes 1-98 train, 99-196 test).
CARS196_EXPECTED_COUNTS = {"train": 8054, "test": 8131}

CARS196_LAYOUT = """\
<root>/
  cars_annos.mat        MATLAB file with a struct array 'annotations' whose fields
                        include 'relative_im_path' ('car_ims/000001.jpg') and
                        'class' (1..196); 'bbox_x1'..'bbox_y2' and 'test' are
                        not used by the metric-learning protocol
  car_ims/000001.jpg    the 16,185 images"""

_REQUIRED_FIELDS = ("relative_im_path", "class")


def _scalar(value, path: str, index: int, field: str):
    """Unwraps a MATLAB struct field holding exactly one value."""
    array = np.asarray(value).reshape(-1)
    if array.size != 1:
        raise layout.DatasetLayoutError(
            f"{path}: annotations[{index}].{field} must hold one value, got "
            f"{array.size}."
        )
    return array[0]


def load_cars196(root: str, *, check_files: bool = True) -> RetrievalSplits:
    """Loads Cars196 with the metric-learning protocol split.

    Classes 1-98 are the training split (8,054 images) and classes 99-196 the
    leave-one-out test split (8,131 images), in the order of `cars_annos.mat`.
    Labels are the dataset's class ids 1..196. Bounding boxes are ignored, as in
    the paper.

    Args:
        root: the folder holding `cars_annos.mat` and `car_ims/` (see
            `CARS196_LAYOUT`).
        check_files: check that every listed image file exists.

    Returns:
        `RetrievalSplits` with `train` and `test` `ImageSet`s of absolute paths.

    Raises:
        MissingDatasetFileError: the root, `cars_annos.mat` or images are missing.
        DatasetLayoutError: the `.mat` file is unreadable, lacks the
            `annotations` struct or its fields, or has an invalid entry (the
            message names the file and the annotation index).

    Example:

    ```python
    splits = load_cars196("/data/cars196")
    len(splits.train), len(splits.test)  # (8054, 8131)
    ```
    """
    import scipy.io

    root = layout.require_dir(root, "Cars196", CARS196_LAYOUT)
    mat_path = layout.require_file(
        os.path.join(root, "cars_annos.mat"), "Cars196", CARS196_LAYOUT
    )
    try:
        mat = scipy.io.loadmat(mat_path, squeeze_me=True)
    except Exception as e:  # scipy raises several types for unreadable files.
        raise layout.DatasetLayoutError(
            f"{mat_path}: cannot be read as a MATLAB file ({e}).\n"
            f"Expected layout:\n{CARS196_LAYOUT}"
        ) from e
    if "annotations" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise layout.DatasetLayoutError(
            f"{mat_path}: no 'annotations' variable (found {found}).\n"
            f"Expected layout:\n{CARS196_LAYOUT}"
        )
    annotations = np.asarray(mat["annotations"]).reshape(-1)
    fields = annotations.dtype.names or ()
    missing = [f for f in _REQUIRED_FIELDS if f not in fields]
    if missing:
        raise layout.DatasetLayoutError(
            f"{mat_path}: 'annotations' lacks the fields {missing} (has "
            f"{list(fields)}).\nExpected layout:\n{CARS196_LAYOUT}"
        )
    if annotations.size == 0:
        raise layout.DatasetLayoutError(f"{mat_path}: 'annotations' is empty.")
    paths, classes = [], []
    for i, record in enumerate(annotations):
        relative = str(_scalar(record["relative_im_path"], mat_path, i, "path"))
        try:
            class_id = int(_scalar(record["class"], mat_path, i, "class"))
        except (TypeError, ValueError):
            raise layout.DatasetLayoutError(
                f"{mat_path}: annotations[{i}].class is not an integer: "
                f"{record['class']!r}."
            ) from None
        if not 1 <= class_id <= CARS196_NUM_CLASSES:
            raise layout.DatasetLayoutError(
                f"{mat_path}: annotations[{i}].class must be in "
                f"1..{CARS196_NUM_CLASSES}, got {class_id}."
            )
        paths.append(os.path.join(root, relative))
        classes.append(class_id)
    if check_files:
        layout.check_images_exist(paths, "Cars196", CARS196_LAYOUT)
    all_images = ImageSet(paths, np.asarray(classes, np.int64), "cars196")
    is_train = all_images.labels <= CARS196_NUM_TRAIN_CLASSES
    train = all_images.subset(is_train, "cars196/train")
    test = all_images.subset(~is_train, "cars196/test")
    for key, split in (("train", train), ("test", test)):
        layout.log_count_mismatch(
            "Cars196", key, len(split), CARS196_EXPECTED_COUNTS[key]
        )
    return RetrievalSplits(train=train, test=test, name="cars196")
