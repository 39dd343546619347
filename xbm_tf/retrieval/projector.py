"""A TensorBoard Projector view of a gallery: embeddings, metadata and a sprite.

`tensorboard --logdir <log_dir>` then shows the gallery in the Projector tab
(PCA, t-SNE, UMAP), each point labelled by its metadata and drawn as its
thumbnail when a sprite is written.
"""

from __future__ import annotations

import math
import os

import numpy as np
import tensorflow as tf

__all__ = ["SPRITE_MAX_SIDE", "sprite_thumbnail_size", "write_projector"]

# TensorBoard's Projector reads sprites of at most 8192 x 8192 pixels.
SPRITE_MAX_SIDE = 8192
_TENSOR_NAME = "embedding/.ATTRIBUTES/VARIABLE_VALUE"


def sprite_thumbnail_size(num_items: int, largest: int = 64) -> int:
    """The thumbnail side that fits `num_items` in one sprite (at most `largest`).

    Example:
        >>> sprite_thumbnail_size(100), sprite_thumbnail_size(60_502)
        (64, 33)
    """
    per_row = math.ceil(math.sqrt(max(1, num_items)))
    return max(1, min(largest, SPRITE_MAX_SIDE // per_row))


def _metadata_lines(metadata: dict, num_items: int) -> list[str]:
    columns = {}
    for name, values in metadata.items():
        values = list(values)
        if len(values) != num_items:
            raise ValueError(
                f"Metadata column {name!r} has {len(values)} values for "
                f"{num_items} embeddings."
            )
        columns[name] = [
            " ".join(str(v).replace("\t", " ").splitlines()) or " " for v in values
        ]
    rows = list(zip(*columns.values()))
    if len(columns) == 1:  # One column: no header line (TensorBoard's rule).
        return [row[0] for row in rows]
    return ["\t".join(columns)] + ["\t".join(row) for row in rows]


def _sprite(thumbnails: np.ndarray) -> np.ndarray:
    thumbnails = np.asarray(thumbnails)
    if thumbnails.ndim != 4 or thumbnails.shape[-1] not in (1, 3):
        raise ValueError(
            f"Sprite images must be (N, h, w, 1 or 3); got {thumbnails.shape}."
        )
    n, h, w, _ = thumbnails.shape
    per_row = math.ceil(math.sqrt(n))
    if per_row * max(h, w) > SPRITE_MAX_SIDE:
        raise ValueError(
            f"{n} thumbnails of {h}x{w} make a sprite wider than "
            f"{SPRITE_MAX_SIDE} pixels; use sprite_thumbnail_size({n})."
        )
    if thumbnails.shape[-1] == 1:
        thumbnails = np.repeat(thumbnails, 3, axis=-1)
    canvas = np.full((per_row * h, per_row * w, 3), 255, np.uint8)
    for i, image in enumerate(thumbnails.astype(np.uint8)):
        row, col = divmod(i, per_row)
        canvas[row * h : (row + 1) * h, col * w : (col + 1) * w] = image
    return canvas


def write_projector(
    log_dir: str | os.PathLike,
    embeddings,
    metadata: dict | None = None,
    thumbnails=None,
) -> str:
    """Writes a TensorBoard Projector view of `embeddings` into `log_dir`.

    Writes a checkpoint of the embeddings, `metadata.tsv` (one line per row;
    with a header when there are several columns), `sprite.png` (the
    thumbnails in a square grid, row-major) and `projector_config.pbtxt`.

    Args:
        log_dir: the folder to write (created if needed).
        embeddings: `(N, D)` float array.
        metadata: `{column: N values}`, e.g. `{"id": paths, "label": labels}`.
        thumbnails: `(N, h, w, C)` uint8 images for the sprite, or None.

    Returns:
        `log_dir` as a string.

    Example:
        >>> write_projector("/tmp/projector", np.eye(3), {"id": ["a", "b", "c"]})
        '/tmp/projector'
    """
    from tensorboard.plugins import projector

    log_dir = os.fspath(log_dir)
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(
            f"`embeddings` must be a non-empty (N, D) array; got {embeddings.shape}."
        )
    if thumbnails is not None and len(thumbnails) != len(embeddings):
        raise ValueError(
            f"{len(thumbnails)} thumbnails for {len(embeddings)} embeddings."
        )
    os.makedirs(log_dir, exist_ok=True)
    config = projector.ProjectorConfig()
    entry = config.embeddings.add()
    entry.tensor_name = _TENSOR_NAME
    if metadata:
        lines = _metadata_lines(metadata, len(embeddings))
        with open(os.path.join(log_dir, "metadata.tsv"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        entry.metadata_path = "metadata.tsv"
    if thumbnails is not None:
        from matplotlib.image import imsave

        imsave(os.path.join(log_dir, "sprite.png"), _sprite(thumbnails), format="png")
        entry.sprite.image_path = "sprite.png"
        entry.sprite.single_image_dim.extend(
            [int(thumbnails.shape[2]), int(thumbnails.shape[1])]
        )
    checkpoint = tf.train.Checkpoint(embedding=tf.Variable(embeddings))
    checkpoint.save(os.path.join(log_dir, "embedding.ckpt"))
    projector.visualize_embeddings(log_dir, config)
    return log_dir
