from __future__ import annotations

import os

import numpy as np
import pytest

from xbm_tf.data import DatasetLayoutError, MissingDatasetFileError, load_inshop

_ROWS = [
    ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
    ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
    ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "query"),
    ("img/WOMEN/Skirts/id_00000007/01_1_front.jpg", "id_00000007", "train"),
    ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "gallery"),
    ("img/MEN/Tees/id_00000091/03_1_front.jpg", "id_00000091", "gallery"),
]


def _write_partition(path, rows, count=None):
    lines = [str(len(rows) if count is None else count)]
    lines.append("image_name item_id evaluation_status")
    # The real file aligns columns with runs of spaces.
    lines += [f"{name:<60}{item} {status}" for name, item, status in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def inshop_root(tmp_path, real_images, image_writer):
    root = tmp_path / "inshop"
    for n, (name, _, _) in enumerate(_ROWS):
        image_writer(str(root / "Img" / name), real_images[n])
    (root / "Eval").mkdir()
    _write_partition(root / "Eval" / "list_eval_partition.txt", _ROWS)
    return root


def test_query_gallery_protocol(inshop_root):
    splits = load_inshop(str(inshop_root))
    assert splits.protocol == "query_gallery" and splits.test is None
    np.testing.assert_array_equal(splits.train.labels, [2, 2, 7])
    np.testing.assert_array_equal(splits.query.labels, [80])
    np.testing.assert_array_equal(splits.gallery.labels, [80, 91])
    assert splits.query.images[0] == os.path.join(str(inshop_root), "Img", _ROWS[2][0])
    assert splits.num_train_classes == 2


def test_missing_partition_file(inshop_root):
    os.remove(inshop_root / "Eval" / "list_eval_partition.txt")
    with pytest.raises(
        FileNotFoundError, match=r"(?s)list_eval_partition.txt.*Expected layout.*Img/"
    ):
        load_inshop(str(inshop_root))


def test_count_line_must_match(inshop_root):
    _write_partition(inshop_root / "Eval" / "list_eval_partition.txt", _ROWS, 52712)
    with pytest.raises(DatasetLayoutError, match="announces 52712 images .* lists 6"):
        load_inshop(str(inshop_root))


def test_malformed_lines_name_file_and_line(inshop_root):
    path = inshop_root / "Eval" / "list_eval_partition.txt"
    rows = list(_ROWS)
    rows[3] = (rows[3][0], rows[3][1], "validation")
    _write_partition(path, rows)
    with pytest.raises(
        DatasetLayoutError, match=r"list_eval_partition.txt, line 6: .*'validation'"
    ):
        load_inshop(str(inshop_root))
    rows[3] = (rows[3][0], "00000007", "train")
    _write_partition(path, rows)
    with pytest.raises(DatasetLayoutError, match=r"line 6: item_id must look like"):
        load_inshop(str(inshop_root))


def test_missing_images_are_counted(inshop_root):
    os.remove(inshop_root / "Img" / _ROWS[5][0])
    with pytest.raises(MissingDatasetFileError, match=r"(?s)1 of 6 .*03_1_front.jpg"):
        load_inshop(str(inshop_root))
