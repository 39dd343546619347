"""Input checks shared by the search engines and the metrics.

Every public entry point of `xbm_tf.retrieval` validates its arguments here, before
any search starts, and raises a `ValueError` that names the argument and its shape.
Labels are turned into dense integer codes so that the metrics can compare classes
with integer arrays whatever the label type.
"""

from __future__ import annotations

import numbers

import keras
import numpy as np

__all__: list[str] = []


def as_embeddings(x, name: str) -> np.ndarray:
    """A finite, non-empty, C-contiguous float32 `(num_items, dim)` array."""
    x = np.asarray(keras.ops.convert_to_numpy(x) if keras.ops.is_tensor(x) else x)
    if x.ndim != 2:
        raise ValueError(
            f"`{name}` must be 2-D (num_items, dim); got shape {tuple(x.shape)}."
        )
    if x.shape[0] == 0:
        raise ValueError(f"`{name}` is empty: shape {tuple(x.shape)}.")
    if x.shape[1] == 0:
        raise ValueError(f"`{name}` has dimension 0: shape {tuple(x.shape)}.")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x).all(axis=1)))
        raise ValueError(f"`{name}` has non-finite values in {bad} rows.")
    return x


def as_labels(y, name: str, num_items: int) -> np.ndarray:
    """A 1-D label array with one label per embedding row."""
    y = np.asarray(keras.ops.convert_to_numpy(y) if keras.ops.is_tensor(y) else y)
    if y.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D; got shape {tuple(y.shape)}.")
    if y.shape[0] != num_items:
        raise ValueError(
            f"`{name}` has {y.shape[0]} labels but the embeddings have "
            f"{num_items} rows."
        )
    return y


def check_ks(ks, limit: int, limit_reason: str) -> tuple[int, ...]:
    """Validates K values against `limit`, described by `limit_reason`."""
    if isinstance(ks, numbers.Integral):
        ks = (ks,)
    ks = tuple(ks)
    if not ks:
        raise ValueError("`ks` is empty; give at least one K, e.g. ks=(1, 2, 4, 8).")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"Every K in `ks` must be a positive integer; got {k!r}.")
        if k > limit:
            raise ValueError(f"K={k} is too large: {limit_reason}.")
    return tuple(int(k) for k in ks)


def gallery_reason(num_gallery: int, leave_one_out: bool) -> str:
    """Why K cannot exceed the number of candidates, for error messages."""
    if leave_one_out:
        return (
            f"leave-one-out over {num_gallery} queries leaves {num_gallery - 1} "
            "candidates per query"
        )
    return f"the gallery has {num_gallery} items"


def check_block_size(block_size, default: int) -> int:
    """`block_size` as a positive int, or `default` if it is `None`."""
    if block_size is None:
        return default
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise ValueError(f"`block_size` must be a positive integer; got {block_size}.")
    if block_size < 1:
        raise ValueError(f"`block_size` must be a positive integer; got {block_size}.")
    return int(block_size)


def prepare_search(query_embeddings, gallery_embeddings):
    """Validates a search; returns `(q, g, leave_one_out)`."""
    q = as_embeddings(query_embeddings, "query_embeddings")
    if gallery_embeddings is None:
        if q.shape[0] < 2:
            raise ValueError(
                f"Leave-one-out needs at least 2 queries; got {q.shape[0]}."
            )
        return q, q, True
    g = as_embeddings(gallery_embeddings, "gallery_embeddings")
    if g.shape[1] != q.shape[1]:
        raise ValueError(
            f"Dimension mismatch: query embeddings have dim {q.shape[1]}, "
            f"gallery embeddings have dim {g.shape[1]}."
        )
    return q, g, False


def prepare(query_embeddings, query_labels, gallery_embeddings, gallery_labels):
    """Validates a metric's inputs; returns `(q, q_codes, g, g_codes, loo)`."""
    q = as_embeddings(query_embeddings, "query_embeddings")
    ql = as_labels(query_labels, "query_labels", q.shape[0])
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError(
            "Give both `gallery_embeddings` and `gallery_labels`, or neither "
            "(leave-one-out over the queries)."
        )
    if gallery_embeddings is None:
        if q.shape[0] < 2:
            raise ValueError(
                f"Leave-one-out needs at least 2 queries; got {q.shape[0]}."
            )
        codes = np.unique(ql, return_inverse=True)[1].reshape(-1)
        return q, codes, q, codes, True
    g = as_embeddings(gallery_embeddings, "gallery_embeddings")
    gl = as_labels(gallery_labels, "gallery_labels", g.shape[0])
    if g.shape[1] != q.shape[1]:
        raise ValueError(
            f"Dimension mismatch: query embeddings have dim {q.shape[1]}, "
            f"gallery embeddings have dim {g.shape[1]}."
        )
    codes = np.unique(np.concatenate([ql, gl]), return_inverse=True)[1].reshape(-1)
    return q, codes[: q.shape[0]], g, codes[q.shape[0] :], False


def num_relevant(q_codes, g_codes, leave_one_out: bool) -> np.ndarray:
    """R per query: gallery items of the query's class (self excluded)."""
    counts = np.bincount(g_codes, minlength=int(max(q_codes.max(), g_codes.max())) + 1)
    return counts[q_codes] - (1 if leave_one_out else 0)


def score_band(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Per query, a bound on the float32 rounding gap between two of its scores.

    A float32 dot product of dim `d` differs from the exact one by at most about
    `d * 2**-24 * |q| * |g|`, whatever the summation order; two computed scores
    of one query whose exact values are equal thus differ by at most twice that.
    Scores further apart than this band are ordered as their exact values.
    """
    g_sq_max = float(np.einsum("ij,ij->i", g, g).max())
    q_norm = np.sqrt(np.einsum("ij,ij->i", q, q).astype(np.float64))
    return score_band_per_norm(q.shape[1], g_sq_max) * q_norm + 1e-30


def score_band_per_norm(dim: int, g_sq_max: float) -> float:
    """`score_band` of a query divided by its norm (less the 1e-30 floor), for a
    gallery whose largest squared norm is `g_sq_max`: one number per gallery, so
    a search graph can hold it as a constant."""
    unit = dim * 2.0**-24
    return 2.0 * unit * (1 + 2 * unit) * float(np.sqrt(g_sq_max))
