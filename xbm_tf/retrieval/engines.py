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

Neighbours are ordered by decreasing dot product, equal ones by increasing
gallery index, with one definition of the order for every engine (as in
`xbm_tf.retrieval.counting`): the exact dot products of the float32
embeddings. The engines compute float32 scores, which order the items as their
exact values wherever two scores are further apart than the float32 rounding
band (`inputs.score_band`). A list with scores inside the band of each other
(ties, duplicates, near-duplicates) is re-ranked from float64 dot products
(`canonical_lists`), and a query whose band reaches past its last float32
candidate is searched again in float64 (`canonical_rows`). So the exact engines
return identical lists, and identical Recall@K; only items whose exact scores
differ by less than float64 rounding (about 1e-16) may still be ordered apart.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from xbm_tf.retrieval import counting, inputs

__all__ = ["APPROXIMATE_ENGINES", "ENGINES", "EXACT_ENGINES", "nearest_neighbors"]

ENGINES = ("exact_rank", "exact", "scann", "scann_ah")
EXACT_ENGINES = ("exact_rank", "exact", "scann")
APPROXIMATE_ENGINES = ("scann_ah",)
_DEFAULT_BLOCK_SIZE = {"exact": 1024, "scann": 1024, "scann_ah": 1024}
# Float32 candidates beyond the k-th, so that near-ties across the k-th are seen.
CANDIDATE_MARGIN = 16
# Float64 products re-scored at once (128 MB).
_RESCORE_CHUNK = 2**24


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


def _exact_search(q, g, k, leave_one_out, block_size, ordered=None):
    """Blocked matmul + top_k, then the canonical order; memory is
    O(block_size * num_gallery)."""
    g_t = tf.constant(g)
    c = min(k + CANDIDATE_MARGIN, g.shape[0] - int(leave_one_out))
    indices = np.empty((q.shape[0], c), np.int32)
    scores = np.empty((q.shape[0], c), np.float32)
    for start in range(0, q.shape[0], block_size):
        stop = min(start + block_size, q.shape[0])
        values, idx = _top_k_block(
            tf.constant(q[start:stop]), g_t, tf.constant(start), c, leave_one_out
        )
        indices[start:stop] = idx.numpy()
        scores[start:stop] = values.numpy()
    return canonical_lists(q, g, indices, scores, k, leave_one_out, ordered=ordered)


