"""A retrieval SavedModel: the embedding network and a ScaNN index in one export.

`export_retrieval_model` embeds a gallery (or takes its embeddings), builds a
ScaNN index over it and writes one SavedModel holding the network, the index
and the gallery ids. Its signatures:

* `serving_default`: `images` float32 `(B, H, W, C)` in [0, 255], any B ->
  `ids (B, k)` (string or int64), `scores (B, k)` float32 dot products and
  `embeddings (B, D)`.
* `search_embeddings`: `embeddings` float32 `(B, D)` -> `ids`, `scores`.
* `index_info`: no input -> `k`, `index` and `num_items`.

The graph checks its input, so every client (TensorFlow Serving,
`saved_model_cli`, `load_retrieval_model`) gets the checks: an image with a NaN
or infinite pixel, and a query embedding (given, or computed from an image)
that is not finite or is all zeros, are an `InvalidArgumentError` naming the
input and its first bad row. An empty batch returns outputs with 0 rows, without
running the network or the index; otherwise each query row gives one output row.

Results are ordered by decreasing score, equal scores by increasing gallery
row, with the scores computed in float64: the canonical order of
`xbm_tf.retrieval.engines`. A `"brute_force"` index returns what
`xbm_tf.retrieval.nearest_neighbors(..., backend="exact")` returns, ties and
near-duplicates included: ScaNN brute force finds `k + 16` float32 candidates,
they are re-scored in float64 and re-sorted by (score, row), and rows where the
float32 rounding band around the k-th score reaches the last candidate (a group
ScaNN may have cut) are searched again over the whole gallery in TensorFlow.
Scores are the float64 dot products rounded to float32. A `"tree_ah"` index
(k-means tree, asymmetric hashing, exact float32 reordering) is approximate;
its candidates are ordered in the same way. A query whose search finds fewer
than k items (only possible with `"tree_ah"`) gets id -1 (or "") and score -inf
in the free slots.

The SavedModel uses ScaNN's TensorFlow ops: `import scann` before loading it
(`load_retrieval_model` does). Stock TensorFlow Serving cannot load it; serve
the embedding-only export (`xbm_tf.export_embedding_model`) there instead.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os

import keras
import numpy as np
import tensorflow as tf

from xbm_tf import export as export_lib
from xbm_tf.retrieval import inputs
from xbm_tf.retrieval.callback import embed_dataset

__all__ = [
    "INDEX_TYPES",
    "RetrievalModel",
    "embed_gallery",
    "export_retrieval_model",
    "load_retrieval_model",
    "tree_ah_options",
]

INDEX_TYPES = ("brute_force", "tree_ah")
# Extra brute-force candidates, so that near-ties across the k-th place are seen.
_TIE_MARGIN = 16
_SCANN_MISSING = (
    "The retrieval SavedModel searches with ScaNN's TensorFlow ops: install them "
    "with `pip install scann[tf]` (scann 1.4.2 for TensorFlow 2.20), or serve the "
    "embedding-only export (xbm_tf.export_embedding_model) instead."
)


def _scann_ops():
    """scann's TensorFlow ops module; importing scann registers the ops."""
    try:
        import scann  # noqa: F401

        return importlib.import_module("scann.scann_ops.py.scann_ops")
    except ImportError as error:
        raise ImportError(_SCANN_MISSING) from error


