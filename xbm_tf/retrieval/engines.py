"""Search engines: exact TensorFlow search, ScaNN brute force, ScaNN tree + AH.

One name per engine; the same name selects the engine for every metric
(`xbm_tf.retrieval.metrics`) and for `nearest_neighbors`:

- `"exact_rank"` (exact; the metrics' default): blocked TensorFlow float32
  matmul. Recall@K by counting each query's rank (`xbm_tf.retrieval.counting`,
  no top-K lists); MAP@R and R-precision from the top-R lists of `"exact"`.
- `"exact"` (exact): blocked TensorFlow matmul + `top_k` lists, for every metric.
- `"scann"` (exact): ScaNN brute-force lists (float32 dot products, all cores),
  for every metric.
- `"scann_ah"` (**approximate**): ScaNN tree (k-means partitions) + asymmetric
  hashing + exact re-ordering of the candidates, for galleries too large for
  exact search; `retrieval_metrics` labels its results `"approximate": 1.0`.

Neighbours are ordered by decreasing dot product; equal scores by increasing
gallery index. The exact engines return identical Recall@K, ties and near-ties
included (see `xbm_tf.retrieval.counting`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from xbm_tf.retrieval import inputs

__all__ = ["APPROXIMATE_ENGINES", "ENGINES", "EXACT_ENGINES", "nearest_neighbors"]

ENGINES = ("exact_rank", "exact", "scann", "scann_ah")
EXACT_ENGINES = ("exact_rank", "exact", "scann")
APPROXIMATE_ENGINES = ("scann_ah",)
_DEFAULT_BLOCK_SIZE = {"exact": 1024, "scann": 1024, "scann_ah": 1024}


def check_engine(backend: str) -> str:
    """Returns `backend` if it names an engine, else a clear error."""
    if backend not in ENGINES:
        raise ValueError(
            f"`backend` must be one of {ENGINES} (exact_rank, exact and scann are "
            f"exact, scann_ah approximate); got {backend!r}."
        )
    return backend


def is_approximate(backend: str) -> bool:
    """Whether the engine may miss true neighbours."""
    return backend in APPROXIMATE_ENGINES


def list_engine(backend: str) -> str:
    """The engine that serves top-k lists for `backend` (exact_rank: exact)."""
    return "exact" if backend == "exact_rank" else backend


# ------------------------------------------------------------ exact TensorFlow
@tf.function(reduce_retracing=True)
def _top_k_block(q_block, g, start, k, leave_one_out):
    sims = tf.matmul(q_block, g, transpose_b=True)
    if leave_one_out:
        rows = tf.range(tf.shape(q_block)[0])
        self_pos = tf.stack([rows, rows + start], axis=1)
        minus_inf = tf.fill(tf.shape(rows), tf.constant(-np.inf, tf.float32))
        sims = tf.tensor_scatter_nd_update(sims, self_pos, minus_inf)
    # top_k orders equal values by lower index (documented for TensorFlow).
    return tf.math.top_k(sims, k=k, sorted=True)


def _exact_search(q, g, k, leave_one_out, block_size):
    """Blocked matmul + top_k; memory is O(block_size * num_gallery)."""
    g_t = tf.constant(g)
    indices = np.empty((q.shape[0], k), np.int32)
    scores = np.empty((q.shape[0], k), np.float32)
    for start in range(0, q.shape[0], block_size):
        stop = min(start + block_size, q.shape[0])
        values, idx = _top_k_block(
            tf.constant(q[start:stop]), g_t, tf.constant(start), k, leave_one_out
        )
        indices[start:stop] = idx.numpy()
        scores[start:stop] = values.numpy()
    return indices, scores


def exact_rows_numpy(q, g, rows, k, leave_one_out, chunk=256):
    """Deterministic exact top-k for some query rows (ties by lower index)."""
    indices = np.empty((len(rows), k), np.int32)
    scores = np.empty((len(rows), k), np.float32)
    for start in range(0, len(rows), chunk):
        sub = rows[start : start + chunk]
        sims = q[sub] @ g.T
        if leave_one_out:
            sims[np.arange(len(sub)), sub] = -np.inf
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
        for i, row in enumerate(sims):
            cand = np.flatnonzero(row >= kth[i])  # increasing index
            best = cand[np.argsort(-row[cand], kind="stable")[:k]]
            indices[start + i] = best
            scores[start + i] = row[best]
    return indices, scores


# ------------------------------------------------------------------- ScaNN
def _import_scann(backend):
    try:
        import scann
    except ImportError as e:  # pragma: no cover - scann is a dependency
        raise ImportError(
            f"backend={backend!r} needs the `scann` package (pip install scann); "
            "or use backend='exact_rank' or 'exact'."
        ) from e
    return scann


def _scann_ah_searcher(scann, g, n):
    """Tree (about sqrt(N) leaves) + AH (2 dims per block) + exact re-ordering.

    The leaves searched are enough to hold about twice the re-ordered candidates
    (at least 1/8 of them), and `4 * n` candidates (at least 100) are re-scored
    exactly before the top `n` are returned.
    """
    num = g.shape[0]
    reorder = min(num, max(4 * n, 100))
    builder = scann.scann_ops_pybind.builder(g, n, "dot_product")
    num_leaves = int(np.clip(round(np.sqrt(num)), 1, 4096))
    if num_leaves >= 4:
        needed = int(np.ceil(2 * reorder * num_leaves / num))
        builder = builder.tree(
            num_leaves=num_leaves,
            num_leaves_to_search=min(num_leaves, max(2, num_leaves // 8, needed)),
            training_sample_size=min(num, 100_000),
        )
    builder = builder.score_ah(2, anisotropic_quantization_threshold=0.2)
    return builder.reorder(reorder).build()


def _scann_search(q, g, k, leave_one_out, block_size, approximate=False):
    """ScaNN lists: brute force (exact float32), or tree + AH (approximate)."""
    backend = "scann_ah" if approximate else "scann"
    scann = _import_scann(backend)
    num_gallery = g.shape[0]
    # One extra neighbour for self (leave-one-out) and one to detect ties at the
    # K-th position, which ScaNN may break arbitrarily.
    n = min(k + int(leave_one_out) + 1, num_gallery)
    if approximate:
        searcher = _scann_ah_searcher(scann, g, n)
    else:
        builder = scann.scann_ops_pybind.builder(g, n, "dot_product")
        searcher = builder.score_brute_force().build()
    idx, scores = searcher.search_batched_parallel(
        q, final_num_neighbors=n, batch_size=block_size
    )
    idx = np.asarray(idx).astype(np.int32, copy=False)
    scores = np.asarray(scores, dtype=np.float32)
    # Searched leaves holding fewer than n items pad with (0, NaN): mark them so
    # they are not taken for a query itself; such rows are searched exactly below.
    short = np.flatnonzero(np.isnan(scores).any(axis=1))
    idx[np.isnan(scores)] = -1
    scores[np.isnan(scores)] = -np.inf
    # Deterministic order: decreasing score, then increasing index (tied rows only).
    tied = np.flatnonzero(np.any(scores[:, 1:] == scores[:, :-1], axis=1))
    if tied.size:
        order = np.lexsort((idx[tied], -scores[tied]), axis=-1)
        idx[tied] = np.take_along_axis(idx[tied], order, axis=1)
        scores[tied] = np.take_along_axis(scores[tied], order, axis=1)
    if leave_one_out:
        drop = idx == np.arange(q.shape[0], dtype=np.int32)[:, None]
        drop[~drop.any(axis=1), -1] = True  # self not returned: drop the extra one
        keep = ~drop
        idx = idx[keep].reshape(q.shape[0], n - 1)
        scores = scores[keep].reshape(q.shape[0], n - 1)
    if idx.shape[1] > k:
        # A tie across the K-th position: ScaNN may have skipped a tied item with
        # a lower index. Redo those few rows exactly (exact engine only).
        ambiguous = np.flatnonzero(scores[:, k - 1] == scores[:, k])
        idx, scores = idx[:, :k].copy(), scores[:, :k].copy()
        if ambiguous.size and not approximate:
            idx[ambiguous], scores[ambiguous] = exact_rows_numpy(
                q, g, ambiguous, k, leave_one_out
            )
    if short.size:
        idx[short], scores[short] = exact_rows_numpy(q, g, short, k, leave_one_out)
    return idx, scores


def search(q, g, k, leave_one_out, backend, block_size):
    """Top-`k` lists of the engine `backend` (`exact_rank` lists are `exact`)."""
    backend = list_engine(backend)
    block_size = inputs.check_block_size(block_size, _DEFAULT_BLOCK_SIZE[backend])
    if backend == "exact":
        return _exact_search(q, g, int(k), leave_one_out, block_size)
    return _scann_search(
        q, g, int(k), leave_one_out, block_size, approximate=backend == "scann_ah"
    )


def nearest_neighbors(
    query_embeddings,
    gallery_embeddings=None,
    k: int = 1,
    backend: str = "scann",
    block_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` neighbours by dot product, computed once for all metrics.

    Args:
        query_embeddings: `(num_queries, dim)` float array, L2-normalised.
        gallery_embeddings: `(num_gallery, dim)` float array, or `None` for
            leave-one-out: the queries search each other and each query's own row
            is excluded by index.
        k: number of neighbours, `1 <= k <= num_gallery` (`num_queries - 1` for
            leave-one-out).
        backend: `"scann"` (ScaNN brute force, multithreaded, exact), `"exact"`
            (blocked TensorFlow matmul + `top_k`, exact; `"exact_rank"` lists are
            these), or `"scann_ah"` (ScaNN tree + asymmetric hashing + exact
            re-ordering: approximate, it may miss true neighbours).
        block_size: query rows per block (`exact`: bounds memory to
            `block_size * num_gallery` floats; ScaNN: the batch each thread
            searches). `None` picks a default.

    Returns:
        `(indices, scores)`, both `(num_queries, k)`: int32 row indices into the
        gallery (into the queries for leave-one-out) and float32 dot products,
        by decreasing score; equal scores by increasing index.

    Example:
    >>> x = np.eye(3, dtype="float32")
    >>> idx, _ = nearest_neighbors(x, k=2, backend="exact")
    >>> idx.tolist()
    [[1, 2], [0, 2], [0, 1]]
    """
    check_engine(backend)
    q, g, leave_one_out = inputs.prepare_search(query_embeddings, gallery_embeddings)
    (k,) = inputs.check_ks(
        k,
        g.shape[0] - int(leave_one_out),
        inputs.gallery_reason(g.shape[0], leave_one_out),
    )
    return search(q, g, k, leave_one_out, backend, block_size)
