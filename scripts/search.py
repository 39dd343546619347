r"""Searches a gallery indexed by scripts/index.py with query images.

  python scripts/search.py --retrieval runs/quickstart/retrieval query1.png q2.png

Prints each query's top-K gallery ids and scores, and writes a PNG grid (one
row per query: the query framed blue, then its results) to --grid (default:
`search_results.png` beside --retrieval). The grid shows the results' images
when the ids are image paths (a gallery indexed with --images, or a dataset
of files) or when index.json names the dataset split the gallery came from.
The queries get the gallery's test transform, read from index.json.
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

from xbm_tf import data, plots  # noqa: E402
from xbm_tf.retrieval import load_retrieval_model  # noqa: E402

_RETRIEVAL = flags.DEFINE_string(
    "retrieval", None, "A retrieval SavedModel folder written by scripts/index.py."
)
_GRID = flags.DEFINE_string(
    "grid", None, "The PNG grid of results (default: beside --retrieval)."
)
_SHOW = flags.DEFINE_integer("show", 8, "Results per query in the grid.")


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
    grid = _GRID.value or os.path.join(os.path.dirname(path), "search_results.png")
    if os.path.exists(grid) and not common.OVERWRITE.value:
        raise FlagError(f"--grid={grid} exists: pass --overwrite to replace it")
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


def result_images(ids: np.ndarray, source: dict):
    """`(images of the unique result ids, (Q, K) positions)` or None.

    A free slot of an approximate index (id -1 or "": its searched leaves held
    fewer than k items) shows as a blank image, the last one.
    """
    free = ids == ("" if ids.dtype == object else -1)
    unique, positions = np.unique(ids[~free], return_inverse=True)
    if not len(unique):
        return None
    if unique.dtype == object:
        if not all(os.path.isfile(p) for p in unique):
            return None
        files = data.ImageSet(list(unique), [0] * len(unique))
        images = load_images(files, source)
    elif "split" not in source or source.get("tfds"):
        return None
    else:
        loader = common.LOADERS[source["dataset"]]
        splits = loader(source["data_dir"], source["max_per_class"])
        images = load_images(getattr(splits, source["split"]).subset(unique), source)
    at = np.full(ids.shape, len(unique), np.int64)  # free slots: the blank image
    at[~free] = positions
    blank = np.zeros((1, *images.shape[1:]), images.dtype)
    return np.concatenate([images, blank]), at


def run(queries: list[str]) -> dict[str, np.ndarray]:
    path, grid = check_search_flags(queries)
    try:
        model = load_retrieval_model(path)
    except ImportError as error:
        raise FlagError(str(error)) from None
    source = read_source(path, model.input_shape)
    images = load_images(data.ImageSet(queries, [0] * len(queries)), source)
    out = model(images)
    for query, ids, scores in zip(queries, out["ids"], out["scores"]):
        print(f"{query}", flush=True)
        for rank, (i, score) in enumerate(zip(ids, scores), start=1):
            print(f"  {rank:3d}  {score:8.4f}  {i}", flush=True)
    show = min(_SHOW.value, model.k)
    found = result_images(out["ids"][:, :show], source)
    if found is None:
        print(
            "No grid: the ids are not image files and index.json names no dataset "
            "split to read the results from (TensorFlow Datasets galleries are not "
            "read back)",
            flush=True,
        )
        return out
    gallery, positions = found
    plots.plot_retrieval_grid(
        images, None, gallery, None, positions, grid, num_queries=len(queries), k=show
    )
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
