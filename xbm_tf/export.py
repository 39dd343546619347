"""SavedModel export of the embedding network, and loading it back for inference.

Export the embedding model alone (`build_embedding_model`'s model), never a model
that owns the cross-batch memory: every variable a model tracks goes into the
SavedModel, so exporting the training model would carry the memory along.

The SavedModel's `serving_default` signature (also named `serve`) takes one
input, `images`: a batch `(None, height, width, channels)` of float32 pixel values
in `[0, 255]` (or uint8, see `input_dtype`), and returns a dict with one key,
`"embeddings"`: float32 `(None, embedding_dim)`, L2-normalised by the model.
The graph itself checks the batch, so every client (TensorFlow Serving,
`saved_model_cli`) gets the checks: a float32 image with a NaN or infinite
pixel is an `InvalidArgumentError` naming its row, and an empty batch returns
`(0, embedding_dim)` embeddings without running the network.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "INPUT_KEY",
    "OUTPUT_KEY",
    "check_export_dir",
    "check_finite_rows",
    "embed_batch",
    "export_embedding_model",
    "load_exported_embedder",
    "write_atomically",
]

INPUT_KEY = "images"
OUTPUT_KEY = "embeddings"
_INPUT_DTYPES = ("float32", "uint8")


def export_embedding_model(
    embedding_model: keras.Model,
    export_dir: str | os.PathLike,
    overwrite: bool = False,
    input_shape: tuple | None = None,
    input_dtype: str = "float32",
) -> str:
    """Writes `embedding_model` as a TensorFlow SavedModel for serving.

    The SavedModel is written to a temporary directory beside `export_dir` and
    then moved into place, so a failed export leaves no partial directory and,
    with `overwrite=True`, never destroys the previous export. Local paths only
    (the final move is a rename).

    Args:
        embedding_model: a single-input model mapping images in `[0, 255]` to
            embeddings, e.g. from `build_embedding_model`.
        export_dir: directory of the SavedModel.
        overwrite: replace an existing non-empty `export_dir`. Without it such a
            directory is an error and is left untouched.
        input_shape: `(height, width, channels)` of the serving input; defaults
            to the model's input shape. `None` entries accept any size.
        input_dtype: `"float32"` (values in `[0, 255]`) or `"uint8"` (cast to
            float32 inside the signature, handy for decoded image bytes).

    Returns:
        The absolute path of the export.

    Raises:
        FileExistsError: `export_dir` is a file, or a non-empty directory and
            `overwrite` is False.
        ValueError: bad `input_shape` / `input_dtype`, a model without one
            image input, or a training model that wraps the embedding model
            (anything with an `embedding_model` attribute).

    Example:
        >>> import numpy as np
        >>> from xbm_tf import build_embedding_model
        >>> model = build_embedding_model("tiny", 8, input_shape=(28, 28, 1))
        >>> path = export_embedding_model(model, "xbm_export")
        >>> embed = load_exported_embedder(path)
        >>> embed(np.zeros((2, 28, 28, 1), "float32")).shape
        (2, 8)
    """
    export_dir = os.path.abspath(os.fspath(export_dir))
    if isinstance(getattr(embedding_model, "embedding_model", None), keras.Model):
        raise ValueError(
            f"Model {embedding_model.name!r} wraps an embedding model (e.g. an "
            "XBMContrastiveModel, which owns the memory buffers); export its "
            "`.embedding_model` instead, or the memory goes into the SavedModel."
        )
    if input_dtype not in _INPUT_DTYPES:
        raise ValueError(
            f"Unknown input_dtype {input_dtype!r}; valid: {list(_INPUT_DTYPES)}."
        )
    if input_shape is None:
        inputs = getattr(embedding_model, "inputs", None)
        if not inputs or len(inputs) != 1:
            raise ValueError(
                f"Model {embedding_model.name!r} needs exactly one input to infer "
                "the serving signature; pass input_shape=(height, width, channels)."
            )
        input_shape = tuple(inputs[0].shape[1:])
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            f"input_shape must be (height, width, channels), got {input_shape}."
        )
    check_export_dir(export_dir, overwrite)
    dim = _output_dim(embedding_model, input_shape)

    def serve(images):
        if input_dtype == "float32":
            images = check_finite_rows(images, f"`{INPUT_KEY}`")
        embeddings = embed_batch(
            lambda x: embedding_model(_to_float32(x), training=False), images, dim
        )
        return {OUTPUT_KEY: embeddings}

    archive = keras.export.ExportArchive()
    archive.track(embedding_model)
    # Traces the model now, so shape errors are raised before anything is written.
    archive.add_endpoint(
        name="serve",
        fn=serve,
        input_signature=[
            tf.TensorSpec((None, *input_shape), input_dtype, name=INPUT_KEY)
        ],
    )

    return write_atomically(
        export_dir, lambda staging: archive.write_out(staging, verbose=False)
    )


def check_export_dir(export_dir: str | os.PathLike, overwrite: bool) -> str:
    """Checks that `export_dir` may be written; returns its absolute path.

    Args:
        export_dir: the directory an export will be written to.
        overwrite: whether an existing non-empty directory may be replaced.

    Returns:
        The absolute path of `export_dir`.

    Raises:
        FileExistsError: `export_dir` is a file, or a non-empty directory and
            `overwrite` is False.

    Example:
        >>> check_export_dir("new_export", overwrite=False)  # an absolute path
        '/.../new_export'
    """
    export_dir = os.path.abspath(os.fspath(export_dir))
    if os.path.exists(export_dir):
        if not os.path.isdir(export_dir):
            raise FileExistsError(
                f"Export path {export_dir} exists and is not a directory."
            )
        if os.listdir(export_dir) and not overwrite:
            raise FileExistsError(
                f"Export directory {export_dir} already exists and is not empty; "
                "pass overwrite=True to replace it."
            )
    return export_dir


def write_atomically(
    export_dir: str | os.PathLike, write: Callable[[str], object]
) -> str:
    """Runs `write(staging_dir)`, then moves the staging directory to `export_dir`.

    The staging directory is a fresh path beside `export_dir`, so a failed
    `write` leaves no partial directory, and an existing `export_dir` is
    replaced only once the new one is complete (and restored if the final move
    fails). Check `export_dir` with `check_export_dir` first. Local paths only
    (the move is a rename).

    Args:
        export_dir: the final directory.
        write: writes the whole export into the (not yet existing) path it is
            given.

    Returns:
        The absolute path of `export_dir`.

    Example:
        >>> import os
        >>> write_atomically("out", lambda d: os.makedirs(d))
        '/.../out'
    """
    export_dir = os.path.abspath(os.fspath(export_dir))
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    suffix = uuid.uuid4().hex[:8]
    staging = f"{export_dir}.tmp-{suffix}"
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not os.path.exists(export_dir):
        os.rename(staging, export_dir)
        return export_dir
    backup = f"{export_dir}.old-{suffix}"
    os.rename(export_dir, backup)
    try:
        os.rename(staging, export_dir)
    except BaseException:
        os.rename(backup, export_dir)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(backup, ignore_errors=True)
    return export_dir


def _to_float32(x):
    return keras.ops.cast(x, "float32")


def _output_dim(model: keras.Model, input_shape: tuple) -> int | None:
    """The embedding width of `model` for images of `input_shape`, if known."""
    outputs = getattr(model, "outputs", None)
    if outputs:
        return outputs[0].shape[-1]
    spec = model.compute_output_spec(keras.KerasTensor((1, *input_shape)))
    return spec.shape[-1]


def embed_batch(embed: Callable, images, dim: int | None) -> tf.Tensor:
    """`embed(images)` as float32, or `(0, dim)` zeros for an empty batch.

    The network does not run on an empty batch: some kernels fail on one (oneDNN's
    batch normalization on AVX-512 CPUs raises "Incompatible shapes"). Works in
    a graph (a `tf.cond` on the batch size) and eagerly.

    Args:
        embed: maps a non-empty `(B, ...)` batch to `(B, dim)` embeddings.
        images: the batch, first axis B (possibly 0).
        dim: the embedding width; `None` runs `embed` on every batch.

    Returns:
        float32 `(B, dim)` embeddings.

    Example:
        >>> embed = lambda x: tf.ones([tf.shape(x)[0], 8])  # any network
        >>> embed_batch(embed, np.zeros((0, 28, 28, 1), "float32"), 8).shape
        TensorShape([0, 8])
    """
    if dim is None:
        return tf.cast(embed(images), tf.float32)
    images = tf.convert_to_tensor(images)
    return tf.cond(
        tf.shape(images)[0] > 0,
        lambda: tf.ensure_shape(tf.cast(embed(images), tf.float32), [None, dim]),
        lambda: tf.zeros([0, dim], tf.float32),
    )


def check_finite_rows(x, name: str, nonzero: bool = False) -> tf.Tensor:
    """`x` after an in-graph check that each of its rows is finite (and non-zero).

    Runs inside a SavedModel's graph, so every client of the export gets it.

    Args:
        x: a float tensor whose first axis is the batch.
        name: what the rows are, for the error message (e.g. "`images`").
        nonzero: also refuse a row of zeros (a query with no direction).

    Returns:
        `x`, once the check passed.

    Raises:
        tf.errors.InvalidArgumentError: naming `name` and the first bad row,
            e.g. "`embeddings` row 3 (of 5) has a NaN or infinite value".

    Example:
        >>> check_finite_rows(tf.constant([[1.0], [np.nan]]), "`embeddings`")
        Traceback (most recent call last):
        ...
        tensorflow...InvalidArgumentError: ...`embeddings` row 1 (of 2) has a NaN...
    """
    x = tf.convert_to_tensor(x)
    axes = tf.range(1, tf.rank(x))  # (A reshape to (B, -1) fails on B = 0.)
    checks = [
        (tf.reduce_all(tf.math.is_finite(x), axes), "has a NaN or infinite value")
    ]
    if nonzero:
        checks.append(
            (tf.reduce_any(tf.not_equal(x, 0), axes), "is all zeros (no direction)")
        )
    asserts = []
    for good, problem in checks:
        # The first False; the appended one keeps argmin defined on B = 0.
        first = tf.argmin(tf.concat([tf.cast(good, tf.int32), [0]], 0))
        message = tf.strings.format(
            f"{name} row {{}} (of {{}}) {problem}.", (first, tf.size(good))
        )
        asserts.append(tf.debugging.Assert(tf.reduce_all(good), [message]))
    with tf.control_dependencies(asserts):
        return tf.identity(x)


def load_exported_embedder(
    export_dir: str | os.PathLike,
) -> Callable[[np.ndarray], np.ndarray]:
    """Loads an export and returns a function from images to embeddings.

    Args:
        export_dir: a directory written by `export_embedding_model`.

    Returns:
        `embed(images) -> np.ndarray`: applies the `serving_default` signature to
        a batch of images (numpy array or tensor, shape
        `(batch, height, width, channels)`, values in `[0, 255]`) and returns the
        float32 embeddings `(batch, embedding_dim)`. `embed.signature` is the
        underlying concrete function.

    Raises:
        FileNotFoundError: `export_dir` is not a SavedModel directory.
        ValueError: the SavedModel lacks the expected signature; at call time,
            images whose shape does not fit the signature.

    Example:
        ```python
        embed = load_exported_embedder("/tmp/xbm_export")
        embeddings = embed(images)  # (batch, embedding_dim), unit norm
        ```
    """
    path = os.fspath(export_dir)
    if not tf.saved_model.contains_saved_model(path):
        raise FileNotFoundError(
            f"{path} is not a TensorFlow SavedModel directory (no saved_model.pb); "
            "write one with export_embedding_model."
        )
    loaded = tf.saved_model.load(path)
    signature = loaded.signatures.get("serving_default")
    if signature is None or OUTPUT_KEY not in signature.structured_outputs:
        found = {
            key: sorted(fn.structured_outputs) for key, fn in loaded.signatures.items()
        }
        raise ValueError(
            f"SavedModel {path} has no 'serving_default' signature with output "
            f"{OUTPUT_KEY!r}; signatures and outputs found: {found}."
        )
    spec = signature.structured_input_signature[1][INPUT_KEY]

    def embed(images):
        images = tf.convert_to_tensor(images)
        if not spec.shape.is_compatible_with(images.shape):
            raise ValueError(
                f"Images of shape {tuple(images.shape)} do not fit the export at "
                f"{path}, which expects {tuple(spec.shape)} (batch first)."
            )
        images = tf.cast(images, spec.dtype)
        return signature(**{INPUT_KEY: images})[OUTPUT_KEY].numpy()

    embed.signature = signature
    embed.saved_model = loaded  # Keeps the variables alive.
    return embed
