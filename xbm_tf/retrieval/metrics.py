"""Retrieval metrics: Recall@K, MAP@R and R-precision.

Two protocols share one calling convention
`f(query_embeddings, query_labels, gallery_embeddings=None, gallery_labels=None, ...)`:

* Leave-one-out (CUB-200-2011, Cars196, Stanford Online Products): no gallery is
  given; every query searches all the *other* queries. The query itself is removed
  by its index, never by a similarity threshold, so duplicates of a query still
  count as neighbours.
* Query/gallery (In-Shop Clothes): queries search a separate gallery.

Embeddings are assumed L2-normalised and similarity is the dot product (so the
ranking equals the cosine/Euclidean ranking). Neighbours are ordered by decreasing
similarity; equal similarities by increasing gallery index.

`backend` names the engine that finds the neighbours for every metric it reports
(see `xbm_tf.retrieval.engines`): `"exact_rank"` (the default: Recall@K by exact
rank counting over a blocked TensorFlow matmul, MAP@R from exact top-R lists),
`"exact"` (TensorFlow top-k lists), `"scann"` (ScaNN brute-force lists) and
`"scann_ah"` (approximate ScaNN tree + AH lists; its results carry
`"approximate": 1.0`). The three exact engines return identical Recall@K, ties
and near-ties included (`xbm_tf.retrieval.counting`).

A query whose class has no other member in the gallery (e.g. a singleton class under
leave-one-out) still counts as a query: for Recall@K it is a miss at every K, as in
the papers' protocol (every test image is a query). For MAP@R and R-precision, R = 0
makes the per-query score undefined (0/0), so such queries are excluded from the
mean, as in Musgrave et al. 2020; if no query has R > 0 the result is NaN.

Reference:
    - Song et al., "Deep Metric Learning via Lifted Structured Feature Embedding",
      CVPR 2016 (the Recall@K protocol for CUB, Cars, SOP).
    - Liu et al., "DeepFashion", CVPR 2016 (the In-Shop query/gallery protocol).
    - Musgrave et al., "A Metric Learning Reality Check", ECCV 2020 (MAP@R).
"""

from __future__ import annotations

import logging

import numpy as np

from xbm_tf.retrieval import counting, engines, inputs

__all__ = [
    "first_correct_ranks",
    "map_at_r",
    "metrics_from_neighbors",
    "r_precision",
    "recall_at_k",
    "retrieval_metrics",
]

DEFAULT_ENGINE = "exact_rank"
_METRIC_CHUNK_ROWS = 8192
# The exact_rank engine falls back to a top-k search of at most this many
# neighbours (then counting of the queries it misses) when classes are huge.
SEARCH_K_CAP = 64

_logger = logging.getLogger(__name__)


def _scan_neighbors(neighbor_indices, q_codes, g_codes, r, with_map):
    """Per-query rank of the first same-class neighbour, and MAP@R/RP sums.

    Returns:
        `(first, ap_sum, rp_sum)`: `first[i]` is the 0-based rank of query i's
        first same-class neighbour in its list, `NO_HIT` if none is listed.
    """
    num_queries = neighbor_indices.shape[0]
    max_r = int(r.max()) if with_map else 0
    first = np.full(num_queries, counting.NO_HIT, np.int64)
    ap_sum = rp_sum = 0.0
    for start in range(0, num_queries, _METRIC_CHUNK_ROWS):
        stop = min(start + _METRIC_CHUNK_ROWS, num_queries)
        hit = g_codes[neighbor_indices[start:stop]] == q_codes[start:stop, None]
        found = hit.any(axis=1)
        first[start:stop][found] = hit.argmax(axis=1)[found]
        if with_map and max_r > 0:
            rq = r[start:stop]
            pos = np.arange(1, max_r + 1)
            rel = hit[:, :max_r] & (pos[None, :] <= rq[:, None])
            precision = np.cumsum(rel, axis=1) / pos
            valid = rq > 0
            ap = (precision * rel).sum(axis=1)[valid] / rq[valid]
            ap_sum += float(ap.sum(dtype=np.float64))
            rp = rel.sum(axis=1)[valid] / rq[valid]
            rp_sum += float(rp.sum(dtype=np.float64))
    return first, ap_sum, rp_sum


