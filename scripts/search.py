r"""Searches a gallery indexed by scripts/index.py with query images.

  python scripts/search.py --retrieval runs/quickstart/retrieval query1.png q2.png

Prints each query's top-K gallery ids and scores (and each result's class when
the gallery is a dataset split: its name, e.g. "digit 3" for the quickstart,
else its class id), and writes a PNG grid (one row per query: the query framed
blue, then its results, captioned with their classes) to --grid (default:
`search_results.png` inside --retrieval). A search can be run again: it
replaces a grid that search.py wrote (the PNG carries a tag saying so); any
other file at --grid is replaced only with --overwrite. The grid shows the
results' images when the ids are image paths (a gallery indexed with --images,
or a dataset of files) or when index.json names the dataset split the gallery
came from. The queries get the gallery's test transform, read from index.json.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from common import FlagError  # noqa: E402
from PIL import Image, ImageDraw, PngImagePlugin  # noqa: E402

from xbm_tf import data, plots  # noqa: E402
from xbm_tf.retrieval import load_retrieval_model  # noqa: E402

_RETRIEVAL = flags.DEFINE_string(
    "retrieval", None, "A retrieval SavedModel folder written by scripts/index.py."
)
_GRID = flags.DEFINE_string(
    "grid",
    None,
    "The PNG grid of results (default: search_results.png inside --retrieval). "
    "A grid that search.py wrote is replaced by a new search; any other file "
    "only with --overwrite.",
)
_SHOW = flags.DEFINE_integer("show", 8, "Results per query in the grid.")
flags.declare_key_flag("overwrite")  # listed by --help, not only --helpfull

# The PNG text chunk that marks a grid as search.py's own output.
GRID_TAG = ("Software", "xbm_tf scripts/search.py")


def written_by_search(path: str) -> bool:
    """True if `path` is a PNG that search.py wrote (it carries GRID_TAG)."""
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and (
                image.text.get(GRID_TAG[0]) == GRID_TAG[1]
            )
    except (OSError, ValueError, SyntaxError):
        return False


def check_search_flags(queries: list[str]) -> tuple[str, str]:
    """Checks the flags and the query files; returns (retrieval dir, grid path)."""
    common.require(_RETRIEVAL)
    path = os.path.abspath(_RETRIEVAL.value.rstrip("/"))
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise FlagError(
            f"--retrieval={_RETRIEVAL.value} is not a SavedModel folder; write one "
            "with scripts/index.py"
        )
    if not queries:
        raise FlagError("give one or more query images after the flags")
    missing = [q for q in queries if not os.path.isfile(q)]
    if missing:
        raise FlagError(f"query images not found: {', '.join(missing)}")
    if _SHOW.value < 1:
        raise FlagError(f"--show must be positive, got {_SHOW.value}")
    grid = os.path.abspath(_GRID.value or os.path.join(path, "search_results.png"))
    if os.path.isdir(grid):
        raise FlagError(f"--grid={grid} is a folder; name a PNG file")
    if (
        os.path.exists(grid)
        and not written_by_search(grid)
        and not common.OVERWRITE.value
    ):
        raise FlagError(
            f"--grid={grid} exists and is not a grid written by search.py: pass "
            "--overwrite to replace it, or choose another --grid"
        )
    return path, grid


def read_source(path: str, input_shape) -> dict:
    """index.json, or a plain resize-and-crop to the model's input size."""
    try:
        with open(os.path.join(path, "index.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        if input_shape[0] is None:
            raise FlagError(
                f"{path} has no index.json and takes any image size: cannot tell "
                "the query transform"
            ) from None
        height, _, channels = input_shape
        return {"resize_size": height, "crop_size": height, "channels": channels}


def load_images(image_set: data.ImageSet, source: dict) -> np.ndarray:
    """The images with the gallery's test transform, float32 in [0, 255]."""
    batches = data.eval_dataset(
        image_set,
        batch_size=64,
        resize_size=source["resize_size"],
        crop_size=source["crop_size"],
        channels=source["channels"],
    )
    return np.concatenate([np.asarray(images) for images, _ in batches])


def gallery_split(source: dict) -> data.ImageSet | None:
    """The dataset split the gallery was indexed from (index.json), or None.

    None for a folder of images (--images) and for TensorFlow Datasets
    galleries, whose images are not read back.
    """
    if "split" not in source or source.get("tfds"):
        return None
    loader = common.LOADERS[source["dataset"]]
    return getattr(loader(source["data_dir"], source["max_per_class"]), source["split"])


def free_slots(ids: np.ndarray) -> np.ndarray:
    """Where an approximate index left a slot free (id -1 or "")."""
    return ids == ("" if ids.dtype == object else -1)


def split_rows(ids: np.ndarray, split: data.ImageSet) -> np.ndarray:
    """The rows of `split` that the ids name (-1 for a free slot).

    The ids are row numbers, or image paths for a dataset of files.
    """
    free = free_slots(ids)
    rows = np.full(ids.shape, -1, np.int64)
    if ids.dtype == object:
        row_of = {path: row for row, path in enumerate(split.images)}
        rows[~free] = [row_of[i] for i in ids[~free]]
    else:
        rows[~free] = ids[~free]
    return rows


def class_names(ids: np.ndarray, source: dict, split) -> np.ndarray | None:
    """`(Q, K)` class names of the results ("" for a free slot), or None.

    Known when the gallery is a dataset split: the dataset's class names where
    it has them (the quickstart's "digit 3", "zebra"), else "class <id>".
    """
    if split is None:
        return None
    rows = split_rows(ids, split)
    labels = np.asarray(split.labels)[np.maximum(rows, 0)]
    if source["dataset"] == "quickstart":
        names = [data.QUICKSTART_CLASS_NAMES[int(c)] for c in labels.reshape(-1)]
    else:
        names = [f"class {int(c)}" for c in labels.reshape(-1)]
    out = np.asarray(names, dtype=object).reshape(ids.shape)
    out[rows < 0] = ""
    return out


def result_images(ids: np.ndarray, source: dict, split=None):
    """`(images of the unique result ids, (Q, K) positions)` or None.

    A free slot of an approximate index (id -1 or "": its searched leaves held
    fewer than k items) shows as a blank image, the last one. `split` is the
    dataset split of a gallery of row numbers (`gallery_split`).
    """
    free = free_slots(ids)
    unique, positions = np.unique(ids[~free], return_inverse=True)
    if not len(unique):
        return None
    if unique.dtype == object:
        if not all(os.path.isfile(p) for p in unique):
            return None
        files = data.ImageSet(list(unique), [0] * len(unique))
        images = load_images(files, source)
    elif split is None:
        return None
    else:
        images = load_images(split.subset(unique), source)
    at = np.full(ids.shape, len(unique), np.int64)  # free slots: the blank image
    at[~free] = positions
    blank = np.zeros((1, *images.shape[1:]), images.dtype)
    return np.concatenate([images, blank]), at


def write_grid(queries, gallery, positions, names, path: str, k: int) -> None:
    """The grid PNG, each result captioned with its class, tagged as ours."""
    plots.plot_retrieval_grid(
        queries, None, gallery, None, positions, path, num_queries=len(queries), k=k
    )
    image = Image.open(path).convert("RGB")
    if names is not None:
        h, w = gallery.shape[1:3]
        scale = max(1, -(-64 // min(h, w)))  # plot_retrieval_grid's default
        *_, tile_h, _, origin = plots.grid_layout((h, w), len(queries), k, scale, 4, 4)
        draw = ImageDraw.Draw(image)
        for row in range(len(queries)):
            for col in range(k):
                if names[row, col]:
                    y, x = origin(row, col + 1)
                    box = draw.textbbox((x + 5, y + tile_h - 17), names[row, col])
                    draw.rectangle(box, fill=(0, 0, 0))
                    draw.text((x + 5, y + tile_h - 17), names[row, col], fill="white")
    info = PngImagePlugin.PngInfo()
    info.add_text(*GRID_TAG)
    image.save(path, format="PNG", pnginfo=info)


def run(queries: list[str]) -> dict[str, np.ndarray]:
    path, grid = check_search_flags(queries)
    try:
        model = load_retrieval_model(path)
    except ImportError as error:
        raise FlagError(str(error)) from None
    source = read_source(path, model.input_shape)
    images = load_images(data.ImageSet(queries, [0] * len(queries)), source)
    out = model(images)
    split = gallery_split(source)
    names = class_names(np.asarray(out["ids"]), source, split)
    for q, (query, ids, scores) in enumerate(zip(queries, out["ids"], out["scores"])):
        print(f"{query}", flush=True)
        for rank, (i, score) in enumerate(zip(ids, scores), start=1):
            name = f"  {names[q, rank - 1]}" if names is not None else ""
            print(f"  {rank:3d}  {score:8.4f}  {i}{name}", flush=True)
    show = min(_SHOW.value, model.k)
    found = result_images(out["ids"][:, :show], source, split)
    if found is None:
        print(
            "No grid: the ids are not image files and index.json names no dataset "
            "split to read the results from (TensorFlow Datasets galleries are not "
            "read back)",
            flush=True,
        )
        return out
    gallery, positions = found
    shown = None if names is None else names[:, :show]
    write_grid(images, gallery, positions, shown, grid, show)
    print(f"Wrote {grid}", flush=True)
    return out


def main(argv):
    common.quiet_tensorflow()
    try:
        run(list(argv[1:]))
    except (FlagError, data.DatasetLayoutError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    app.run(main, argv=sys.argv)
