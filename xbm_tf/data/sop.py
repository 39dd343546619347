"""Stanford Online Products from `Ebay_train.txt` / `Ebay_test.txt`."""

from __future__ import annotations

import os

import numpy as np

from xbm_tf.data import layout
from xbm_tf.data.splits import ImageSet, RetrievalSplits

#: Split sizes of the standard protocol (11,318 train / 11,316 test classes).
SOP_EXPECTED_COUNTS = {"train": 59551, "test": 60502}

SOP_HEADER = ("image_id", "class_id", "super_class_id", "path")

SOP_LAYOUT = """\
<root>/                             (the extracted Stanford_Online_Products folder)
  Ebay_train.txt                    header 'image_id class_id super_class_id path',
  Ebay_test.txt                     then lines '1 1 1 bicycle_final/111085122871_0.JPG'
  bicycle_final/111085122871_0.JPG  the images, paths relative to <root>"""


def _read_split(root: str, filename: str, name: str) -> ImageSet:
    path = layout.require_file(
        os.path.join(root, filename), "Stanford Online Products", SOP_LAYOUT
    )
    lines = layout.read_lines(path)
    if not lines or tuple(lines[0][1].split()) != SOP_HEADER:
        got = lines[0][1] if lines else "an empty file"
        raise layout.malformed(
            path,
            lines[0][0] if lines else 1,
            f"expected the header {' '.join(SOP_HEADER)!r}, got {got!r}",
        )
    paths, classes, seen = [], [], {}
    for number, line in lines[1:]:
        fields = line.split()
        if len(fields) != 4:
            raise layout.malformed(
                path,
                number,
                f"expected 4 fields '{' '.join(SOP_HEADER)}', got {line!r}",
            )
        image_id = layout.parse_int(fields[0], path, number, "image_id")
        class_id = layout.parse_int(fields[1], path, number, "class_id")
        layout.parse_int(fields[2], path, number, "super_class_id")
        if image_id in seen:
            raise layout.malformed(
                path, number, f"image_id {image_id} repeats line {seen[image_id]}"
            )
        seen[image_id] = number
        paths.append(os.path.join(root, fields[3]))
        classes.append(class_id)
    if not paths:
        raise layout.DatasetLayoutError(f"{path} lists no images.")
    return ImageSet(paths, np.asarray(classes, np.int64), name)


def load_sop(root: str, *, check_files: bool = True) -> RetrievalSplits:
    """Loads Stanford Online Products with its own train/test split.

    The training split has 59,551 images of 11,318 products (classes 1-11,318)
    and the leave-one-out test split 60,502 images of 11,316 other products.
    Labels are the files' `class_id`s.

    Args:
        root: the folder holding `Ebay_train.txt`, `Ebay_test.txt` and the
            image folders (see `SOP_LAYOUT`).
        check_files: check that every listed image file exists.

    Returns:
        `RetrievalSplits` with `train` and `test` `ImageSet`s of absolute paths.

    Raises:
        MissingDatasetFileError: the root, a list file or images are missing.
        DatasetLayoutError: a wrong header or malformed line (the message names
            file and line).

    Example:

    ```python
    splits = load_sop("/data/Stanford_Online_Products")
    len(splits.train), len(splits.test)  # (59551, 60502)
    ```
    """
    root = layout.require_dir(root, "Stanford Online Products", SOP_LAYOUT)
    train = _read_split(root, "Ebay_train.txt", "sop/train")
    test = _read_split(root, "Ebay_test.txt", "sop/test")
    if check_files:
        layout.check_images_exist(
            train.images + test.images, "Stanford Online Products", SOP_LAYOUT
        )
    for key, split in (("train", train), ("test", test)):
        layout.log_count_mismatch(
            "Stanford Online Products", key, len(split), SOP_EXPECTED_COUNTS[key]
        )
    return RetrievalSplits(train=train, test=test, name="sop")
