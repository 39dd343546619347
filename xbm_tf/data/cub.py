"""CUB-200-2011 from its extracted folder, split by class (1-100 / 101-200)."""

from __future__ import annotations

import os

import numpy as np

from xbm_tf.data import layout
from xbm_tf.data.splits import ImageSet, RetrievalSplits

CUB_NUM_CLASSES = 200
CUB_NUM_TRAIN_CLASSES = 100
#: Split sizes of the standard protocol (classes 1-100 train, 101-200 test).
CUB_EXPECTED_COUNTS = {"train": 5864, "test": 5924}

CUB_LAYOUT = """\
<root>/                          (the extracted CUB_200_2011 folder)
  images.txt                     lines '<image_id> <class_dir>/<file>.jpg'
  image_class_labels.txt         lines '<image_id> <class_id 1..200>'
  images/<class_dir>/<file>.jpg  the images"""


def _read_id_table(path: str, what: str) -> dict[int, tuple[int, str]]:
    """Reads '<image_id> <value>' lines into {image_id: (line_number, value)}."""
    table = {}
    for number, line in layout.read_lines(path):
        fields = line.split(maxsplit=1)
        if len(fields) != 2:
            raise layout.malformed(
                path, number, f"expected '<image_id> <{what}>', got {line!r}"
            )
        image_id = layout.parse_int(fields[0], path, number, "image_id")
        if image_id in table:
            raise layout.malformed(
                path,
                number,
                f"image_id {image_id} repeats line {table[image_id][0]}",
            )
        table[image_id] = (number, fields[1])
    return table


def load_cub(root: str, *, check_files: bool = True) -> RetrievalSplits:
    """Loads CUB-200-2011 with the metric-learning protocol split.

    Classes 1-100 are the training split (5,864 images) and classes 101-200
    the leave-one-out test split (5,924 images). Images are ordered by image id.
    Labels are the dataset's class ids 1..200.

    Args:
        root: the extracted `CUB_200_2011` folder (see `CUB_LAYOUT`).
        check_files: check that every listed image file exists.

    Returns:
        `RetrievalSplits` with `train` and `test` `ImageSet`s of absolute paths.

    Raises:
        MissingDatasetFileError: the root, an annotation file or images are
            missing.
        DatasetLayoutError: a malformed line (the message names file and line)
            or image ids that do not match between the two annotation files.

    Example:

    ```python
    splits = load_cub("/data/CUB_200_2011")
    len(splits.train), len(splits.test)  # (5864, 5924)
    ```
    """
    root = layout.require_dir(root, "CUB-200-2011", CUB_LAYOUT)
    images_txt = layout.require_file(
        os.path.join(root, "images.txt"), "CUB-200-2011", CUB_LAYOUT
    )
    labels_txt = layout.require_file(
        os.path.join(root, "image_class_labels.txt"), "CUB-200-2011", CUB_LAYOUT
    )
    images = _read_id_table(images_txt, "class_dir/file.jpg")
    labels = _read_id_table(labels_txt, "class_id")
    if not images:
        raise layout.DatasetLayoutError(f"{images_txt} lists no images.")
    only_images = sorted(set(images) - set(labels))
    only_labels = sorted(set(labels) - set(images))
    if only_images or only_labels:
        raise layout.DatasetLayoutError(
            f"CUB-200-2011: image ids differ between {images_txt} and {labels_txt}: "
            f"{len(only_images)} ids without a label (e.g. {only_images[:5]}), "
            f"{len(only_labels)} labels without an image (e.g. {only_labels[:5]})."
        )
    ids = sorted(images)
    paths = [os.path.join(root, "images", images[i][1]) for i in ids]
    classes = []
    for i in ids:
        number, token = labels[i]
        class_id = layout.parse_int(token, labels_txt, number, "class_id")
        if not 1 <= class_id <= CUB_NUM_CLASSES:
            raise layout.malformed(
                labels_txt,
                number,
                f"class_id must be in 1..{CUB_NUM_CLASSES}, got {class_id}",
            )
        classes.append(class_id)
    if check_files:
        layout.check_images_exist(paths, "CUB-200-2011", CUB_LAYOUT)
    all_images = ImageSet(paths, np.asarray(classes, np.int64), "cub")
    is_train = all_images.labels <= CUB_NUM_TRAIN_CLASSES
    train = all_images.subset(is_train, "cub/train")
    test = all_images.subset(~is_train, "cub/test")
    for split in (train, test):
        key = split.name.split("/")[1]
        layout.log_count_mismatch(
            "CUB-200-2011", key, len(split), CUB_EXPECTED_COUNTS[key]
        )
    return RetrievalSplits(train=train, test=test, name="cub")
