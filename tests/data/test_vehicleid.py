from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from xbm_tf.data import (
    VEHICLEID_EXPECTED_COUNTS,
    DatasetLayoutError,
    MissingDatasetFileError,
    load_vehicleid,
)

# (name, vehicle_id) in the real layout: image/<name>.jpg and
# train_test_split/{train_list,test_list_800,test_list_1600,test_list_2400}.txt.
_TRAIN = [("0000001", 1), ("0000002", 1), ("0000003", 2), ("0000004", 2)]
_SMALL = [("0100001", 7), ("0100002", 7), ("0100003", 8)]
_MEDIUM = _SMALL + [("0100004", 9), ("0100005", 9)]
_LARGE = _MEDIUM + [("0100006", 11), ("0100007", 11), ("0100008", 12)]
_LISTS = {
    "train_list.txt": _TRAIN,
    "test_list_800.txt": _SMALL,
    "test_list_1600.txt": _MEDIUM,
    "test_list_2400.txt": _LARGE,
}


@pytest.fixture
def vehicleid_root(tmp_path, real_images, image_writer):
    root = tmp_path / "VehicleID"
    for n, (name, _) in enumerate(_TRAIN + _LARGE):
        image_writer(str(root / "image" / f"{name}.jpg"), real_images[n])
    (root / "train_test_split").mkdir()
    for filename, rows in _LISTS.items():
        text = "".join(f"{name} {vid}\n" for name, vid in rows)
        (root / "train_test_split" / filename).write_text(text)
    return root


@pytest.mark.parametrize(
    "test_size, rows", [("small", _SMALL), ("medium", _MEDIUM), ("large", _LARGE)]
)
def test_three_test_sizes(vehicleid_root, test_size, rows):
    splits = load_vehicleid(str(vehicleid_root), test_size)
    assert splits.protocol == "leave_one_out" and splits.name == "vehicleid"
    np.testing.assert_array_equal(splits.train.labels, [1, 1, 2, 2])
    np.testing.assert_array_equal(splits.test.labels, [vid for _, vid in rows])
    assert splits.test.images == [
        os.path.join(str(vehicleid_root), "image", f"{name}.jpg") for name, _ in rows
    ]
    assert splits.test.name == f"vehicleid/test_{test_size}"
    assert splits.num_train_classes == 2


def test_unknown_test_size(vehicleid_root):
    with pytest.raises(ValueError, match=r"test_size must be one of .*'huge'"):
        load_vehicleid(str(vehicleid_root), "huge")


def test_missing_list_file_is_named(vehicleid_root):
    os.remove(vehicleid_root / "train_test_split" / "test_list_1600.txt")
    load_vehicleid(str(vehicleid_root), "small")  # not needed for Small
    with pytest.raises(MissingDatasetFileError, match="test_list_1600.txt"):
        load_vehicleid(str(vehicleid_root), "medium")


def test_missing_root_shows_the_layout(tmp_path):
    with pytest.raises(MissingDatasetFileError, match=r"(?s)does not exist.*image/"):
        load_vehicleid(str(tmp_path / "nothing"))


def test_malformed_line_names_file_and_line(vehicleid_root):
    path = vehicleid_root / "train_test_split" / "train_list.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ["0000003 two"] + lines[3:]) + "\n")
    with pytest.raises(
        DatasetLayoutError, match=r"train_list.txt, line 3: vehicle_id .* 'two'"
    ):
        load_vehicleid(str(vehicleid_root))
    path.write_text("\n".join(lines[:3] + ["0000004 2 extra"]) + "\n")
    with pytest.raises(DatasetLayoutError, match=r"line 4: expected 2 fields"):
        load_vehicleid(str(vehicleid_root))
    path.write_text("\n".join(lines + ["0000002 1"]) + "\n")
    with pytest.raises(DatasetLayoutError, match=r"line 5: image '0000002' repeats"):
        load_vehicleid(str(vehicleid_root))


def test_missing_images_are_counted(vehicleid_root):
    os.remove(vehicleid_root / "image" / "0000004.jpg")
    os.remove(vehicleid_root / "image" / "0100008.jpg")  # Large only
    with pytest.raises(MissingDatasetFileError, match="1 of 7 listed image files"):
        load_vehicleid(str(vehicleid_root), "small")
    with pytest.raises(MissingDatasetFileError, match="2 of 12 listed image files"):
        load_vehicleid(str(vehicleid_root), "large")
    splits = load_vehicleid(str(vehicleid_root), "large", check_files=False)
    assert len(splits.test) == 8


def test_count_mismatch_warns(vehicleid_root, caplog):
    with caplog.at_level(logging.WARNING):
        load_vehicleid(str(vehicleid_root), "medium")
    messages = [r.getMessage() for r in caplog.records]
    assert (
        "VehicleID: train split has 4 images; the standard protocol has 110178."
        in messages
    )
    assert (
        "VehicleID: medium split has 5 images; the standard protocol has 12995."
        in messages
    )
    assert VEHICLEID_EXPECTED_COUNTS["train"] == 110178
