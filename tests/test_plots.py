"""Tests for xbm_tf.plots: PNG sizes, curve colours, grid frame colours."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
from matplotlib.image import imread

from xbm_tf.plots import (
    GREEN,
    QUERY_FRAME,
    RED,
    grid_layout,
    plot_recall_curve,
    plot_retrieval_grid,
    recall_curve_figure,
)

_C0 = (0x1F, 0x77, 0xB4)  # matplotlib's first two default line colours
_C1 = (0xFF, 0x7F, 0x0E)


def _rgb255(path):
    img = imread(path)
    assert img.dtype == np.float32  # PNG read back as floats in [0, 1]
    return np.round(img[..., :3] * 255).astype(int)


def _count(img, color):
    return int(np.all(np.abs(img - np.array(color)) <= 2, axis=-1).sum())


def test_recall_curve_single(tmp_path):
    backend = matplotlib.get_backend()
    path = plot_recall_curve({1: 0.6, 2: 0.7, 4: 0.8, 8: 0.9}, tmp_path / "r.png")
    img = _rgb255(path)
    assert img.shape == (400, 640, 3)
    assert _count(img, _C0) > 200  # the curve is drawn
    assert _count(img, _C1) == 0
    assert matplotlib.get_backend() == backend  # no global backend switch


def test_recall_curve_several_and_string_keys(tmp_path):
    results = {
        "before": {"val_recall@1": 0.2, "val_recall@10": 0.4, "val_map@r": 0.1},
        "after": {1: 0.7, 10: 0.85, 100: 0.95, 1000: 0.99},
    }
    path = plot_recall_curve(
        results, tmp_path / "sub" / "r.png", title="SOP", figsize=(5, 3), dpi=80
    )
    img = _rgb255(path)
    assert img.shape == (240, 400, 3)
    assert _count(img, _C0) > 100 and _count(img, _C1) > 100


def test_recall_curve_errors(tmp_path):
    with pytest.raises(ValueError, match="`results` is empty"):
        plot_recall_curve({}, tmp_path / "r.png")
    with pytest.raises(ValueError, match=r"no Recall@K values.*'map@r'"):
        plot_recall_curve({"map@r": 0.3}, tmp_path / "r.png")


def _images(n, value_step, h=6, w=5):
    """Item i is a constant image of gray level i * value_step (uint8)."""
    levels = (np.arange(n) * value_step).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n, h, w, 3)).copy()


def test_retrieval_grid_frames_and_contents(tmp_path):
    query = _images(4, 60)
    gallery = _images(10, 20)
    query_labels = np.array([0, 1, 2, 3])
    gallery_labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    nn = np.array(
        [
            [0, 1, 4, 2, 9, 3],
            [5, 1, 9, 0, 2, 3],
            [3, 2, 0, 1, 6, 7],
            [1, 2, 4, 7, 8, 3],
        ]
    )
    k, scale, border, pad = 4, 3, 2, 5
    path = plot_retrieval_grid(
        query,
        query_labels,
        gallery,
        gallery_labels,
        nn,
        tmp_path / "g.png",
        num_queries=3,
        k=k,
        query_indices=[0, 1, 3],
        scale=scale,
        border=border,
        pad=pad,
    )
    img = _rgb255(path)
    height, width, tile_h, tile_w, origin = grid_layout(
        (6, 5), 3, k, scale, border, pad
    )
    assert img.shape == (height, width, 3)
    assert (tile_h, tile_w) == (6 * 3 + 4, 5 * 3 + 4)
    for row, qi in enumerate([0, 1, 3]):
        y, x = origin(row, 0)
        assert tuple(img[y, x]) == QUERY_FRAME
        assert tuple(img[y + tile_h // 2, x + tile_w // 2]) == (qi * 60,) * 3
        for col in range(1, k + 1):
            gi = nn[qi, col - 1]
            want = GREEN if gallery_labels[gi] == query_labels[qi] else RED
            y, x = origin(row, col)
            for dy, dx in [(0, 0), (1, 1), (tile_h - 1, tile_w - 1), (tile_h // 2, 0)]:
                assert tuple(img[y + dy, x + dx]) == want, (row, col, dy, dx)
            center = img[y + tile_h // 2, x + tile_w // 2]
            assert tuple(center) == (gi * 20,) * 3
    # Row 0 (query 0, class 0): neighbours 0, 1, 4, 2 -> green, red, green, red.
    assert [tuple(img[origin(0, c)]) for c in range(1, 5)] == [GREEN, RED, GREEN, RED]
    assert _count(img, GREEN) > 0 and _count(img, RED) > 0


def test_retrieval_grid_image_formats_agree(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(6, 7, 7, 1)).astype(np.uint8)
    labels = np.array([0, 0, 1, 1, 2, 2])
    nn = np.tile(np.arange(6), (6, 1))
    variants = {
        "uint8_gray": gray,
        "uint8_hw": gray[..., 0],
        "float01": gray / 255.0,
        "float255": gray.astype(np.float32),
        "rgb": np.repeat(gray, 3, axis=-1),
    }
    pictures = {}
    for name, images in variants.items():
        path = plot_retrieval_grid(
            images,
            labels,
            images,
            labels,
            nn,
            tmp_path / f"{name}.png",
            num_queries=6,
            k=3,
        )
        pictures[name] = _rgb255(path)
    height, width, *_ = grid_layout((7, 7), 6, 3, scale=10, border=4, pad=4)
    for name, img in pictures.items():
        assert img.shape == (height, width, 3), name  # auto scale: 7 * 10 >= 64
        np.testing.assert_array_equal(img, pictures["uint8_gray"], err_msg=name)


def test_retrieval_grid_errors(tmp_path):
    images = np.zeros((4, 5, 5, 3), np.uint8)
    labels = np.arange(4)
    nn = np.zeros((4, 2), int)
    with pytest.raises(ValueError, match=r"must be \(4, >= k=3\); got shape \(4, 2\)"):
        plot_retrieval_grid(images, labels, images, labels, nn, tmp_path / "g.png", k=3)
    with pytest.raises(ValueError, match="4 query images but 3 query labels"):
        plot_retrieval_grid(
            images, labels[:3], images, labels, nn, tmp_path / "g.png", k=2
        )
    with pytest.raises(ValueError, match=r"got shape \(4, 5, 5, 2\)"):
        plot_retrieval_grid(
            images[..., :2], labels, images, labels, nn, tmp_path / "g.png", k=2
        )
    with pytest.raises(ValueError, match=r"lie in \[0, 4\); got values in \[0, 7\]"):
        plot_retrieval_grid(
            images, labels, images, labels, nn + [[0, 7]] * 4, tmp_path / "g.png", k=2
        )


_C2 = (0x2C, 0xA0, 0x2C)  # matplotlib's third and fourth default line colours
_C3 = (0xD6, 0x27, 0x28)


def test_feature_drift_one_line_per_dt_on_a_log_axis(tmp_path):
    from xbm_tf.plots import plot_feature_drift

    steps = range(10, 210, 10)
    series = [(s, dt, 0.5 * dt / s) for s in steps for dt in (10, 50, 100) if s >= dt]
    path = plot_feature_drift(series, tmp_path / "d" / "drift.png", dpi=80)
    img = _rgb255(path)
    assert img.shape == (320, 512, 3)
    for color in (_C0, _C1, _C2):  # three dt, three lines
        assert _count(img, color) > 100, color
    assert _count(img, _C3) == 0
    # The same series with one dt fewer draws one colour fewer.
    path = plot_feature_drift(
        [item for item in series if item[1] != 100], tmp_path / "two.png", dpi=80
    )
    img = _rgb255(path)
    assert _count(img, _C1) > 100 and _count(img, _C2) == 0


def test_feature_drift_axes(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from xbm_tf.plots import plot_feature_drift

    figures = []
    original = Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    series = [(10, 10, 0.2), (20, 10, 0.05), (20, 20, 0.3), (30, 10, 0.0)]
    plot_feature_drift(series, tmp_path / "drift.png")
    ax = figures[0].axes[0]
    assert ax.get_yscale() == "log"
    assert "iteration" in ax.get_xlabel() and "drift" in ax.get_ylabel()
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"dt = 10", "dt = 20"}
    # The zero drift cannot sit on a log axis: it is left out of the line.
    np.testing.assert_array_equal(lines["dt = 10"].get_xdata(), [10, 20])
    np.testing.assert_array_equal(lines["dt = 10"].get_ydata(), [0.2, 0.05])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dt = 10", "dt = 20"]
    # All zero (learning rate 0): a linear axis with the zeros drawn.
    plot_feature_drift([(10, 10, 0.0), (20, 10, 0.0)], tmp_path / "zero.png")
    assert figures[1].axes[0].get_yscale() == "linear"
    with pytest.raises(ValueError, match="`series` is empty"):
        plot_feature_drift([], tmp_path / "none.png")
    with pytest.raises(ValueError, match=r"\(step, dt, value\) triples; item 0"):
        plot_feature_drift([(1, 2)], tmp_path / "bad.png")


def test_retrieval_grid_without_labels_frames_results_neutral(tmp_path):
    from xbm_tf.plots import NEUTRAL

    query, gallery = _images(2, 60), _images(5, 20)
    nn = np.array([[0, 3, 4], [2, 1, 0]])
    path = plot_retrieval_grid(
        query, None, gallery, None, nn, tmp_path / "g.png", k=3, scale=2
    )
    img = _rgb255(path)
    _, _, tile_h, tile_w, origin = grid_layout((6, 5), 2, 3, 2, 4, 4)
    for row in range(2):
        assert tuple(img[origin(row, 0)]) == QUERY_FRAME
        for col in range(1, 4):
            y, x = origin(row, col)
            assert tuple(img[y, x]) == NEUTRAL
            center = img[y + tile_h // 2, x + tile_w // 2]
            assert tuple(center) == (nn[row, col - 1] * 20,) * 3
    assert _count(img, GREEN) == 0 and _count(img, RED) == 0


def _boxes_overlap(a, b):
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize(
    "results",
    [
        {  # the quickstart's: close curves, labels that used to overlap at K = 4, 8
            "before": {1: 0.8916, 2: 0.9403, 4: 0.9683, 8: 0.9844},
            "after": {1: 0.9656, 2: 0.9792, 4: 0.9867, 8: 0.9933},
        },
        {"a": {1: 0.5, 10: 0.5}, "b": {1: 0.5, 10: 0.501}, "c": {1: 0.499, 10: 0.5}},
    ],
)
def test_recall_curve_zooms_to_the_data_and_keeps_labels_apart(results):
    fig, labels = recall_curve_figure(results)
    renderer = fig.canvas.get_renderer()
    values = [v for _, v, _ in labels]
    low, high = fig.axes[0].get_ylim()
    assert low > 0 and low < min(values) and high > max(values)
    boxes = [text.get_window_extent(renderer) for _, _, text in labels]
    for i in range(len(boxes)):
        for j in range(i):
            assert not _boxes_overlap(boxes[i], boxes[j]), (labels[i], labels[j])
    # Every label stays inside the figure.
    figure_box = fig.bbox
    for box in boxes:
        assert figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1
        assert figure_box.y0 <= box.y0 and box.y1 <= figure_box.y1