# ------------------------------------------------------------ embedding network
class _Network:
    """A Keras model or an embedding export, seen as `images -> embeddings`."""

    def __init__(self, model):
        signature = getattr(model, "signature", None)  # load_exported_embedder
        if signature is None and hasattr(model, "signatures"):  # saved_model.load
            signature = model.signatures.get("serving_default")
        if isinstance(model, keras.Model):
            if isinstance(getattr(model, "embedding_model", None), keras.Model):
                raise ValueError(
                    f"Model {model.name!r} wraps an embedding model (e.g. an "
                    "XBMContrastiveModel); pass its `.embedding_model`."
                )
            if not model.inputs or len(model.inputs) != 1:
                raise ValueError(
                    f"Model {model.name!r} must have exactly one image input."
                )
            self.trackable = model
            self.input_shape = tuple(model.inputs[0].shape[1:])
            self.input_dtype = tf.float32
            self.dim = model.outputs[0].shape[-1]
            self._fn = lambda images: model(images, training=False)
        elif signature is not None:
            inputs = signature.structured_input_signature[1]
            outputs = signature.structured_outputs
            if export_lib.INPUT_KEY not in inputs or (
                export_lib.OUTPUT_KEY not in outputs
            ):
                raise ValueError(
                    "The embedding SavedModel's serving_default must map "
                    f"{export_lib.INPUT_KEY!r} to {export_lib.OUTPUT_KEY!r}; got "
                    f"{sorted(inputs)} -> {sorted(outputs)}."
                )
            spec = inputs[export_lib.INPUT_KEY]
            self.trackable = getattr(model, "saved_model", model)
            self.input_shape = tuple(spec.shape[1:])
            self.input_dtype = spec.dtype
            self.dim = outputs[export_lib.OUTPUT_KEY].shape[-1]
            self._fn = lambda images: signature(**{export_lib.INPUT_KEY: images})[
                export_lib.OUTPUT_KEY
            ]
        else:
            raise ValueError(
                "`embedding_model` must be a keras.Model or an embedding export "
                "(load_exported_embedder(path) or tf.saved_model.load(path)); got "
                f"{type(model).__name__}."
            )
        if len(self.input_shape) != 3:
            raise ValueError(
                f"The embedding model's input must be images (batch, H, W, C); got "
                f"(batch, *{self.input_shape})."
            )

    def __call__(self, images):
        """float32 images in [0, 255] -> float32 embeddings (graph or eager).

        An empty batch gives `(0, dim)` embeddings without running the network.
        """
        images = tf.convert_to_tensor(images, tf.float32)
        if self.input_dtype != tf.float32:
            images = tf.cast(tf.round(tf.clip_by_value(images, 0, 255)), tf.uint8)
        return export_lib.embed_batch(self._fn, images, self.dim)


class _Embedder:
    """`predict_on_batch` for `embed_dataset`, with a progress bar and thumbnails."""

    def __init__(self, network, total, verbose, thumbnail_size):
        self.network = network
        self.thumbnail_size = thumbnail_size
        self.thumbnails = []
        self.seen = 0
        self.progbar = None
        if verbose:
            self.progbar = keras.utils.Progbar(total, unit_name="image")

    def predict_on_batch(self, images):
        images = tf.convert_to_tensor(images, tf.float32)
        if self.thumbnail_size:
            side = self.thumbnail_size
            small = tf.image.resize(images, (side, side), antialias=True)
            small = tf.cast(tf.round(tf.clip_by_value(small, 0, 255)), tf.uint8)
            self.thumbnails.append(small.numpy())
        embeddings = self.network(images).numpy()
        self.seen += len(embeddings)
        if self.progbar is not None:
            self.progbar.update(self.seen)
        return embeddings


