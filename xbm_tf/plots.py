"""Pictures of retrieval quality: a Recall@K curve and a query/neighbour grid.

Both functions draw off-screen with matplotlib's Agg canvas (no pyplot, no global
backend switch) and write a PNG whose pixel size is fixed by the arguments.
"""

from __future__ import annotations

import math
import numbers
import os
import re

import numpy as np

__all__ = [
    "grid_layout",
    "plot_ablation",
    "plot_feature_drift",
    "plot_recall_curve",
    "plot_retrieval_grid",
    "recall_curve_figure",
]

GREEN = (0, 200, 0)
RED = (220, 0, 0)
QUERY_FRAME = (40, 90, 220)
NEUTRAL = (150, 150, 150)
BACKGROUND = (255, 255, 255)
_RECALL_KEY = re.compile(r"(?:.*_)?recall@(\d+)")


def _curve_points(results, name: str) -> tuple[list[int], list[float]]:
    points = {}
    for key, value in results.items():
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):
            points[int(key)] = float(value)
        elif isinstance(key, str) and _RECALL_KEY.fullmatch(key):
            points[int(_RECALL_KEY.fullmatch(key).group(1))] = float(value)
    if not points:
        raise ValueError(
            f"{name} has no Recall@K values: expected int keys K or "
            f"'recall@K' keys; got keys {list(results)}."
        )
    ks = sorted(points)
    return ks, [points[k] for k in ks]


def _parents(path) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    return path


def _save(fig, path, dpi) -> str:
    """Lays out `fig` and writes it to `path` as a PNG; returns the path."""
    fig.tight_layout()
    path = _parents(path)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _recall_axis_limits(values: list[float]) -> tuple[float, float]:
    """Y limits (percent) zoomed to the data, with room for a label either side."""
    low, high = min(values), max(values)
    span = max(high - low, 1.0)  # at least one point of recall
    return max(0.0, low - 0.3 * span), high + 0.3 * span


def _place_value_labels(fig, ax, labels, gap_px: float = 2.0) -> None:
    """Moves value labels apart: at each K, label by label from the top down.

    `labels` holds `(k, value, annotation)`. At each K the highest value's label
    sits above its point and the others below theirs; a label that would overlap
    the one above it is pushed down until there is `gap_px` between them.
    """
    renderer = fig.canvas.get_renderer()
    by_k: dict[int, list] = {}
    for k, value, text in labels:
        by_k.setdefault(k, []).append((value, text))
    points_per_px = 72.0 / fig.dpi
    for column in by_k.values():
        column.sort(key=lambda item: -item[0])
        above = None
        for rank, (_, text) in enumerate(column):
            text.set_verticalalignment("bottom" if rank == 0 else "top")
            text.set_position((0, 6 if rank == 0 else -6))
            box = text.get_window_extent(renderer)
            if above is not None and box.y1 > above.y0 - gap_px:
                shift = (box.y1 - (above.y0 - gap_px)) * points_per_px
                x, y = text.get_position()
                text.set_position((x, y - shift))
                box = text.get_window_extent(renderer)
            above = box


