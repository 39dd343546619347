from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.io

from xbm_tf.data import DatasetLayoutError, MissingDatasetFileError, load_cars196

_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
_CLASSES = [99, 1, 98, 196, 2, 150]  # mat order; 'test' flags are ignored


def _write_annos(path, rows, fields=_FIELDS + ("class", "test")):
    """Writes a cars_annos.mat with the real file's struct layout."""
    annotations = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        annotations[0, i] = tuple(row[: len(fields)])
    class_names = np.array([f"Car {c}" for c in range(1, 197)], dtype=object)
    scipy.io.savemat(
        str(path), {"annotations": annotations, "class_names": class_names[None]}
    )


def _rows(classes):
    rows = []
    for i, class_id in enumerate(classes):
        box = [np.uint8(v) for v in (3, 4, 20, 18)]
        test_flag = np.uint8(i % 2)
        rows.append([f"car_ims/{i + 1:06d}.jpg", *box, np.uint8(class_id), test_flag])
    return rows


@pytest.fixture
def cars_root(tmp_path, real_images, image_writer):
    root = tmp_path / "cars196"
    for i in range(len(_CLASSES)):
        image_writer(str(root / "car_ims" / f"{i + 1:06d}.jpg"), real_images[i])
    _write_annos(root / "cars_annos.mat", _rows(_CLASSES))
    return root


def test_split_by_class_in_file_order(cars_root):
    splits = load_cars196(str(cars_root))
    np.testing.assert_array_equal(splits.train.labels, [1, 98, 2])
    np.testing.assert_array_equal(splits.test.labels, [99, 196, 150])
    assert splits.train.images[0] == os.path.join(
        str(cars_root), "car_ims", "000002.jpg"
    )
    assert splits.test.images[0] == os.path.join(
        str(cars_root), "car_ims", "000001.jpg"
    )


def test_missing_mat_names_file(cars_root):
    os.remove(cars_root / "cars_annos.mat")
    with pytest.raises(
        FileNotFoundError, match=r"(?s)cars_annos.mat.*Expected layout.*car_ims"
    ):
        load_cars196(str(cars_root))


def test_unreadable_mat(cars_root):
    (cars_root / "cars_annos.mat").write_text("not a mat file")
    with pytest.raises(DatasetLayoutError, match="cannot be read as a MATLAB file"):
        load_cars196(str(cars_root))


def test_missing_field(cars_root):
    rows = [row[:5] + [row[6]] for row in _rows(_CLASSES)]
    _write_annos(cars_root / "cars_annos.mat", rows, _FIELDS + ("test",))
    with pytest.raises(DatasetLayoutError, match=r"lacks the fields \['class'\]"):
        load_cars196(str(cars_root))


def test_bad_class_names_annotation_index(cars_root):
    _write_annos(cars_root / "cars_annos.mat", _rows([1, 2, 197]))
    with pytest.raises(DatasetLayoutError, match=r"annotations\[2\].class .* 197"):
        load_cars196(str(cars_root), check_files=False)


def test_missing_images_are_counted(cars_root):
    os.remove(cars_root / "car_ims" / "000003.jpg")
    with pytest.raises(MissingDatasetFileError, match=r"(?s)1 of 6 .*000003.jpg"):
        load_cars196(str(cars_root))
