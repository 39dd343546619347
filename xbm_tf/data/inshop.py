"""In-Shop Clothes Retrieval from `Eval/list_eval_partition.txt`."""

from __future__ import annotations

import os

import numpy as np

from xbm_tf.data import layout
from xbm_tf.data.splits import ImageSet, RetrievalSplits

#: Split sizes of the standard protocol: 3,997 training items; 3,985 test items
#: whose query images are searched among their gallery images.
INSHOP_EXPECTED_COUNTS = {"train": 25882, "query": 14218, "gallery": 12612}

INSHOP_HEADER = ("image_name", "item_id", "evaluation_status")

INSHOP_LAYOUT = """\
<root>/
  Eval/list_eval_partition.txt  line 1: the number of images (52712),
                                line 2: 'image_name item_id evaluation_status',
                                then 'img/WOMEN/Dresses/id_00000002/02_1_front.jpg
                                id_00000002 train|query|gallery'
  Img/img/WOMEN/Dresses/id_00000002/02_1_front.jpg  the images ('Img/' +
                                image_name)"""

_STATUSES = ("train", "query", "gallery")


def _item_id(token: str, path: str, number: int) -> int:
    if not token.startswith("id_") or not token[3:].isdigit():
        raise layout.malformed(
            path, number, f"item_id must look like 'id_00000002', got {token!r}"
        )
    return int(token[3:])


def load_inshop(root: str, *, check_files: bool = True) -> RetrievalSplits:
    """Loads In-Shop Clothes Retrieval with its query/gallery protocol.

    The training split has 25,882 images of 3,997 items; 14,218 query images
    are searched among 12,612 gallery images of 3,985 other items. Labels are
    the item numbers (`id_00000002` -> 2). Rows keep the file's order.

    Args:
        root: the folder holding `Eval/` and `Img/` (see `INSHOP_LAYOUT`).
        check_files: check that every listed image file exists.

    Returns:
        `RetrievalSplits` with `train`, `query` and `gallery` `ImageSet`s of
        absolute paths.

    Raises:
        MissingDatasetFileError: the root, the partition file or images are
            missing.
        DatasetLayoutError: a wrong count line or header, a malformed line (the
            message names file and line), or a count that does not match the
            number of rows.

    Example:

    ```python
    splits = load_inshop("/data/inshop")
    len(splits.train), len(splits.query), len(splits.gallery)  # (25882, 14218, 12612)
    ```
    """
    root = layout.require_dir(root, "In-Shop", INSHOP_LAYOUT)
    path = layout.require_file(
        os.path.join(root, "Eval", "list_eval_partition.txt"),
        "In-Shop",
        INSHOP_LAYOUT,
    )
    lines = layout.read_lines(path)
    if len(lines) < 2:
        raise layout.DatasetLayoutError(
            f"{path}: expected a count line and a header, got {len(lines)} "
            f"non-blank lines.\nExpected layout:\n{INSHOP_LAYOUT}"
        )
    count = layout.parse_int(lines[0][1], path, lines[0][0], "the image count")
    if tuple(lines[1][1].split()) != INSHOP_HEADER:
        raise layout.malformed(
            path,
            lines[1][0],
            f"expected the header {' '.join(INSHOP_HEADER)!r}, got {lines[1][1]!r}",
        )
    rows = {status: ([], []) for status in _STATUSES}
    for number, line in lines[2:]:
        fields = line.split()
        if len(fields) != 3:
            raise layout.malformed(
                path,
                number,
                f"expected 3 fields '{' '.join(INSHOP_HEADER)}', got {line!r}",
            )
        name, item, status = fields
        if status not in rows:
            raise layout.malformed(
                path,
                number,
                f"evaluation_status must be one of {_STATUSES}, got {status!r}",
            )
        rows[status][0].append(os.path.join(root, "Img", name))
        rows[status][1].append(_item_id(item, path, number))
    num_rows = len(lines) - 2
    if num_rows != count:
        raise layout.DatasetLayoutError(
            f"{path}: line {lines[0][0]} announces {count} images but the file "
            f"lists {num_rows}."
        )
    for status, (paths, _) in rows.items():
        if not paths:
            raise layout.DatasetLayoutError(f"{path}: no '{status}' images.")
    if check_files:
        every_path = [p for paths, _ in rows.values() for p in paths]
        layout.check_images_exist(every_path, "In-Shop", INSHOP_LAYOUT)
    sets = {
        status: ImageSet(paths, np.asarray(items, np.int64), f"inshop/{status}")
        for status, (paths, items) in rows.items()
    }
    for status, image_set in sets.items():
        layout.log_count_mismatch(
            "In-Shop", status, len(image_set), INSHOP_EXPECTED_COUNTS[status]
        )
    return RetrievalSplits(
        train=sets["train"], query=sets["query"], gallery=sets["gallery"], name="inshop"
    )