def embed_gallery(
    embedding_model,
    images,
    batch_size: int = 256,
    verbose: int = 0,
    thumbnail_size: int | None = None,
    num_images: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Embeds gallery images with a Keras model or an embedding export.

    Args:
        embedding_model: a `keras.Model` mapping images in [0, 255] to
            embeddings, or an export loaded with
            `xbm_tf.export.load_exported_embedder` / `tf.saved_model.load`.
        images: a `tf.data.Dataset` yielding image batches or
            `(images, labels, ...)` batches, or an array `(N, H, W, C)`.
        batch_size: batch size for an array.
        verbose: 1 shows a progress bar (images embedded).
        thumbnail_size: if set, also returns every image resized to this side
            (uint8), e.g. for a TensorBoard Projector sprite.
        num_images: the number of images a dataset yields: the progress bar's
            total (a dataset's size is not known before it is read).

    Returns:
        `(embeddings, labels, thumbnails)`: float32 `(N, D)`; the labels `(N,)`
        if the dataset yields them, else None; uint8 `(N, s, s, C)` or None.

    Example:
        >>> from xbm_tf import build_embedding_model
        >>> model = build_embedding_model("tiny", 8, input_shape=(28, 28, 1))
        >>> emb, labels, _ = embed_gallery(model, np.zeros((3, 28, 28, 1)))
        >>> emb.shape, labels
        ((3, 8), None)
    """
    network = embedding_model if isinstance(embedding_model, _Network) else None
    network = network or _Network(embedding_model)
    has_labels = True
    if isinstance(images, tf.data.Dataset):
        spec = images.element_spec
        total = num_images
        if not isinstance(spec, (tuple, list)):
            has_labels = False
            images = images.map(lambda x: (x, tf.zeros(tf.shape(x)[:1], tf.int64)))
    else:
        array = np.asarray(images)
        if array.ndim != 4:
            raise ValueError(
                "`images` must be a tf.data.Dataset or an (N, H, W, C) array; got "
                f"an array of shape {array.shape}."
            )
        total, has_labels = len(array), False
        images = tf.data.Dataset.from_tensor_slices(array.astype(np.float32))
        images = images.batch(batch_size).map(
            lambda x: (x, tf.zeros(tf.shape(x)[:1], tf.int64))
        )
    embedder = _Embedder(network, total, verbose, thumbnail_size)
    embeddings, labels = embed_dataset(embedder, images)
    if embedder.progbar is not None and total is None:
        embedder.progbar.target = embedder.seen
        embedder.progbar.update(embedder.seen, finalize=True)
    thumbnails = np.concatenate(embedder.thumbnails) if thumbnail_size else None
    return embeddings, labels if has_labels else None, thumbnails


# ------------------------------------------------------------------ validation
def _check_k(k, num_items: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"`k` must be a positive integer; got {k!r}.")
    if k > num_items:
        raise ValueError(f"k={k} is larger than the gallery ({num_items} items).")
    return int(k)


def _check_ids(ids, num_items: int) -> np.ndarray:
    """The ids as an int64 or a `str` array of `num_items` entries."""
    if ids is None:
        return np.arange(num_items, dtype=np.int64)
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"`ids` must be 1-D; got shape {ids.shape}.")
        if np.issubdtype(ids.dtype, np.integer):
            ids = ids.astype(np.int64)
        elif ids.dtype.kind in "US":
            ids = ids.astype(str)
        elif ids.dtype != object:
            raise ValueError(
                f"`ids` must be strings or integers; got an array of {ids.dtype}."
            )
    items = list(ids)
    if len(items) != num_items:
        raise ValueError(
            f"`ids` has {len(items)} entries but the gallery has {num_items} items."
        )
    if all(isinstance(i, (str, bytes)) for i in items):
        return np.asarray([i if isinstance(i, str) else i.decode() for i in items])
    if all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in items):
        return np.asarray(items, dtype=np.int64)
    kinds = sorted({type(i).__name__ for i in items})
    raise ValueError(f"`ids` must be all strings or all integers; got {kinds}.")


def _check_embeddings(gallery: np.ndarray, dim) -> np.ndarray:
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    if gallery.ndim != 2 or gallery.shape[0] == 0:
        raise ValueError(
            f"The gallery embeddings must be a non-empty (N, D) array; got shape "
            f"{gallery.shape}."
        )
    if dim is not None and gallery.shape[1] != dim:
        raise ValueError(
            f"The gallery embeddings have width {gallery.shape[1]} but the "
            f"embedding model outputs width {dim}."
        )
    if not np.isfinite(gallery).all():
        bad = int(np.count_nonzero(~np.isfinite(gallery).all(axis=1)))
        raise ValueError(
            f"The gallery embeddings have non-finite values in {bad} rows."
        )
    return gallery


def tree_ah_options(
    num_items: int,
    num_leaves: int | None = None,
    leaves_to_search: int | None = None,
    reorder: int | None = None,
) -> tuple[int, int, int]:
    """The `tree_ah` settings for a gallery: defaults filled in, then checked.

    Args:
        num_items: gallery size N.
        num_leaves: partitions; default `sqrt(N)`, at most N / 50 (at least 1).
        leaves_to_search: partitions searched per query; default 5% of them.
        reorder: candidates re-scored exactly per query; default 100.

    Returns:
        `(num_leaves, leaves_to_search, reorder)`.

    Raises:
        ValueError: a value that is not a positive integer, or more leaves to
            search than leaves.

    Example:
        >>> tree_ah_options(1_000_000)
        (1000, 50, 100)
    """
    if num_leaves is None:
        num_leaves = max(1, min(int(round(math.sqrt(num_items))), num_items // 50))
    if leaves_to_search is None:
        leaves_to_search = max(1, int(math.ceil(0.05 * num_leaves)))
    if reorder is None:
        reorder = 100
    for name, value in [
        ("num_leaves", num_leaves),
        ("leaves_to_search", leaves_to_search),
        ("reorder", reorder),
    ]:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
        if value < 1:
            raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    if leaves_to_search > num_leaves:
        raise ValueError(
            f"leaves_to_search={leaves_to_search} exceeds num_leaves={num_leaves}."
        )
    return int(num_leaves), int(leaves_to_search), int(reorder)


# ------------------------------------------------------------------ the index
def _build_searcher(gallery, index, k, num_leaves, leaves_to_search, reorder):
    scann_ops = _scann_ops()
    builder = scann_ops.builder(gallery, k, "dot_product")
    if index == "brute_force":
        return builder.score_brute_force().build()
    builder = builder.tree(
        num_leaves=num_leaves,
        num_leaves_to_search=leaves_to_search,
        training_sample_size=min(len(gallery), 250_000),
    )
    builder = builder.score_ah(2, anisotropic_quantization_threshold=0.2)
    return builder.reorder(max(reorder, k)).build()


def _sort_by_score_then_row(rows, scores):
    """Orders each row by decreasing score, equal scores by increasing row."""
    order = tf.argsort(rows, axis=1, stable=True)
    rows = tf.gather(rows, order, batch_dims=1)
    scores = tf.gather(scores, order, batch_dims=1)
    order = tf.argsort(scores, axis=1, direction="DESCENDING", stable=True)
    return tf.gather(rows, order, batch_dims=1), tf.gather(scores, order, batch_dims=1)


def _make_search(state, ids, k, gallery, exact):
    """The in-graph search: `(B, dim)` queries -> dict of ids and scores.

    ScaNN's float32 candidates are re-scored in float64 and ordered by (score,
    row), the canonical order of `xbm_tf.retrieval.engines`. With `exact`
    (brute force) ScaNN returns `k + _TIE_MARGIN` candidates, and a query whose
    float32 rounding band around its k-th score reaches the last candidate is
    searched again over the whole gallery: every item within the band of its
    k-th float32 score is re-scored in float64.
    """
    num_items, dim = gallery.shape
    g_sq_max = float(np.einsum("ij,ij->i", gallery, gallery).max())
    band_per_norm = inputs.score_band_per_norm(dim, g_sq_max)
    scann_ops = _scann_ops()
    candidates = min(num_items, k + _TIE_MARGIN) if exact else k
    blank = tf.constant("" if ids.dtype == tf.string else -1, ids.dtype)  # free slot

    def exact64(queries, vectors):
        """Float64 dot products of `(B, D)` queries with `(B, c, D)` vectors."""
        products = tf.cast(vectors, tf.float64) * tf.cast(queries, tf.float64)[:, None]
        return tf.reduce_sum(products, axis=-1)

    def search_some(queries):
        """The search of a batch of finite, non-zero queries."""
        searcher = scann_ops.searcher_from_module(state)
        rows, scores = searcher.search_batched_parallel(
            queries, final_num_neighbors=candidates
        )
        # One row per query, or an error: never a silently shorter batch.
        # ScaNN returns as many columns as the query of the batch that found the
        # most items (fewer than `candidates` when tree_ah's searched leaves hold
        # fewer for every query), padding the others with NaN: pad to width. The
        # width comes from the size, so that an empty batch reshapes too.
        batch = tf.shape(queries)[0]
        width = tf.size(rows) // tf.maximum(batch, 1)
        rows = tf.reshape(tf.cast(rows, tf.int32), [batch, width])
        scores = tf.reshape(scores, [batch, width])
        short = [[0, 0], [0, candidates - width]]
        rows = tf.ensure_shape(tf.pad(rows, short), [None, candidates])
        scores = tf.pad(scores, short, constant_values=np.nan)
        scores = tf.ensure_shape(scores, [None, candidates])
        missing = tf.math.is_nan(scores)  # tree_ah found too few items
        rows = tf.where(missing, tf.int32.max, rows)
        scores = tf.where(missing, -np.inf, scores)
        rows, scores = _sort_by_score_then_row(rows, scores)
        gallery_rows = tf.reshape(state.dataset, [-1, dim])
        found = rows < num_items
        vectors = tf.gather(gallery_rows, tf.where(found, rows, 0))
        rescored = tf.where(found, exact64(queries, vectors), -np.inf)
        ordered, rescored = _sort_by_score_then_row(rows, rescored)
        top_rows = ordered[:, :k]
        top_scores = tf.cast(rescored[:, :k], tf.float32)
        if exact and candidates < num_items:
            # inputs.score_band, doubled for two different float32 kernels.
            q_sq = tf.cast(tf.reduce_sum(queries * queries, axis=1), tf.float64)
            band = 2.0 * (band_per_norm * tf.sqrt(q_sq) + 1e-30)
            last, kth = (tf.cast(scores[:, i], tf.float64) for i in (-1, k - 1))
            redo = tf.where(last >= kth - band)[:, 0]

            def whole(args):
                query, margin = args
                sims = tf.linalg.matvec(gallery_rows, query)
                kth = tf.math.top_k(sims, k).values[k - 1]
                near = tf.where(
                    tf.cast(sims, tf.float64) >= tf.cast(kth, tf.float64) - margin
                )
                near = tf.cast(near[:, 0], tf.int32)
                values = exact64(query[None], tf.gather(gallery_rows, near)[None])
                best, values = _sort_by_score_then_row(near[None], values)
                return best[0, :k], tf.cast(values[0, :k], tf.float32)

            def exact_rows():
                found_rows, values = tf.map_fn(
                    whole,
                    (tf.gather(queries, redo), tf.gather(band, redo)),
                    fn_output_signature=(
                        tf.TensorSpec([k], tf.int32),
                        tf.TensorSpec([k], tf.float32),
                    ),
                )
                at = redo[:, None]
                return (
                    tf.tensor_scatter_nd_update(top_rows, at, found_rows),
                    tf.tensor_scatter_nd_update(top_scores, at, values),
                )

            top_rows, top_scores = tf.cond(
                tf.size(redo) > 0, exact_rows, lambda: (top_rows, top_scores)
            )
        found = top_rows < num_items
        safe = tf.where(found, top_rows, 0)
        out_ids = tf.where(found, tf.gather(ids, safe), blank)
        return {"ids": out_ids, "scores": top_scores}

    def search(queries, name="`embeddings`"):
        """Checks the queries in the graph, then searches: ids and scores `(B, k)`.

        A NaN, infinite or all-zero query row is an InvalidArgumentError naming
        `name` and the row; an empty batch returns `(0, k)` outputs.
        """
        queries = tf.ensure_shape(tf.cast(queries, tf.float32), [None, dim])
        queries = export_lib.check_finite_rows(queries, name, nonzero=True)
        # ScaNN and the ops after it take an empty batch (a test feeds one).
        return search_some(queries)

    return search


def export_retrieval_model(
    embedding_model,
    gallery,
    export_dir: str | os.PathLike,
    k: int = 10,
    ids=None,
    index: str = "brute_force",
    overwrite: bool = False,
    *,
    num_leaves: int | None = None,
    leaves_to_search: int | None = None,
    reorder: int | None = None,
    batch_size: int = 256,
    verbose: int = 0,
) -> str:
    """Writes one SavedModel: the embedding network, a ScaNN index and the ids.

    See the module docstring for the signatures and the ordering of results.
    Written to a staging directory and moved into place, so a failure leaves
    no partial directory and never destroys a previous export.

    Args:
        embedding_model: a `keras.Model` (images in [0, 255] -> embeddings,
            e.g. from `build_embedding_model`) or an embedding export loaded
            with `xbm_tf.export.load_exported_embedder`.
        gallery: the gallery's `(N, D)` embeddings (2-D array), or its images:
            an `(N, H, W, C)` array or a `tf.data.Dataset` of image batches (or
            `(images, labels)` batches), embedded here with the model.
        export_dir: the SavedModel directory.
        k: neighbours returned per query, `1 <= k <= N`.
        ids: `N` strings (e.g. file paths) or integers (e.g. product ids)
            returned for the gallery rows; default the row numbers `0..N-1`.
        index: `"brute_force"` (exact) or `"tree_ah"` (approximate: k-means
            tree, asymmetric hashing and exact reordering, for large galleries).
        overwrite: replace an existing non-empty `export_dir`.
        num_leaves: `tree_ah` partitions; default `sqrt(N)` (at most N / 50).
        leaves_to_search: `tree_ah` partitions searched per query; default 5%
            of `num_leaves`.
        reorder: `tree_ah` candidates re-scored exactly; default 100.
        batch_size: batch size when `gallery` is an image array.
        verbose: 1 shows a progress bar while embedding the gallery.

    Returns:
        The absolute path of the export.

    Raises:
        FileExistsError: `export_dir` exists (and `overwrite` is False).
        ValueError: an unknown `index`, `k` larger than the gallery, `ids` of
            the wrong length or mixed types, gallery embeddings whose width
            differs from the model's.
        ImportError: scann is not installed.

    Example:
        >>> from xbm_tf import build_embedding_model
        >>> model = build_embedding_model("tiny", 8, input_shape=(28, 28, 1))
        >>> gallery = np.random.default_rng(0).uniform(0, 255, (100, 28, 28, 1))
        >>> path = export_retrieval_model(model, gallery, "retrieval", k=5)
        >>> search = load_retrieval_model(path)
        >>> search(gallery[:2])["ids"].shape
        (2, 5)
    """
    export_dir = export_lib.check_export_dir(export_dir, overwrite)
    if index not in INDEX_TYPES:
        raise ValueError(f"Unknown index {index!r}; valid: {list(INDEX_TYPES)}.")
    _scann_ops()  # Fails now, not after embedding, if scann is missing.
    network = _Network(embedding_model)
    gallery_array = None
    if not isinstance(gallery, tf.data.Dataset):
        gallery_array = np.asarray(gallery)
    if gallery_array is not None and gallery_array.ndim == 2:
        embeddings = _check_embeddings(gallery_array, network.dim)
    else:
        embeddings = embed_gallery(network, gallery, batch_size, verbose)[0]
        embeddings = _check_embeddings(embeddings, network.dim)
    num_items, dim = embeddings.shape
    k = _check_k(k, num_items)
    ids = _check_ids(ids, num_items)
    options = (None, None, None)
    if index == "tree_ah":
        options = tree_ah_options(num_items, num_leaves, leaves_to_search, reorder)
    searcher = _build_searcher(embeddings, index, k, *options)
    state = searcher.serialize_to_module()
    id_table = tf.Variable(ids, trainable=False, name="ids")
    search = _make_search(state, id_table, k, embeddings, index == "brute_force")

    def serve(images):
        images = export_lib.check_finite_rows(images, "`images`")
        embedded = network(images)
        found = search(embedded, name="The embedding of `images`")
        return {**found, "embeddings": embedded}

    def info():
        return {
            "k": tf.constant(k, tf.int32),
            "index": tf.constant(index),
            "num_items": tf.constant(num_items, tf.int64),
        }

    archive = keras.export.ExportArchive()
    archive.track(network.trackable)
    archive.track(state)
    image_spec = tf.TensorSpec((None, *network.input_shape), tf.float32, "images")
    archive.add_endpoint("serving_default", serve, input_signature=[image_spec])
    archive.add_endpoint(
        "search_embeddings",
        lambda embeddings: search(embeddings),
        input_signature=[tf.TensorSpec((None, dim), tf.float32, "embeddings")],
    )
    archive.add_endpoint("index_info", info, input_signature=[])
    return export_lib.write_atomically(
        export_dir, lambda staging: archive.write_out(staging, verbose=False)
    )


# -------------------------------------------------------------------- loading
class RetrievalModel:
    """A loaded retrieval SavedModel: images (or embeddings) -> top-k gallery ids.

    One method per signature of the export: calling it with images
    `(B, H, W, C)` in [0, 255] (`serving_default`) returns numpy arrays
    `{"ids": (B, k), "scores": (B, k), "embeddings": (B, D)}`;
    `search_embeddings(embeddings)` returns ids and scores; `index_info()`
    returns `{"k", "index", "num_items"}`. String ids come back as a `str`
    object array, integer ids as int64. Bad rows raise
    `tf.errors.InvalidArgumentError` (see the module docstring).

    Attributes:
        k: neighbours per query.
        index: `"brute_force"` or `"tree_ah"`.
        num_items: gallery size.
        input_shape: `(H, W, C)` of the images (None entries: any size).
        dim: embedding width.
        saved_model: the loaded SavedModel object.
    """

    def __init__(self, loaded, path: str):
        self.saved_model = loaded
        self.path = path
        self._serve = loaded.signatures["serving_default"]
        self._search = loaded.signatures["search_embeddings"]
        info = self.index_info()
        self.k, self.index, self.num_items = info["k"], info["index"], info["num_items"]
        self.input_shape = tuple(
            self._serve.structured_input_signature[1]["images"].shape[1:]
        )
        spec = self._search.structured_input_signature[1]["embeddings"]
        self.dim = int(spec.shape[1])

    @staticmethod
    def _numpy(outputs) -> dict[str, np.ndarray]:
        out = {key: value.numpy() for key, value in outputs.items()}
        if out["ids"].dtype == object:
            out["ids"] = np.vectorize(bytes.decode, otypes=[object])(out["ids"])
        return out

    def __call__(self, images) -> dict[str, np.ndarray]:
        images = tf.convert_to_tensor(images, tf.float32)
        if images.shape.rank != 4 or not tf.TensorShape(
            (None, *self.input_shape)
        ).is_compatible_with(images.shape):
            raise ValueError(
                f"Images of shape {tuple(images.shape)} do not fit the retrieval "
                f"model at {self.path}, which expects (batch, *{self.input_shape})."
            )
        return self._numpy(self._serve(images=images))

    def search_embeddings(self, embeddings) -> dict[str, np.ndarray]:
        """Searches the gallery with `(B, D)` embeddings; returns ids and scores."""
        embeddings = tf.convert_to_tensor(embeddings, tf.float32)
        if embeddings.shape.rank != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(
                f"Embeddings of shape {tuple(embeddings.shape)} do not fit the "
                f"retrieval model at {self.path}, which expects (batch, {self.dim})."
            )
        return self._numpy(self._search(embeddings=embeddings))

    def index_info(self) -> dict:
        """The `index_info` signature: `{"k": int, "index": str, "num_items": int}`."""
        info = self.saved_model.signatures["index_info"]()
        return {
            "k": int(info["k"]),
            "index": info["index"].numpy().decode(),
            "num_items": int(info["num_items"]),
        }


def load_retrieval_model(path: str | os.PathLike) -> RetrievalModel:
    """Imports scann (which registers its TensorFlow ops) and loads an export.

    The ScaNN searcher is rebuilt from the saved index by a first search here,
    so that the caller's first query is as fast as the others.

    Args:
        path: a directory written by `export_retrieval_model`.

    Returns:
        A `RetrievalModel`: `model(images)` -> `{"ids", "scores", "embeddings"}`
        and `model.search_embeddings(embeddings)` -> `{"ids", "scores"}`.

    Raises:
        ImportError: scann is not importable (the message says what to install).
        FileNotFoundError: `path` is not a SavedModel directory.
        ValueError: the SavedModel is not a retrieval export.

    Example:
        ```python
        search = load_retrieval_model("runs/quickstart/retrieval")
        search(images)["ids"]  # (batch, k) gallery ids
        ```
    """
    path = os.fspath(path)
    _scann_ops()
    if not tf.saved_model.contains_saved_model(path):
        raise FileNotFoundError(
            f"{path} is not a TensorFlow SavedModel directory (no saved_model.pb); "
            "write one with export_retrieval_model."
        )
    loaded = tf.saved_model.load(path)
    expected = {"serving_default", "search_embeddings", "index_info"}
    if not expected <= set(loaded.signatures):
        raise ValueError(
            f"SavedModel {path} is not a retrieval export: it has signatures "
            f"{sorted(loaded.signatures)}, expected {sorted(expected)}."
        )
    model = RetrievalModel(loaded, path)
    model.search_embeddings(np.ones((1, model.dim), np.float32))  # Warm-up.
    return model
