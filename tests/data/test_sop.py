from __future__ import annotations

import os

import numpy as np
import pytest

from xbm_tf.data import DatasetLayoutError, MissingDatasetFileError, load_sop

_HEADER = "image_id class_id super_class_id path\n"
# (image_id, class_id, super_class_id, path)
_TRAIN = [
    (1, 1, 1, "bicycle_final/111085122871_0.JPG"),
    (2, 1, 1, "bicycle_final/111085122871_1.JPG"),
    (3, 2, 5, "kettle_final/111265328556_0.JPG"),
]
_TEST = [
    (1, 11319, 1, "bicycle_final/251952414262_0.JPG"),
    (2, 11320, 12, "toaster_final/261211623532_3.JPG"),
]


def _write_list(path, rows):
    path.write_text(_HEADER + "".join(" ".join(map(str, r)) + "\n" for r in rows))


@pytest.fixture
def sop_root(tmp_path, real_images, image_writer):
    root = tmp_path / "Stanford_Online_Products"
    for n, row in enumerate(_TRAIN + _TEST):
        image_writer(str(root / row[3]), real_images[n])
    _write_list(root / "Ebay_train.txt", _TRAIN)
    _write_list(root / "Ebay_test.txt", _TEST)
    return root


def test_keeps_own_split(sop_root):
    splits = load_sop(str(sop_root))
    np.testing.assert_array_equal(splits.train.labels, [1, 1, 2])
    np.testing.assert_array_equal(splits.test.labels, [11319, 11320])
    assert splits.test.images[1] == os.path.join(
        str(sop_root), "toaster_final", "261211623532_3.JPG"
    )
    assert splits.num_train_classes == 2


def test_missing_list_file(sop_root):
    os.remove(sop_root / "Ebay_test.txt")
    with pytest.raises(MissingDatasetFileError, match="Ebay_test.txt"):
        load_sop(str(sop_root))


def test_wrong_header(sop_root):
    path = sop_root / "Ebay_train.txt"
    path.write_text(path.read_text().replace("super_class_id", "super"))
    with pytest.raises(DatasetLayoutError, match=r"Ebay_train.txt, line 1: .*header"):
        load_sop(str(sop_root))


def test_malformed_line_names_file_and_line(sop_root):
    path = sop_root / "Ebay_test.txt"
    path.write_text(path.read_text().replace("11320 12", "x 12"))
    with pytest.raises(
        DatasetLayoutError, match=r"Ebay_test.txt, line 3: class_id .* 'x'"
    ):
        load_sop(str(sop_root))
    path.write_text(_HEADER + "1 2 3\n")
    with pytest.raises(DatasetLayoutError, match=r"line 2: expected 4 fields"):
        load_sop(str(sop_root))


def test_missing_images_are_counted(sop_root):
    os.remove(sop_root / _TRAIN[2][3])
    os.remove(sop_root / _TEST[0][3])
    with pytest.raises(MissingDatasetFileError, match="2 of 5 listed image files"):
        load_sop(str(sop_root))