def _map_values(ap_sum, rp_sum, r):
    num_valid = int(np.count_nonzero(r > 0))
    if num_valid == 0:
        _logger.warning("No query has another item of its class: MAP@R is NaN.")
        return {"map@r": float("nan"), "r_precision": float("nan")}
    return {"map@r": ap_sum / num_valid, "r_precision": rp_sum / num_valid}


def _search_then_count(q, g, q_codes, g_codes, r, loo, max_k, block_size):
    """exact_rank with huge classes: a top-k search, then counting the misses."""
    k = min(max_k + 1, SEARCH_K_CAP, g.shape[0] - int(loo))
    # ranks_from_lists makes the ranks exact itself: no canonical order needed.
    idx, scores = engines.search(q, g, k, loo, "exact", block_size, ordered=0)
    return counting.ranks_from_lists(
        q, g, q_codes, g_codes, idx, scores, r, loo, max_k, exact=True
    )


def _metrics(q, g, q_codes, g_codes, r, loo, ks, with_map, backend, block_size):
    """Recall@K for `ks` and (if `with_map`) MAP@R and R-precision by `backend`."""
    engines.check_engine(backend)
    list_default = engines._DEFAULT_BLOCK_SIZE[engines.list_engine(backend)]
    inputs.check_block_size(block_size, list_default)
    k_map = int(r.max()) if with_map else 0
    max_k = max(ks) if ks else 0
    out = {}
    ap_sum = rp_sum = 0.0
    first = None
    if backend == "exact_rank":
        if k_map > 0:
            idx, _ = engines.search(q, g, k_map, loo, "exact", block_size)
            _, ap_sum, rp_sum = _scan_neighbors(idx, q_codes, g_codes, r, True)
        if ks:
            rows = inputs.check_block_size(block_size, counting.DEFAULT_BLOCK_SIZE)
            first = counting.count_first_hit_ranks(q, g, q_codes, g_codes, loo, rows)
            if first is None:  # huge classes: top-k search, then count the misses
                first = _search_then_count(
                    q, g, q_codes, g_codes, r, loo, max_k, block_size
                )
    else:
        n = min(max(max_k + 1, k_map), g.shape[0] - int(loo))
        if n > 0 and (ks or k_map > 0):
            # Canonical order for MAP@R's top R only (deep lists have many near
            # gaps); ranks_from_lists makes the Recall@K ranks exact itself.
            idx, scores = engines.search(
                q, g, n, loo, backend, block_size, ordered=k_map
            )
            if k_map > 0:
                _, ap_sum, rp_sum = _scan_neighbors(idx, q_codes, g_codes, r, True)
            if ks:
                first = counting.ranks_from_lists(
                    q,
                    g,
                    q_codes,
                    g_codes,
                    idx,
                    scores,
                    r,
                    loo,
                    max_k,
                    exact=not engines.is_approximate(backend),
                )
    for kk in ks:
        out[f"recall@{kk}"] = int(np.count_nonzero(first < kk)) / len(q)
    if with_map:
        out.update(_map_values(ap_sum, rp_sum, r))
    return out


