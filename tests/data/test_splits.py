from __future__ import annotations

import numpy as np
import pytest

from xbm_tf.data import ImageSet, RetrievalSplits, remap_labels


def test_kinds_and_subsets():
    paths = ImageSet(("/a.jpg", "/b.jpg", "/c.jpg"), np.array([5, 9, 5]), "p")
    assert paths.kind == "paths" and paths.images == ["/a.jpg", "/b.jpg", "/c.jpg"]
    assert paths.labels.dtype == np.int64 and paths.num_classes == 2
    sub = paths.select_classes([5])
    assert sub.images == ["/a.jpg", "/c.jpg"] and sub.labels.tolist() == [5, 5]
    array = ImageSet(
        np.arange(4 * 2 * 2).reshape(4, 2, 2, 1).astype(np.uint8), [1, 2, 3, 4]
    )
    picked = array.subset([3, 0])
    assert picked.kind == "array" and picked.labels.tolist() == [4, 1]
    np.testing.assert_array_equal(picked.images[0, :, :, 0], [[12, 13], [14, 15]])
    encoded = np.empty(2, object)
    encoded[:] = [b"\xff\xd8", b"\x89PNG"]
    assert ImageSet(encoded, np.array([0, 1])).kind == "encoded"
    assert array.describe() == ": 4 images, 4 classes"


def test_validation_messages():
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        ImageSet(["/a", "/b", "/c"], np.array([1, 2]))
    with pytest.raises(ValueError, match=r"shape \(N, H, W, C\) with C in \(1, 3\)"):
        ImageSet(np.zeros((2, 4, 4, 2), np.uint8), np.array([1, 2]))
    with pytest.raises(ValueError, match="1-D integer array"):
        ImageSet(["/a"], np.array([0.5]))
    train = ImageSet(["/a"], np.array([1]))
    with pytest.raises(ValueError, match="needs test, or both query and gallery"):
        RetrievalSplits(train=train, query=train)
    with pytest.raises(ValueError, match="not both"):
        RetrievalSplits(train=train, test=train, query=train, gallery=train)


def test_remap_labels_round_trip():
    labels = np.array([200, 101, 200, 150, 101])
    new, classes = remap_labels(labels)
    assert new.tolist() == [2, 0, 2, 1, 0] and classes.tolist() == [101, 150, 200]
    np.testing.assert_array_equal(classes[new], labels)