def canonical_lists(q, g, idx, scores, k, leave_one_out, exact=True, ordered=None):
    """The top `k` of float32 candidate lists, in the canonical order.

    Args:
        q, g: float32 queries and gallery.
        idx, scores: `(Q, c)` candidates, `c >= k`, by decreasing float32 score
            (ties in any order); index -1 and score -inf for none; a query's own
            row (leave-one-out) is not among them.
        k: the list length returned.
        leave_one_out: whether `g` is `q` (a query's own row is excluded).
        exact: the candidates are the float32 top `c` (exact engines); then a
            query whose rounding band reaches its last candidate is searched
            again (`canonical_rows`). Queries with fewer than `k` candidates are
            searched again in any case.
        ordered: how many leading places must be in the canonical order (all
            `k` by default). Deep lists have many near gaps, so a caller that
            needs only the first places (MAP@R's top R within lists made for
            Recall@1000, whose ranks `counting` makes exact itself) says so;
            0 returns the float32 lists as they are.

    Returns:
        `(indices int32 (Q, k), scores float32 (Q, k))`. Candidates whose float32
        scores are further than the band from their neighbours' (the usual case)
        keep their place and float32 score; each chain of candidates within the
        band of each other is re-scored in float64 (summed per pair, as in
        `counting`) and re-ordered, and returns those scores rounded to float32.
    """
    idx = np.array(idx, np.int32)
    scores = np.array(scores, np.float32)
    num_queries, c = idx.shape
    ordered = k if ordered is None else min(int(ordered), k)
    band = 2.0 * inputs.score_band(q, g)  # two different kernels
    redo = np.count_nonzero(idx >= 0, axis=1) < k
    if ordered == 0:
        return _with_rows_searched(
            q, g, idx[:, :k], scores[:, :k], redo, k, leave_one_out
        )
    # From the float32 scores: an item past the last candidate may reach the
    # last ordered place.
    if exact and c < g.shape[0] - int(leave_one_out):
        redo |= scores[:, c - 1] >= scores[:, ordered - 1] - band
    # Chains of candidates whose adjacent float32 scores are within the band may
    # be misordered; chains reaching position k decide the top k. Only their
    # members are re-scored: a chain's exact scores lie apart from the others'.
    with np.errstate(invalid="ignore"):  # -inf - -inf: no candidate there
        near = scores[:, :-1] - scores[:, 1:] <= band[:, None]
    chain = np.concatenate(
        [np.zeros((num_queries, 1), np.int64), np.cumsum(~near, axis=1)], axis=1
    )
    in_play = chain <= chain[:, ordered - 1, None]  # chained places: one id
    linked = np.zeros_like(in_play)
    linked[:, 1:] |= near
    linked[:, :-1] |= near
    marked = in_play & linked & (idx >= 0) & ~redo[:, None]
    qi, pj = np.nonzero(marked)
    if qi.size:
        key = scores.astype(np.float64)
        exact64 = np.empty(qi.size)
        chunk = max(1, _RESCORE_CHUNK // q.shape[1])
        for start in range(0, qi.size, chunk):
            part = slice(start, start + chunk)
            exact64[part] = counting._canonical_scores(
                q[qi[part]], g[idx[qi[part], pj[part]]]
            )
        key[qi, pj] = exact64
        rows = np.unique(qi)
        tie_break = np.where(idx[rows] >= 0, idx[rows], np.iinfo(np.int32).max)
        order = np.lexsort((tie_break, -key[rows]), axis=-1)
        idx[rows] = np.take_along_axis(idx[rows], order, axis=1)
        scores[rows] = np.take_along_axis(key[rows], order, axis=1)
    return _with_rows_searched(q, g, idx[:, :k], scores[:, :k], redo, k, leave_one_out)


def _with_rows_searched(q, g, idx, scores, redo, k, leave_one_out):
    """`idx, scores` with the rows where `redo` replaced by `canonical_rows`."""
    rows = np.flatnonzero(redo)
    if rows.size:
        idx, scores = idx.copy(), scores.copy()
        idx[rows], scores[rows] = canonical_rows(q, g, rows, k, leave_one_out)
    return idx, scores


def canonical_rows(q, g, rows, k, leave_one_out, chunk=256):
    """The top `k` of the queries `rows` in the canonical order, searched whole.

    Every item whose float32 score comes within twice the rounding band of the
    k-th float32 score may belong to the top `k` by exact score; these are
    re-scored in float64 and ordered (equal scores by lower index).
    """
    band = 2.0 * inputs.score_band(q, g)
    indices = np.empty((len(rows), k), np.int32)
    scores = np.empty((len(rows), k), np.float32)
    for start in range(0, len(rows), chunk):
        sub = rows[start : start + chunk]
        sims = q[sub] @ g.T
        if leave_one_out:
            sims[np.arange(len(sub)), sub] = -np.inf
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
        for i, row in enumerate(sub):
            cand = np.flatnonzero(sims[i] >= kth[i] - band[row])  # increasing
            exact64 = counting._canonical_scores(q[row], g[cand])
            best = np.lexsort((cand, -exact64))[:k]
            indices[start + i] = cand[best]
            scores[start + i] = exact64[best]
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


def _scann_search(q, g, k, leave_one_out, block_size, approximate=False, ordered=None):
    """ScaNN lists: brute force (exact float32), or tree + AH (approximate)."""
    backend = "scann_ah" if approximate else "scann"
    scann = _import_scann(backend)
    num_gallery = g.shape[0]
    # One extra neighbour for self (leave-one-out), and a margin to see near-ties
    # at the K-th position, which ScaNN may break arbitrarily.
    n = min(k + int(leave_one_out) + CANDIDATE_MARGIN, num_gallery)
    if approximate:
        searcher = _scann_ah_searcher(scann, g, n)
    else:
        builder = scann.scann_ops_pybind.builder(g, n, "dot_product")
        searcher = builder.score_brute_force().build()
    idx, scores = searcher.search_batched_parallel(
        q, final_num_neighbors=n, batch_size=block_size
    )
    idx = np.asarray(idx).astype(np.int32, copy=True)
    scores = np.asarray(scores, dtype=np.float32).copy()
    # Searched leaves holding fewer than n items pad with (0, NaN): mark them as
    # missing (canonical_lists searches rows left with fewer than k again).
    idx[np.isnan(scores)] = -1
    scores[np.isnan(scores)] = -np.inf
    if leave_one_out:
        drop = idx == np.arange(q.shape[0], dtype=np.int32)[:, None]
        drop[~drop.any(axis=1), -1] = True  # self not returned: drop the last one
        keep = ~drop
        idx = idx[keep].reshape(q.shape[0], n - 1)
        scores = scores[keep].reshape(q.shape[0], n - 1)
    return canonical_lists(
        q, g, idx, scores, k, leave_one_out, exact=not approximate, ordered=ordered
    )


def search(q, g, k, leave_one_out, backend, block_size, ordered=None):
    """Top-`k` lists of the engine `backend` (`exact_rank` lists are `exact`),
    the first `ordered` places (default all) in the canonical order."""
    backend = list_engine(backend)
    block_size = inputs.check_block_size(block_size, _DEFAULT_BLOCK_SIZE[backend])
    if backend == "exact":
        return _exact_search(q, g, int(k), leave_one_out, block_size, ordered)
    return _scann_search(
        q,
        g,
        int(k),
        leave_one_out,
        block_size,
        approximate=backend == "scann_ah",
        ordered=ordered,
    )


def nearest_neighbors(
    query_embeddings,
    gallery_embeddings=None,
    k: int = 1,
    backend: str = "scann",
    block_size: int | None = None,
    ordered: int | None = None,
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
        ordered: how many leading places are put in the canonical order (see
            the module docstring); default all `k`. Each chain of near-tied
            scores reaching them is re-scored in float64: few for a short
            list, many for a deep one (k = 1,000 at 12,000 x 512 took 10x the
            float32 search), so pass fewer when only the first places matter;
            0 returns the float32 lists as computed (ties in any order).

    Returns:
        `(indices, scores)`, both `(num_queries, k)`: int32 row indices into the
        gallery (into the queries for leave-one-out) and float32 dot products,
        by decreasing exact score (float64 where float32 cannot tell); equal
        scores by increasing index.

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
    return search(q, g, k, leave_one_out, backend, block_size, ordered)