def metrics_from_neighbors(
    neighbor_indices,
    query_labels,
    gallery_labels=None,
    ks=(1, 2, 4, 8),
) -> dict[str, float]:
    """Recall@K for many K, MAP@R and R-precision from one neighbour search.

    Args:
        neighbor_indices: `(num_queries, n)` int array from `nearest_neighbors`
            (self already excluded for leave-one-out), sorted by rank.
        query_labels: `(num_queries,)` class labels.
        gallery_labels: `(num_gallery,)` labels, or `None` when the neighbours
            index into the queries (leave-one-out).
        ks: the K of Recall@K; each must be `<= n`.

    Returns:
        `{"recall@K": float for each K, "map@r": float, "r_precision": float}`.
        MAP@R and R-precision are included only if `n >= max R` (the largest
        number of other items in a query's class); R = 0 queries are excluded.

    Example:
    >>> nn = np.array([[1], [2], [3], [1]])
    >>> metrics_from_neighbors(nn, np.array([0, 0, 1, 1]), ks=(1,))
    {'recall@1': 0.5, 'map@r': 0.5, 'r_precision': 0.5}
    """
    nn = np.asarray(neighbor_indices)
    if nn.ndim != 2:
        raise ValueError(
            f"`neighbor_indices` must be 2-D; got shape {tuple(nn.shape)}."
        )
    ql = inputs.as_labels(query_labels, "query_labels", nn.shape[0])
    leave_one_out = gallery_labels is None
    gl = ql if leave_one_out else np.asarray(gallery_labels)
    if gl.ndim != 1:
        raise ValueError(f"`gallery_labels` must be 1-D; got shape {tuple(gl.shape)}.")
    if nn.size and (nn.min() < 0 or nn.max() >= gl.shape[0]):
        raise ValueError(
            f"`neighbor_indices` must lie in [0, {gl.shape[0]}); got values in "
            f"[{nn.min()}, {nn.max()}]."
        )
    if leave_one_out:
        codes = np.unique(ql, return_inverse=True)[1].reshape(-1)
        q_codes = g_codes = codes
    else:
        codes = np.unique(np.concatenate([ql, gl]), return_inverse=True)[1]
        codes = codes.reshape(-1)
        q_codes, g_codes = codes[: ql.shape[0]], codes[ql.shape[0] :]
    ks = inputs.check_ks(
        ks, nn.shape[1], f"`neighbor_indices` has {nn.shape[1]} columns"
    )
    r = inputs.num_relevant(q_codes, g_codes, leave_one_out)
    with_map = int(r.max()) <= nn.shape[1]
    first, ap_sum, rp_sum = _scan_neighbors(nn, q_codes, g_codes, r, with_map)
    out = {f"recall@{k}": int(np.count_nonzero(first < k)) / len(first) for k in ks}
    if with_map:
        out.update(_map_values(ap_sum, rp_sum, r))
    return out


def _checked(query_embeddings, query_labels, gallery_embeddings, gallery_labels, ks):
    q, q_codes, g, g_codes, loo = inputs.prepare(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels
    )
    if ks is not None:  # None: MAP@R only
        limit = g.shape[0] - int(loo)
        ks = inputs.check_ks(ks, limit, inputs.gallery_reason(g.shape[0], loo))
    r = inputs.num_relevant(q_codes, g_codes, loo)
    return q, q_codes, g, g_codes, loo, ks, r


def retrieval_metrics(
    query_embeddings,
    query_labels,
    gallery_embeddings=None,
    gallery_labels=None,
    ks=(1, 2, 4, 8),
    backend: str = DEFAULT_ENGINE,
    block_size: int | None = None,
) -> dict[str, float]:
    """Recall@K for every K, MAP@R and R-precision, all found by one engine.

    Args:
        query_embeddings: `(num_queries, dim)` L2-normalised embeddings.
        query_labels: `(num_queries,)` class labels.
        gallery_embeddings: `(num_gallery, dim)` embeddings, or `None` for the
            leave-one-out protocol (CUB, Cars, SOP).
        gallery_labels: `(num_gallery,)` labels, or `None`.
        ks: the K of Recall@K.
        backend: the engine, see `xbm_tf.retrieval.engines`: `"exact_rank"`
            (default; Recall@K by rank counting, MAP@R from exact top-R
            lists), `"exact"`, `"scann"` (exact lists for every metric) or
            `"scann_ah"` (approximate).
        block_size: query rows per block of the search and of the counting
            pass; see `nearest_neighbors`.

    Returns:
        `{"recall@1": ..., "recall@K": ..., "map@r": ..., "r_precision": ...}`,
        plus `"approximate": 1.0` when the engine is approximate (`scann_ah`).

    Example:
    >>> x = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], "float32")
    >>> retrieval_metrics(x, [0, 0, 1, 1], ks=(1,), backend="exact")["recall@1"]
    1.0
    """
    engines.check_engine(backend)
    q, q_codes, g, g_codes, loo, ks, r = _checked(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels, ks
    )
    out = _metrics(q, g, q_codes, g_codes, r, loo, ks, True, backend, block_size)
    if engines.is_approximate(backend):
        out["approximate"] = 1.0
    return out


