"""PKU VehicleID (Liu et al., CVPR 2016) from its `train_test_split` lists."""

from __future__ import annotations

import os

import numpy as np

from xbm_tf.data import layout
from xbm_tf.data.splits import ImageSet, RetrievalSplits

#: The test lists of the three test sizes, by name.
VEHICLEID_TEST_LISTS = {
    "small": "test_list_800.txt",
    "medium": "test_list_1600.txt",
    "large": "test_list_2400.txt",
}

#: Split sizes of the standard protocol: 110,178 training images of 13,164
#: vehicles; 7,332, 12,995 and 20,038 test images of 800, 1,600 and 2,400 others.
VEHICLEID_EXPECTED_COUNTS = {
    "train": 110178,
    "small": 7332,
    "medium": 12995,
    "large": 20038,
}

VEHICLEID_LAYOUT = """\
<root>/                               (the extracted VehicleID folder)
  image/0000001.jpg                   the images, image/<name>.jpg
  train_test_split/train_list.txt     lines '<name> <vehicle_id>', e.g. '0000001 1'
  train_test_split/test_list_800.txt  Small test list, same format
  train_test_split/test_list_1600.txt Medium test list
  train_test_split/test_list_2400.txt Large test list"""


def _read_list(root: str, filename: str, name: str) -> ImageSet:
    path = layout.require_file(
        os.path.join(root, "train_test_split", filename), "VehicleID", VEHICLEID_LAYOUT
    )
    paths, classes, seen = [], [], {}
    for number, line in layout.read_lines(path):
        fields = line.split()
        if len(fields) != 2:
            raise layout.malformed(
                path, number, f"expected 2 fields '<name> <vehicle_id>', got {line!r}"
            )
        image, vehicle = fields
        vehicle_id = layout.parse_int(vehicle, path, number, "vehicle_id")
        if image in seen:
            raise layout.malformed(
                path, number, f"image {image!r} repeats line {seen[image]}"
            )
        seen[image] = number
        filename = image if image.lower().endswith(".jpg") else f"{image}.jpg"
        paths.append(os.path.join(root, "image", filename))
        classes.append(vehicle_id)
    if not paths:
        raise layout.DatasetLayoutError(f"{path} lists no images.")
    return ImageSet(paths, np.asarray(classes, np.int64), name)


def load_vehicleid(
    root: str, test_size: str = "small", *, check_files: bool = True
) -> RetrievalSplits:
    """Loads VehicleID with its training list and one of its three test lists.

    The training split has 110,178 images of 13,164 vehicles. The test split is
    the Small (800 vehicles, 7,332 images), Medium (1,600, 12,995) or Large
    (2,400, 20,038) test list, evaluated leave-one-out: every test image queries
    all the other images of the same list (the reference code's protocol for
    every dataset; the paper reports Recall@1 and Recall@5). Labels are the
    files' vehicle ids.

    Args:
        root: the folder holding `image/` and `train_test_split/` (see
            `VEHICLEID_LAYOUT`).
        test_size: `"small"`, `"medium"` or `"large"`.
        check_files: check that every listed image file (training and the
            chosen test list) exists.

    Returns:
        `RetrievalSplits` with `train` and `test` `ImageSet`s of absolute paths.

    Raises:
        ValueError: an unknown `test_size`.
        MissingDatasetFileError: the root, a list file or images are missing.
        DatasetLayoutError: a malformed line (the message names file and line).

    Example:

    ```python
    splits = load_vehicleid("/data/VehicleID", "large")
    len(splits.train), len(splits.test)  # (110178, 20038)
    ```
    """
    if test_size not in VEHICLEID_TEST_LISTS:
        raise ValueError(
            f"test_size must be one of {sorted(VEHICLEID_TEST_LISTS)}; "
            f"got {test_size!r}."
        )
    root = layout.require_dir(root, "VehicleID", VEHICLEID_LAYOUT)
    train = _read_list(root, "train_list.txt", "vehicleid/train")
    test = _read_list(
        root, VEHICLEID_TEST_LISTS[test_size], f"vehicleid/test_{test_size}"
    )
    if check_files:
        layout.check_images_exist(
            train.images + test.images, "VehicleID", VEHICLEID_LAYOUT
        )
    for key, split in (("train", train), (test_size, test)):
        layout.log_count_mismatch(
            "VehicleID", key, len(split), VEHICLEID_EXPECTED_COUNTS[key]
        )
    return RetrievalSplits(train=train, test=test, name="vehicleid")
