from __future__ import annotations

import os

import numpy as np
import pytest

from xbm_tf.data import DatasetLayoutError, MissingDatasetFileError, load_cub

# (image_id, class_id): ids deliberately out of order in images.txt; classes on
# both sides of the 100/101 boundary.
_ROWS = [(3, 101), (1, 1), (2, 100), (5, 200), (4, 2), (6, 150)]


def _class_dir(class_id: int) -> str:
    return f"{class_id:03d}.Bird_{class_id}"


@pytest.fixture
def cub_root(tmp_path, real_images, image_writer):
    root = tmp_path / "CUB_200_2011"
    images, labels = [], []
    for n, (image_id, class_id) in enumerate(_ROWS):
        relative = f"{_class_dir(class_id)}/Bird_{class_id}_{image_id:04d}.jpg"
        image_writer(str(root / "images" / relative), real_images[n])
        images.append(f"{image_id} {relative}\n")
        labels.append(f"{image_id} {class_id}\n")
    (root / "images.txt").write_text("".join(images))
    (root / "image_class_labels.txt").write_text("".join(reversed(labels)))
    return root


def test_split_by_class_in_image_id_order(cub_root):
    splits = load_cub(str(cub_root))
    assert splits.protocol == "leave_one_out"
    np.testing.assert_array_equal(splits.train.labels, [1, 100, 2])
    np.testing.assert_array_equal(splits.test.labels, [101, 200, 150])
    assert splits.num_train_classes == 3
    expected = os.path.join(
        str(cub_root), "images", _class_dir(100), "Bird_100_0002.jpg"
    )
    assert splits.train.images[1] == expected
    assert all(os.path.isfile(p) for p in splits.train.images + splits.test.images)


def test_missing_root_names_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="image_class_labels.txt") as info:
        load_cub(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(info.value)
    assert isinstance(info.value, MissingDatasetFileError)


def test_missing_annotation_file(cub_root):
    os.remove(cub_root / "image_class_labels.txt")
    with pytest.raises(MissingDatasetFileError, match="image_class_labels.txt"):
        load_cub(str(cub_root))


def test_malformed_line_names_file_and_line(cub_root):
    path = cub_root / "images.txt"
    lines = path.read_text().splitlines()
    lines[3] = "four"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetLayoutError, match=r"images.txt, line 4: .*'four'"):
        load_cub(str(cub_root))


def test_bad_class_id(cub_root):
    path = cub_root / "image_class_labels.txt"
    path.write_text(path.read_text().replace("5 200", "5 201"))
    with pytest.raises(
        DatasetLayoutError,
        match=r"image_class_labels.txt, line 3: class_id must be in 1..200, got 201",
    ):
        load_cub(str(cub_root))


def test_ids_must_match(cub_root):
    path = cub_root / "image_class_labels.txt"
    path.write_text(path.read_text().replace("6 150\n", ""))
    with pytest.raises(DatasetLayoutError, match=r"1 ids without a label \(e.g. \[6\]"):
        load_cub(str(cub_root))


def test_missing_images_are_counted(cub_root):
    os.remove(cub_root / "images" / _class_dir(1) / "Bird_1_0001.jpg")
    os.remove(cub_root / "images" / _class_dir(2) / "Bird_2_0004.jpg")
    with pytest.raises(MissingDatasetFileError, match="2 of 6 listed image files"):
        load_cub(str(cub_root))
    assert len(load_cub(str(cub_root), check_files=False).train) == 3