def recall_curve_figure(
    results,
    title: str | None = None,
    figsize: tuple[float, float] = (6.4, 4.0),
    dpi: int = 100,
):
    """The matplotlib `Figure` that `plot_recall_curve` writes (same arguments).

    Returns:
        `(figure, labels)`: the figure, drawn on an Agg canvas, and its value
        labels as `(K, recall in percent, matplotlib Annotation)`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, NullLocator

    if not results:
        raise ValueError("`results` is empty.")
    if all(isinstance(v, dict) for v in results.values()):
        curves = {
            str(n): _curve_points(c, f"results[{n!r}]") for n, c in results.items()
        }
    else:
        curves = {None: _curve_points(results, "results")}

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    all_ks = sorted({k for ks, _ in curves.values() for k in ks})
    labels = []
    for name, (ks, values) in curves.items():
        percent = [100.0 * v for v in values]
        (line,) = ax.plot(ks, percent, marker="o", label=name)
        for k, v in zip(ks, percent):
            text = ax.annotate(
                f"{v:.1f}",
                (k, v),
                textcoords="offset points",
                xytext=(0, 6),
                ha="center",
                fontsize=8,
                color=line.get_color(),
            )
            labels.append((k, v, text))
    if all_ks[-1] > all_ks[0]:
        ax.set_xscale("log", base=2 if all_ks[-1] <= 64 else 10)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        # Room for the labels of the first and last K.
        ax.set_xlim(all_ks[0] / 1.25, all_ks[-1] * 1.25)
    ax.set_xticks(all_ks, [str(k) for k in all_ks])
    low, high = _recall_axis_limits([v for _, v, _ in labels])
    ax.set_ylim(low, high)
    # The top margin (room for labels) may pass 100%; no tick says more than 100.
    ax.set_yticks([t for t in ax.get_yticks() if low <= t <= 100.0])
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K (%), axis zoomed to the data")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if None not in curves:
        ax.legend(loc="best")
    fig.tight_layout()
    _place_value_labels(fig, ax, labels)
    return fig, labels


def plot_recall_curve(
    results,
    path,
    title: str | None = None,
    figsize: tuple[float, float] = (6.4, 4.0),
    dpi: int = 100,
) -> str:
    """Writes a Recall@K curve (log-scaled K axis, recall in percent) as a PNG.

    The recall axis is zoomed to the values (it does not start at 0), so that
    the gap between curves shows; each point carries its value, and at each K
    the labels of several curves are kept apart (the highest above its point,
    the others below theirs).

    Args:
        results: `{K: recall}` for one curve, or `{name: {K: recall}}` for
            several (e.g. before/after training). Keys may also be strings such
            as `"recall@1"` or `"val_recall@1"` (so the output of
            `retrieval_metrics` or `RetrievalEvaluation.evaluate` can be passed
            as is); other keys such as `"map@r"` are ignored. Recall in [0, 1].
        path: output PNG path; parent directories are created.
        title: figure title.
        figsize: figure size in inches; the PNG is `figsize * dpi` pixels.
        dpi: resolution.

    Returns:
        `path` as a string.

    Example:
    >>> plot_recall_curve({1: 0.62, 2: 0.74, 4: 0.83, 8: 0.89}, "r.png")
    'r.png'
    """
    fig, _ = recall_curve_figure(results, title=title, figsize=figsize, dpi=dpi)
    path = _parents(path)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _to_rgb_uint8(images, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"`{name}` must be (N, H, W), (N, H, W, 1) or (N, H, W, 3); got shape "
            f"{images.shape}."
        )
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
        low, high = float(images.min()), float(images.max())
        if low < 0.0:  # e.g. [-1, 1] preprocessing: rescale the array to [0, 1]
            images = (images - low) / max(high - low, 1e-12)
        elif high > 1.0:  # [0, 255]
            images = images / 255.0
        images = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def grid_layout(
    image_hw: tuple[int, int], rows: int, k: int, scale: int, border: int, pad: int
):
    """Pixel layout of `plot_retrieval_grid`: canvas size and tile origins.

    Returns:
        `(height, width, tile_h, tile_w, origin)` where `origin(row, col)` is the
        top-left pixel of a tile (frame included); column 0 is the query.
    """
    tile_h = image_hw[0] * scale + 2 * border
    tile_w = image_hw[1] * scale + 2 * border
    separator = 3 * pad

    def origin(row: int, col: int) -> tuple[int, int]:
        x = pad + col * (tile_w + pad) + (separator if col > 0 else 0)
        return pad + row * (tile_h + pad), x

    height = pad + rows * (tile_h + pad)
    width = pad + (k + 1) * (tile_w + pad) + separator
    return height, width, tile_h, tile_w, origin


def plot_retrieval_grid(
    query_images,
    query_labels,
    gallery_images,
    gallery_labels,
    neighbor_indices,
    path,
    num_queries: int = 8,
    k: int = 5,
    query_indices=None,
    scale: int | None = None,
    border: int = 4,
    pad: int = 4,
) -> str:
    """Writes a PNG grid: each row a query, then its top-`k` retrieved images.

    The query is framed blue; a retrieved image of the query's class is framed
    green, any other red (grey for all when the labels are unknown, `None`).
    The pixel layout is exact (see `grid_layout`): tiles of
    `H * scale + 2 * border` by `W * scale + 2 * border` pixels, `pad` pixels
    apart, with a wider gap after the query column.

    Args:
        query_images: `(Q, H, W)`, `(Q, H, W, 1)` or `(Q, H, W, 3)` images, uint8
            or float in [0, 1] or [0, 255] (float arrays with negative values are
            rescaled from their min-max range).
        query_labels: `(Q,)` labels, or `None` if unknown (e.g. a search).
        gallery_images: gallery images, same layout; for leave-one-out pass the
            query arrays again.
        gallery_labels: `(G,)` labels, or `None` if unknown.
        neighbor_indices: `(Q, >= k)` gallery indices by rank, e.g. from
            `xbm_tf.retrieval.nearest_neighbors`.
        path: output PNG path; parent directories are created.
        num_queries: rows to draw (at most Q).
        k: neighbours per row.
        query_indices: which queries to draw; default `num_queries` spread
            evenly over the query set (datasets are often sorted by class).
        scale: integer upsampling of each image; default makes tiles >= 64 px.
        border: frame width in pixels.
        pad: spacing in pixels.

    Returns:
        `path` as a string.

    Example:
    >>> imgs = np.random.rand(10, 8, 8)
    >>> nn = np.argsort(np.random.rand(10, 10), axis=1)
    >>> plot_retrieval_grid(imgs, np.arange(10) % 2, imgs, np.arange(10) % 2, nn,
    ...                     "grid.png", num_queries=3, k=4)
    'grid.png'
    """
    from matplotlib.image import imsave

    queries = _to_rgb_uint8(query_images, "query_images")
    gallery = _to_rgb_uint8(gallery_images, "gallery_images")
    labelled = query_labels is not None and gallery_labels is not None
    if not labelled:  # Unknown labels: every frame is neutral.
        query_labels = np.full(len(queries), -1)
        gallery_labels = np.full(len(gallery), -2)
    query_labels = np.asarray(query_labels).reshape(-1)
    gallery_labels = np.asarray(gallery_labels).reshape(-1)
    nn = np.asarray(neighbor_indices)
    if len(query_labels) != len(queries):
        raise ValueError(
            f"{len(queries)} query images but {len(query_labels)} query labels."
        )
    if len(gallery_labels) != len(gallery):
        raise ValueError(
            f"{len(gallery)} gallery images but {len(gallery_labels)} gallery labels."
        )
    if nn.ndim != 2 or nn.shape[0] != len(queries) or nn.shape[1] < k:
        raise ValueError(
            f"`neighbor_indices` must be ({len(queries)}, >= k={k}); got shape "
            f"{nn.shape}."
        )
    if k < 1 or num_queries < 1:
        raise ValueError(f"`k` and `num_queries` must be >= 1; got {k}, {num_queries}.")
    if query_indices is None:
        rows = min(num_queries, len(queries))
        query_indices = np.unique(np.linspace(0, len(queries) - 1, rows).round())
    query_indices = np.asarray(query_indices, dtype=np.int64).reshape(-1)
    if query_indices.min() < 0 or query_indices.max() >= len(queries):
        raise ValueError(
            f"`query_indices` must lie in [0, {len(queries)}); got "
            f"{query_indices.tolist()}."
        )
    shown = nn[query_indices, :k]
    if shown.min() < 0 or shown.max() >= len(gallery):
        raise ValueError(
            f"`neighbor_indices` must lie in [0, {len(gallery)}); got values in "
            f"[{shown.min()}, {shown.max()}]."
        )

    h = max(queries.shape[1], gallery.shape[1])
    w = max(queries.shape[2], gallery.shape[2])
    if scale is None:
        scale = max(1, math.ceil(64 / min(h, w)))
    height, width, _, _, origin = grid_layout(
        (h, w), len(query_indices), k, scale, border, pad
    )
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = BACKGROUND

    def put(image, row, col, color):
        y, x = origin(row, col)
        inner_h, inner_w = h * scale + 2 * border, w * scale + 2 * border
        canvas[y : y + inner_h, x : x + inner_w] = color
        big = image.repeat(scale, axis=0).repeat(scale, axis=1)
        top = y + border + (h - image.shape[0]) * scale // 2
        left = x + border + (w - image.shape[1]) * scale // 2
        canvas[y + border : y + inner_h - border, x + border : x + inner_w - border] = (
            BACKGROUND
        )
        canvas[top : top + big.shape[0], left : left + big.shape[1]] = big

    for row, qi in enumerate(query_indices):
        put(queries[qi], row, 0, QUERY_FRAME)
        for col, gi in enumerate(shown[row], start=1):
            hit = gallery_labels[gi] == query_labels[qi]
            color = (GREEN if hit else RED) if labelled else NEUTRAL
            put(gallery[gi], row, col, color)
    path = _parents(path)
    imsave(path, canvas, format="png")
    return path


def _drift_curves(series) -> dict[int, tuple[list[int], list[float]]]:
    curves: dict[int, tuple[list[int], list[float]]] = {}
    for n, item in enumerate(series):
        if len(item) != 3:
            raise ValueError(
                f"`series` must hold (step, dt, value) triples; item {n} is {item!r}."
            )
        step, dt, value = item
        steps, values = curves.setdefault(int(dt), ([], []))
        steps.append(int(step))
        values.append(float(value))
    if not curves:
        raise ValueError("`series` is empty: no drift was measured.")
    return dict(sorted(curves.items()))


def plot_feature_drift(
    series,
    path,
    title: str | None = "Feature drift",
    figsize: tuple[float, float] = (6.4, 4.0),
    dpi: int = 100,
) -> str:
    """Writes the feature drift against the iteration as a PNG (paper's Fig. 3).

    One line per `dt`, drift on a log y axis. Values that are not positive
    (drift exactly 0) cannot sit on a log axis and are left out of the line;
    if no value is positive the axis is linear.

    Args:
        series: `(step, dt, value)` triples, e.g. `FeatureDrift.series`.
        path: output PNG path; parent directories are created.
        title: figure title, or None.
        figsize: figure size in inches; the PNG is `figsize * dpi` pixels.
        dpi: resolution.

    Returns:
        `path` as a string.

    Example:
    >>> plot_feature_drift([(10, 10, 0.5), (20, 10, 0.1), (20, 20, 0.4)],
    ...                    "drift.png")
    'drift.png'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = _drift_curves(series)
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    positive = any(v > 0 for _, values in curves.values() for v in values)
    for dt, (steps, values) in curves.items():
        steps, values = np.asarray(steps), np.asarray(values)
        if positive:
            keep = values > 0
            steps, values = steps[keep], values[keep]
        marker = "o" if len(steps) < 30 else None
        ax.plot(steps, values, marker=marker, markersize=3, label=f"dt = {dt}")
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("iteration (optimizer step)")
    ax.set_ylabel("feature drift D(x, t; dt)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi)


def plot_ablation(
    summary,
    path,
    metrics: tuple[str, ...] = ("recall@1", "map@r"),
    title: str | None = None,
    dpi: int = 100,
) -> str:
    """Writes the paper's Fig. 1 for a memory ablation as a PNG.

    The first row has one panel per metric against the batch size (log-2 axis):
    one line without memory and one with memory per memory size, with error bars
    of one standard deviation over seeds. When the runs with memory have more than
    one memory size, a second row shows each metric against the memory size (log-2
    axis) at the smallest batch size, with the no-memory value at that batch size
    as a dashed line.

    Args:
        summary: the output of `xbm_tf.ablation.aggregate(rows, metrics)`: dicts
            with `condition`, `batch_size`, `memory_size` and `<metric>_mean`,
            `<metric>_std` (NaN std draws no error bar). Values in [0, 1].
        path: output PNG path; parent directories are created.
        metrics: the metrics to draw, one column of panels each.
        title: figure title.
        dpi: resolution; the PNG is `(4.2 * len(metrics)) x (3.4 * rows)` inches.

    Returns:
        `path` as a string.

    Example:
    >>> s = [dict(condition=c, batch_size=b, memory_size=m,
    ...           **{"recall@1_mean": v, "recall@1_std": 0.01})
    ...      for c, b, m, v in [("without memory", 16, 0, 0.5),
    ...                         ("with memory", 16, 64, 0.6)]]
    >>> plot_ablation(s, "ablation.png", metrics=("recall@1",))
    'ablation.png'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, NullLocator

    summary = list(summary)
    if not summary:
        raise ValueError("`summary` is empty.")
    missing = [
        f"{m}_mean" for m in metrics if any(f"{m}_mean" not in s for s in summary)
    ]
    if missing:
        raise ValueError(f"`summary` entries lack {sorted(set(missing))}.")
    with_memory = [s for s in summary if s["condition"] == "with memory"]
    without = [s for s in summary if s["condition"] == "without memory"]
    memory_sizes = sorted({int(s["memory_size"]) for s in with_memory})
    rows = 2 if len(memory_sizes) > 1 else 1
    fig = Figure(figsize=(4.2 * len(metrics), 3.4 * rows), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, len(metrics), squeeze=False)

    def draw(ax, entries, x_key, metric, **style):
        entries = sorted(entries, key=lambda s: s[x_key])
        xs = [s[x_key] for s in entries]
        ys = [100.0 * s[f"{metric}_mean"] for s in entries]
        errors = [100.0 * s.get(f"{metric}_std", math.nan) for s in entries]
        errors = [0.0 if math.isnan(e) else e for e in errors]
        ax.errorbar(xs, ys, yerr=errors, capsize=3, marker="o", **style)

    def log2_axis(ax, values, label):
        values = sorted(set(values))
        if values[-1] > values[0]:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(values, [str(v) for v in values])
        ax.set_xlabel(label)
        ax.grid(True, alpha=0.3)

    smallest = min(s["batch_size"] for s in summary)
    for column, metric in enumerate(metrics):
        name = metric.replace("recall@", "R@").replace("map@r", "MAP@R")
        ax = axes[0, column]
        if without:
            draw(ax, without, "batch_size", metric, label="without memory")
        for size in memory_sizes:
            label = "with memory" + (f" (M={size})" if len(memory_sizes) > 1 else "")
            entries = [s for s in with_memory if s["memory_size"] == size]
            draw(ax, entries, "batch_size", metric, label=label)
        log2_axis(ax, [s["batch_size"] for s in summary], "batch size")
        ax.set_ylabel(f"{name} (%)")
        ax.legend(fontsize=8)
        if rows == 2:
            ax = axes[1, column]
            at_batch = [s for s in with_memory if s["batch_size"] == smallest]
            draw(ax, at_batch, "memory_size", metric, label="with memory", color="C1")
            base = [s for s in without if s["batch_size"] == smallest]
            if base:
                ax.axhline(
                    100.0 * base[0][f"{metric}_mean"],
                    color="C0",
                    linestyle="--",
                    label="without memory",
                )
            log2_axis(ax, [s["memory_size"] for s in at_batch], "memory size M")
            ax.set_title(f"batch {smallest}", fontsize=9)
            ax.set_ylabel(f"{name} (%)")
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi)
