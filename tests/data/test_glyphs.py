from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

import xbm_tf
from xbm_tf.data import glyphs, load_glyphs


@pytest.fixture(scope="module")
def splits():
    return load_glyphs()


def test_sizes_classes_and_split(splits):
    train, test = splits.train, splits.test
    assert train.num_classes + test.num_classes >= 300
    assert not set(train.classes) & set(test.classes)
    for part in (train, test):
        counts = np.unique(part.labels, return_counts=True)[1]
        assert counts.min() == counts.max() == len(glyphs.GLYPH_FONT_FILES) >= 10
        assert part.images.shape[1:] == (32, 32, 1) and part.images.dtype == np.uint8
    for cp in train.classes:
        assert glyphs.is_train_class(cp)
    for cp in test.classes:
        assert not glyphs.is_train_class(cp)
    # Every image has ink, inside the 28 px square centred in 32 x 32.
    images = np.concatenate([train.images, test.images])[..., 0]
    assert images.reshape(len(images), -1).max(axis=1).min() > 0
    assert not images[:, :2].any() and not images[:, -2:].any()
    assert not images[:, :, :2].any() and not images[:, :, -2:].any()


def test_lookalikes_are_removed(splits):
    classes = np.concatenate([splits.train.classes, splits.test.classes])
    kept = {chr(cp) for cp in classes}
    # One glyph under three code points: Latin A, Greek Alpha, Cyrillic A.
    assert "A" in kept and "\u0391" not in kept and "\u0410" not in kept
    assert "B" in kept and "\u0392" not in kept and "\u0412" not in kept
    # Case pairs alike once scaled: one of each survives.
    for pair in ("oO", "sS", "xX", "zZ", "cC", "\u044f\u042f"):
        assert sum(ch in kept for ch in pair) == 1, pair
    # Case pairs of different shapes both stay.
    for pair in ("aA", "gG", "eE"):
        assert all(ch in kept for ch in pair), pair


def test_drop_lookalikes_rule():
    renders = np.zeros((5, 4), np.float32)
    renders[1] = 0.03  # within 0.04 (mean abs) of row 0: dropped
    renders[2] = 0.05  # 0.05 from row 0: kept
    renders[3] = 0.05 + 0.09  # "b", 0.09 from its other case "B" (row 4 is later)
    renders[4] = 0.05 + 0.09 + 0.10  # "B": 0.10 < 0.11 from "b", kept before: dropped
    keep = glyphs.drop_lookalikes([0x41, 0x391, 0x43, ord("b"), ord("B")], renders)
    assert keep.tolist() == [True, False, True, True, False]
    # The case rule needs the other case kept before it; else only 0.04 counts.
    keep = glyphs.drop_lookalikes([ord("B"), ord("x")], renders[[3, 4]])
    assert keep.tolist() == [True, True]
    keep = glyphs.drop_lookalikes([ord("x"), ord("X")], renders[[3, 4]])
    assert keep.tolist() == [True, False]


def test_split_rule_is_by_code_point_only():
    sides = [glyphs.is_train_class(cp) for cp in range(0x41, 0x41 + 200)]
    assert 60 < sum(sides) < 140  # both sides, roughly half
    for cp in (0x41, 0x42, 0x3B1, 0x2500):
        even = zlib.crc32(f"U+{cp:04X}".encode()) % 2 == 0
        assert glyphs.is_train_class(cp) == even


def test_render_is_deterministic_and_reads_only():
    package = os.path.dirname(xbm_tf.__file__)
    before = sorted(os.listdir(os.path.join(package, "data")))
    first = glyphs.render_glyphs([0x41, 0x3A9, 0x2554])
    second = glyphs.render_glyphs([0x41, 0x3A9, 0x2554])
    np.testing.assert_array_equal(first, second)
    assert first.shape == (3, 16, 32, 32) and first.any(axis=(2, 3)).all()
    assert sorted(os.listdir(os.path.join(package, "data"))) == before


def test_max_per_class(splits):
    small = load_glyphs(max_per_class=3)
    assert len(small.train) == 3 * splits.train.num_classes
    a = splits.train.images[splits.train.labels == ord("A")][:3]
    np.testing.assert_array_equal(small.train.images[small.train.labels == ord("A")], a)
    with pytest.raises(ValueError, match="max_per_class"):
        load_glyphs(max_per_class=0)
