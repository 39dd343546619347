r"""Indexes a gallery with a trained model: one retrieval SavedModel (ScaNN inside).

  python scripts/index.py --flagfile configs/quickstart.flags \
      --model runs/quickstart/export --split test --output runs/quickstart/retrieval
  python scripts/index.py --flagfile configs/quickstart.flags \
      --model runs/quickstart/export --images my_photos/ --output runs/photos

--model is train.py's embedding export (workdir/export) or a .keras file. The
gallery is a split of the flagfile's dataset (--split: train and test, or for
In-Shop train, query and gallery) or every image under --images (searched
recursively; the ids are then the image paths). The images get the test
transform of the flagfile (--resize_size, --crop_size, --channels).

--output receives the SavedModel (`xbm_tf.load_retrieval_model(output)`, or
scripts/search.py), `index.json` (where the gallery came from and its
transform) and `projector/`, a TensorBoard Projector view of the gallery:
`tensorboard --logdir <output>/projector`. An existing --output is replaced only
with --overwrite, and only once the new one is complete.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
import evaluate  # noqa: E402  (--model and its check, shared with evaluate.py)
import keras  # noqa: E402
from absl import app, flags  # noqa: E402
from common import FlagError  # noqa: E402

import xbm_tf  # noqa: E402, F401  (registers the custom objects of .keras files)
from xbm_tf import data  # noqa: E402
from xbm_tf.export import (  # noqa: E402
    check_export_dir,
    load_exported_embedder,
    write_atomically,
)
from xbm_tf.retrieval import (  # noqa: E402
    INDEX_TYPES,
    embed_gallery,
    export_retrieval_model,
    write_projector,
)
from xbm_tf.retrieval.projector import sprite_thumbnail_size  # noqa: E402
from xbm_tf.retrieval.serving import tree_ah_options  # noqa: E402

SPLITS = ("train", "test", "query", "gallery")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")

_SPLIT = flags.DEFINE_enum(
    "split", None, SPLITS, "The dataset split to index (or --images)."
)
_IMAGES = flags.DEFINE_string(
    "images",
    None,
    "A folder of images to index (recursively); ids are their absolute paths.",
)
_OUTPUT = flags.DEFINE_string("output", None, "The retrieval SavedModel folder.")
_INDEX = flags.DEFINE_enum(
    "index", "brute_force", INDEX_TYPES, "brute_force (exact) or tree_ah (approx.)."
)
_SEARCH_K = flags.DEFINE_integer("search_k", 10, "Results per query in the export.")
_NUM_LEAVES = flags.DEFINE_integer("num_leaves", None, "tree_ah: partitions.")
_LEAVES_TO_SEARCH = flags.DEFINE_integer(
    "leaves_to_search", None, "tree_ah: partitions searched per query."
)
_REORDER = flags.DEFINE_integer(
    "reorder", None, "tree_ah: candidates re-scored exactly per query."
)
_SPRITE = flags.DEFINE_bool(
    "sprite", True, "Add the images' sprite to the Projector view."
)
flags.declare_key_flag("overwrite")  # listed by --help, not only --helpfull


def valid_splits(dataset: str) -> tuple[str, ...]:
    """The splits a dataset has (In-Shop: query/gallery; others: test)."""
    return ("train", "query", "gallery") if dataset == "inshop" else ("train", "test")


def list_images(folder: str) -> list[str]:
    """Absolute paths of the image files under `folder`, recursively, sorted.

    Absolute, since they become the gallery's ids: `search.py` then finds the
    results' images (for its grid) from any working directory.
    """
    found = []
    for root, _, files in os.walk(os.path.abspath(folder)):
        found += [
            os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_SUFFIXES)
        ]
    return sorted(found)


def check_index_flags() -> None:
    """Checks every flag before the model or the data are loaded."""
    common.require(evaluate._MODEL, _OUTPUT)
    if (_SPLIT.value is None) == (_IMAGES.value is None):
        raise FlagError("give exactly one of --split and --images")
    evaluate.check_model_path(evaluate._MODEL.value.rstrip("/"))
    if _SPLIT.value is not None:
        common.check_data_flags()
        splits = valid_splits(common.DATASET.value)
        if _SPLIT.value not in splits:
            raise FlagError(
                f"--split={_SPLIT.value} is not a split of --dataset="
                f"{common.DATASET.value}; choose one of {list(splits)}"
            )
    else:
        if not os.path.isdir(_IMAGES.value):
            raise FlagError(f"--images={_IMAGES.value} is not a folder")
        if not list_images(_IMAGES.value):
            raise FlagError(
                f"--images={_IMAGES.value} holds no {'/'.join(IMAGE_SUFFIXES)} files"
            )
    if _SEARCH_K.value < 1:
        raise FlagError(f"--search_k must be positive, got {_SEARCH_K.value}")
    try:
        check_export_dir(_OUTPUT.value, common.OVERWRITE.value)
    except FileExistsError as error:
        raise FlagError(f"--output: {error} (the flag is --overwrite)") from None


def load_model(path: str):
    """The embedding network behind --model (a SavedModel or a .keras file)."""
    if os.path.isdir(path):
        return load_exported_embedder(path)
    model = keras.models.load_model(path)
    return getattr(model, "embedding_model", model)


def gallery_set() -> tuple[data.ImageSet, dict]:
    """The images to index and a description of where they came from."""
    transform = {
        "resize_size": common.RESIZE.value,
        "crop_size": common.CROP.value,
        "channels": common.CHANNELS.value,
    }
    if _IMAGES.value is not None:
        paths = list_images(_IMAGES.value)
        images = common.screen(data.ImageSet(paths, [0] * len(paths), _IMAGES.value))
        return images, {"images": os.path.abspath(_IMAGES.value), **transform}
    splits = common.load_splits(screen=[_SPLIT.value])  # corrupt images skipped
    source = {
        "dataset": common.DATASET.value,
        "data_dir": common.DATA_DIR.value and os.path.abspath(common.DATA_DIR.value),
        "tfds": common.TFDS.value,
        "max_per_class": common.MAX_PER_CLASS.value,
        "split": _SPLIT.value,
    }
    return getattr(splits, _SPLIT.value), {**source, **transform}


def run() -> str:
    check_index_flags()
    output = os.path.abspath(_OUTPUT.value)
    model = load_model(evaluate._MODEL.value.rstrip("/"))
    images, source = gallery_set()
    if _SEARCH_K.value > len(images):
        raise FlagError(
            f"--search_k={_SEARCH_K.value} is larger than the gallery "
            f"({len(images)} images)"
        )
    if _INDEX.value == "tree_ah":
        try:
            tree_ah_options(
                len(images), _NUM_LEAVES.value, _LEAVES_TO_SEARCH.value, _REORDER.value
            )
        except ValueError as error:
            raise FlagError(f"tree_ah flags: {error}") from None
    print(f"Embedding {images.describe()}", flush=True)
    thumbnail = sprite_thumbnail_size(len(images)) if _SPRITE.value else None
    embeddings, labels, thumbnails = embed_gallery(
        model,
        common.make_eval_dataset(images),
        verbose=1,
        thumbnail_size=thumbnail,
        num_images=len(images),
    )
    ids = images.images if images.kind == "paths" else None
    metadata = {"id": ids if ids is not None else range(len(images))}
    if _SPLIT.value is not None:
        metadata["label"] = labels
    source.update(num_items=len(images), index=_INDEX.value, k=_SEARCH_K.value)

    def write(staging: str) -> None:
        export_retrieval_model(
            model,
            embeddings,
            staging,
            k=_SEARCH_K.value,
            ids=ids,
            index=_INDEX.value,
            num_leaves=_NUM_LEAVES.value,
            leaves_to_search=_LEAVES_TO_SEARCH.value,
            reorder=_REORDER.value,
        )
        write_projector(
            os.path.join(staging, "projector"), embeddings, metadata, thumbnails
        )
        with open(os.path.join(staging, "index.json"), "w") as f:
            json.dump(source, f, indent=2)

    write_atomically(output, write)
    print(
        f"Indexed {len(images)} images ({_INDEX.value}, top {_SEARCH_K.value}) into "
        f"{output}\nSearch it: python scripts/search.py --retrieval {output} "
        f"IMAGE...\nBrowse it: tensorboard --logdir {output}/projector",
        flush=True,
    )
    return output


def main(argv):
    common.main(argv, run)


if __name__ == "__main__":
    app.run(main)