def recall_at_k(
    query_embeddings,
    query_labels,
    gallery_embeddings=None,
    gallery_labels=None,
    ks=(1, 2, 4, 8),
    backend: str = DEFAULT_ENGINE,
    block_size: int | None = None,
) -> dict[int, float]:
    """Recall@K: the fraction of queries with a same-class item in their top K.

    Without a gallery this is the leave-one-out protocol of CUB, Cars and SOP
    (each query searches all other queries; itself is excluded by index); with a
    gallery, the In-Shop query/gallery protocol. A query with no other item of its
    class counts as a miss at every K.

    With the default `"exact_rank"` engine all K come from one counting pass:
    the rank of each query's best same-class item is the number of candidates
    scoring higher (plus equal scores at lower indices), counted in a blocked
    float32 TensorFlow matmul pass (only the upper triangle of the similarity
    matrix under leave-one-out), so no top-K selection is done and R@1000 costs
    the same as R@1. The list engines (`"exact"`, `"scann"`) search the top
    `max(ks) + 1` and return the same values; `"scann_ah"` is approximate.

    Args:
        query_embeddings: `(num_queries, dim)` L2-normalised embeddings.
        query_labels: `(num_queries,)` class labels.
        gallery_embeddings: `(num_gallery, dim)` embeddings, or `None`.
        gallery_labels: `(num_gallery,)` labels, or `None`.
        ks: the K values; each at most the gallery size (`num_queries - 1` for
            leave-one-out).
        backend: `"exact_rank"` (default), `"exact"`, `"scann"` or
            `"scann_ah"`; see `xbm_tf.retrieval.engines`.
        block_size: query rows per block of the counting pass or search
            (memory `block_size * num_gallery` floats); `None` picks 1024.

    Returns:
        `{K: recall}` for every K in `ks`.

    Example:
    >>> x = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], "float32")
    >>> recall_at_k(x, [0, 0, 1, 1], ks=(1, 2))
    {1: 0.5, 2: 1.0}
    """
    engines.check_engine(backend)
    q, q_codes, g, g_codes, loo, ks, r = _checked(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels, ks
    )
    out = _metrics(q, g, q_codes, g_codes, r, loo, ks, False, backend, block_size)
    return {k: out[f"recall@{k}"] for k in ks}


def _map_and_rp(query_embeddings, query_labels, gallery_embeddings, gallery_labels,
                backend, block_size):  # fmt: skip
    engines.check_engine(backend)
    q, q_codes, g, g_codes, loo, _, r = _checked(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels, None
    )
    return _metrics(q, g, q_codes, g_codes, r, loo, (), True, backend, block_size)


def map_at_r(
    query_embeddings,
    query_labels,
    gallery_embeddings=None,
    gallery_labels=None,
    backend: str = DEFAULT_ENGINE,
    block_size: int | None = None,
) -> float:
    """MAP@R (Musgrave et al. 2020): mean average precision over the top R.

    For a query with R other items of its class in the gallery,
    `AP@R = (1/R) * sum_{i<=R} P(i) * rel(i)`, where `rel(i)` is 1 if the i-th
    neighbour has the query's class and `P(i)` is the precision over the first i.
    Queries with R = 0 are excluded from the mean (NaN if all have R = 0).

    Args:
        query_embeddings: `(num_queries, dim)` L2-normalised embeddings.
        query_labels: `(num_queries,)` class labels.
        gallery_embeddings: `(num_gallery, dim)` embeddings, or `None` for
            leave-one-out.
        gallery_labels: `(num_gallery,)` labels, or `None`.
        backend: the engine of the top-R lists (`"exact_rank"` and `"exact"`:
            TensorFlow; `"scann"`; `"scann_ah"`, approximate).
        block_size: see `nearest_neighbors`.

    Returns:
        MAP@R as a float in [0, 1].

    Example:
    >>> x = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], "float32")
    >>> map_at_r(x, [0, 0, 1, 1], backend="exact")
    0.5
    """
    return _map_and_rp(
        query_embeddings,
        query_labels,
        gallery_embeddings,
        gallery_labels,
        backend,
        block_size,
    )["map@r"]


def r_precision(
    query_embeddings,
    query_labels,
    gallery_embeddings=None,
    gallery_labels=None,
    backend: str = DEFAULT_ENGINE,
    block_size: int | None = None,
) -> float:
    """R-precision: the fraction of same-class items among the top R neighbours.

    R is the number of other items of the query's class in the gallery; queries
    with R = 0 are excluded from the mean (NaN if all have R = 0).

    Args:
        query_embeddings: `(num_queries, dim)` L2-normalised embeddings.
        query_labels: `(num_queries,)` class labels.
        gallery_embeddings: `(num_gallery, dim)` embeddings, or `None` for
            leave-one-out.
        gallery_labels: `(num_gallery,)` labels, or `None`.
        backend: the engine of the top-R lists, as for `map_at_r`.
        block_size: see `nearest_neighbors`.

    Returns:
        R-precision as a float in [0, 1].

    Example:
    >>> x = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], "float32")
    >>> r_precision(x, [0, 0, 1, 1], backend="exact")
    0.5
    """
    return _map_and_rp(
        query_embeddings,
        query_labels,
        gallery_embeddings,
        gallery_labels,
        backend,
        block_size,
    )["r_precision"]


def first_correct_ranks(
    query_embeddings,
    query_labels,
    gallery_embeddings=None,
    gallery_labels=None,
    block_size: int | None = None,
) -> np.ndarray:
    """The exact 0-based rank of each query's first correct (same-class) result.

    The number Recall@K thresholds (a hit at K iff the rank is below K), for
    every query: rank 0 is a hit at 1; the hardest queries are those whose rank
    is largest. Ranks are exact in the sense of `recall_at_k` (exact dot
    products, ties by lower index), from the `"exact_rank"` counting pass.

    Args:
        query_embeddings: `(num_queries, dim)` L2-normalised embeddings.
        query_labels: `(num_queries,)` class labels.
        gallery_embeddings: `(num_gallery, dim)` embeddings, or `None` for
            leave-one-out (each query searches the other queries).
        gallery_labels: `(num_gallery,)` labels, or `None`.
        block_size: query rows per block of the counting pass; `None` picks 1024.

    Returns:
        int64 `(num_queries,)`: the rank, or -1 for a query with no other item of
        its class (never correct).

    Example:
    >>> x = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1], [0, -1]], "float32")
    >>> ranks = first_correct_ranks(x, [0, 0, 1, 1, 2])
    >>> ranks.tolist()  # query 1's nearest is query 2, of the other class
    [0, 1, 1, 0, -1]
    >>> np.argsort(-ranks, kind="stable")[:2].tolist()  # the two hardest queries
    [1, 2]
    """
    q, q_codes, g, g_codes, loo, _, _ = _checked(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels, None
    )
    rows = inputs.check_block_size(block_size, counting.DEFAULT_BLOCK_SIZE)
    ranks = counting.count_first_hit_ranks(q, g, q_codes, g_codes, loo, rows)
    if ranks is None:  # huge classes: rank every query by its float64 re-scoring
        members = np.bincount(g_codes, minlength=int(q_codes.max()) + 1)[q_codes]
        ranks = np.full(len(q), counting.NO_HIT, np.int64)
        hits = np.flatnonzero(members > int(loo))  # another item of its class
        if hits.size:
            band = inputs.score_band(q, g)
            ranks[hits] = counting.first_hit_ranks(
                q, g, q_codes, g_codes, hits, loo, band
            )
    return np.where(ranks == counting.NO_HIT, -1, ranks).astype(np.int64)
