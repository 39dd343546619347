"""Retrieval evaluation: Recall@K, MAP@R and R-precision with ScaNN or exact search.

Two protocols share one calling convention
`f(query_embeddings, query_labels, gallery_embeddings=None, gallery_labels=None, ...)`:

* Leave-one-out (CUB-200-2011, Cars196, Stanford Online Products): no gallery is
  given; every query searches all the *other* queries. The query itself is removed
  by its index, never by a similarity threshold, so duplicates of a query still
  count as neighbours.
* Query/gallery (In-Shop Clothes): queries search a separate gallery.

Embeddings are assumed L2-normalised and similarity is the dot product (so the
ranking equals the cosine/Euclidean ranking). Neighbours are ordered by decreasing
similarity; equal similarities are ordered by increasing gallery index, on both
backends, so results are deterministic. "Equal" means equal float32 scores as
computed: SIMD kernels may round the dot products with two identical gallery vectors
differently (by an ulp, depending on their position), and such near-ties keep the
order of their computed scores, which is still deterministic for a given input.

A query whose class has no other member in the gallery (e.g. a singleton class under
leave-one-out) still counts as a query: for Recall@K it is a miss at every K, as in
the papers' protocol (every test image is a query). For MAP@R and R-precision, R = 0
makes the per-query score undefined (0/0), so such queries are excluded from the
mean, as in Musgrave et al. 2020; if no query has R > 0 the result is NaN.

All metrics are exact (no approximate search). Recall@K for every K comes from one
blocked float32 matmul pass that counts, for each query, the candidates ranked
before its best same-class item (its 0-based rank; a hit at K iff rank < K), with
no top-k selection; under leave-one-out only the upper triangle of the symmetric
similarity matrix is computed. This pass is plain numpy/BLAS whatever the backend.
MAP@R and R-precision need the top R neighbours, found by the backend's search
(`nearest_neighbors`; ScaNN brute force by default).

Reference:
    - Song et al., "Deep Metric Learning via Lifted Structured Feature Embedding",
      CVPR 2016 (the Recall@K protocol for CUB, Cars, SOP).
    - Liu et al., "DeepFashion", CVPR 2016 (the In-Shop query/gallery protocol).
    - Musgrave et al., "A Metric Learning Reality Check", ECCV 2020 (MAP@R).
"""

from __future__ import annotations

import logging
import numbers

import keras
import numpy as np
from keras import ops

__all__ = [
    "map_at_r",
    "metrics_from_neighbors",
    "nearest_neighbors",
    "r_precision",
    "recall_at_k",
    "retrieval_metrics",
]

BACKENDS = ("scann", "exact")
_DEFAULT_BLOCK_SIZE = {"scann": 1024, "exact": 1024}
_METRIC_CHUNK_ROWS = 8192
# Recall@K for K beyond this many neighbours is computed by exact rank counting
# for the queries whose first hit lies beyond the search, instead of a top-K search.
_SEARCH_K_CAP = 64
# Above this many same-class pairs per query, rank counting falls back to search.
_MAX_PAIRS_PER_QUERY = 256

_logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- checks
def _as_embeddings(x, name: str) -> np.ndarray:
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


def _as_labels(y, name: str, num_items: int) -> np.ndarray:
    y = np.asarray(keras.ops.convert_to_numpy(y) if keras.ops.is_tensor(y) else y)
    if y.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D; got shape {tuple(y.shape)}.")
    if y.shape[0] != num_items:
        raise ValueError(
            f"`{name}` has {y.shape[0]} labels but the embeddings have "
            f"{num_items} rows."
        )
    return y


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}; got {backend!r}.")


def _check_ks(ks, limit: int, limit_reason: str) -> tuple[int, ...]:
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


def _gallery_reason(num_gallery: int, leave_one_out: bool) -> str:
    if leave_one_out:
        return (
            f"leave-one-out over {num_gallery} queries leaves {num_gallery - 1} "
            "candidates per query"
        )
    return f"the gallery has {num_gallery} items"


def _prepare(query_embeddings, query_labels, gallery_embeddings, gallery_labels):
    """Validates inputs; returns (q, q_codes, g, g_codes, leave_one_out)."""
    q = _as_embeddings(query_embeddings, "query_embeddings")
    ql = _as_labels(query_labels, "query_labels", q.shape[0])
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
    g = _as_embeddings(gallery_embeddings, "gallery_embeddings")
    gl = _as_labels(gallery_labels, "gallery_labels", g.shape[0])
    if g.shape[1] != q.shape[1]:
        raise ValueError(
            f"Dimension mismatch: query embeddings have dim {q.shape[1]}, "
            f"gallery embeddings have dim {g.shape[1]}."
        )
    codes = np.unique(np.concatenate([ql, gl]), return_inverse=True)[1].reshape(-1)
    return q, codes[: q.shape[0]], g, codes[q.shape[0] :], False


def _num_relevant(q_codes, g_codes, leave_one_out: bool) -> np.ndarray:
    """R per query: gallery items of the query's class (self excluded)."""
    counts = np.bincount(g_codes, minlength=int(max(q_codes.max(), g_codes.max())) + 1)
    return counts[q_codes] - (1 if leave_one_out else 0)


# ------------------------------------------------------------------------- search
def _exact_search(q, g, k, leave_one_out, block_size):
    """Blocked matmul + top_k; memory is O(block_size * num_gallery)."""
    gallery_t = ops.transpose(ops.convert_to_tensor(g))  # (dim, num_gallery), once
    indices = np.empty((q.shape[0], k), np.int32)
    scores = np.empty((q.shape[0], k), np.float32)
    for start in range(0, q.shape[0], block_size):
        stop = min(start + block_size, q.shape[0])
        sims = ops.matmul(ops.convert_to_tensor(q[start:stop]), gallery_t)
        if leave_one_out:
            rows = np.arange(stop - start, dtype=np.int32)
            self_pos = np.stack([rows, rows + start], axis=1)
            sims = ops.scatter_update(
                sims, self_pos, ops.full((stop - start,), -np.inf, "float32")
            )
        # top_k orders equal values by lower index (documented for TensorFlow).
        values, idx = ops.top_k(sims, k, sorted=True)
        indices[start:stop] = ops.convert_to_numpy(idx)
        scores[start:stop] = ops.convert_to_numpy(values)
    return indices, scores


def _exact_rows_numpy(q, g, rows, k, leave_one_out, chunk=256):
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


def _scann_search(q, g, k, leave_one_out, block_size):
    """ScaNN brute force (exact float32 dot products) on all cores."""
    try:
        import scann
    except ImportError as e:  # pragma: no cover - scann is a dependency
        raise ImportError(
            "backend='scann' needs the `scann` package; install it or use "
            "backend='exact'."
        ) from e
    num_gallery = g.shape[0]
    # One extra neighbour for self (leave-one-out) and one to detect ties at the
    # K-th position, which ScaNN may break arbitrarily.
    n = min(k + int(leave_one_out) + 1, num_gallery)
    searcher = (
        scann.scann_ops_pybind.builder(g, n, "dot_product").score_brute_force().build()
    )
    idx, scores = searcher.search_batched_parallel(
        q, final_num_neighbors=n, batch_size=block_size
    )
    idx = np.asarray(idx).astype(np.int32, copy=False)
    scores = np.asarray(scores, dtype=np.float32)
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
        # a lower index. Redo those few rows exactly.
        ambiguous = np.flatnonzero(scores[:, k - 1] == scores[:, k])
        idx, scores = idx[:, :k].copy(), scores[:, :k].copy()
        if ambiguous.size:
            idx[ambiguous], scores[ambiguous] = _exact_rows_numpy(
                q, g, ambiguous, k, leave_one_out
            )
    return idx, scores


def _check_block_size(block_size, backend: str) -> int:
    if block_size is None:
        return _DEFAULT_BLOCK_SIZE[backend]
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise ValueError(f"`block_size` must be a positive integer; got {block_size}.")
    if block_size < 1:
        raise ValueError(f"`block_size` must be a positive integer; got {block_size}.")
    return int(block_size)


def _search(q, g, k, leave_one_out, backend, block_size):
    block_size = _check_block_size(block_size, backend)
    fn = _scann_search if backend == "scann" else _exact_search
    return fn(q, g, int(k), leave_one_out, block_size)


def nearest_neighbors(
    query_embeddings,
    gallery_embeddings=None,
    k: int = 1,
    backend: str = "scann",
    block_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`k` neighbours by dot product, computed once for all metrics.

    Args:
        query_embeddings: `(num_queries, dim)` float array, L2-normalised.
        gallery_embeddings: `(num_gallery, dim)` float array, or `None` for
            leave-one-out: the queries search each other and each query's own row
            is excluded by index.
        k: number of neighbours, `1 <= k <= num_gallery` (`num_queries - 1` for
            leave-one-out).
        backend: `"scann"` (ScaNN brute force, multithreaded) or `"exact"`
            (blocked matmul + `top_k` in Keras/TensorFlow). Both are exact.
        block_size: query rows per block (`exact`: bounds memory to
            `block_size * num_gallery` floats; `scann`: the batch each thread
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
    _check_backend(backend)
    q = _as_embeddings(query_embeddings, "query_embeddings")
    if gallery_embeddings is None:
        if q.shape[0] < 2:
            raise ValueError(
                f"Leave-one-out needs at least 2 queries; got {q.shape[0]}."
            )
        g, leave_one_out = q, True
    else:
        g = _as_embeddings(gallery_embeddings, "gallery_embeddings")
        if g.shape[1] != q.shape[1]:
            raise ValueError(
                f"Dimension mismatch: query embeddings have dim {q.shape[1]}, "
                f"gallery embeddings have dim {g.shape[1]}."
            )
        leave_one_out = False
    (k,) = _check_ks(
        k, g.shape[0] - int(leave_one_out), _gallery_reason(g.shape[0], leave_one_out)
    )
    return _search(q, g, k, leave_one_out, backend, block_size)


# ------------------------------------------------------------------------ metrics
_NO_HIT = np.iinfo(np.int64).max


def _scan_neighbors(neighbor_indices, q_codes, g_codes, r, with_map):
    """Per-query rank of the first same-class neighbour, and MAP@R/RP sums.

    Returns:
        `(first, ap_sum, rp_sum)`: `first[i]` is the 0-based rank of query i's
        first same-class neighbour in its list, `_NO_HIT` if none is listed.
    """
    num_queries = neighbor_indices.shape[0]
    max_r = int(r.max()) if with_map else 0
    first = np.full(num_queries, _NO_HIT, np.int64)
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


def _first_hit_ranks(q, g, q_codes, g_codes, rows, leave_one_out, chunk=256):
    """Exact 0-based rank of the best same-class item, by counting, for `rows`.

    The rank is the number of candidates ordered before the best same-class item
    j* (largest score, lowest index among equal scores): those with a larger score
    and those with an equal score and a lower index. No top-k selection is needed.
    """
    order = np.argsort(g_codes, kind="stable")  # members by increasing index
    sorted_codes = g_codes[order]
    ranks = np.empty(len(rows), np.int64)
    for start in range(0, len(rows), chunk):
        sub = rows[start : start + chunk]
        sims = q[sub] @ g.T
        for i, row in enumerate(sub):
            code = q_codes[row]
            lo, hi = np.searchsorted(sorted_codes, [code, code + 1])
            members = order[lo:hi]
            scores = sims[i]
            if leave_one_out:
                members = members[members != row]
                scores[row] = -np.inf
            member_scores = scores[members]
            best = member_scores.max()
            j = members[np.argmax(member_scores == best)]
            ranks[start + i] = np.count_nonzero(scores > best) + np.count_nonzero(
                scores[:j] == best
            )
    return ranks


def _best_same_class(q, g, q_codes, g_codes, leave_one_out, chunk=65536):
    """Best same-class score per query (self excluded), `-inf` if there is none.

    Scores come from per-pair dot products, so they may differ from a matmul's by
    rounding; `_count_first_hit_ranks` allows for that. Returns `None` if the
    classes are so large that the pairs would cost more than the matmul.
    """
    counts = np.bincount(g_codes, minlength=int(q_codes.max()) + 1)
    per_query = counts[q_codes]
    total = int(per_query.sum())
    if total > _MAX_PAIRS_PER_QUERY * len(q):
        return None
    order = np.argsort(g_codes, kind="stable")
    class_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if leave_one_out:  # classes of equal size at once: (C, s, dim) @ (C, dim, s)
        best = np.full(len(q), -np.inf, np.float32)
        for size in np.unique(counts[counts > 1]):
            classes = np.flatnonzero(counts == size)
            for c0 in range(0, len(classes), max(1, chunk // (size * size))):
                cls = classes[c0 : c0 + max(1, chunk // (size * size))]
                members = order[class_start[cls][:, None] + np.arange(size)]
                emb = g[members]
                sims = np.matmul(emb, emb.transpose(0, 2, 1))
                sims[:, np.arange(size), np.arange(size)] = -np.inf
                best[members] = sims.max(axis=2)
        return best
    query_of_pair = np.repeat(np.arange(len(q)), per_query)
    pair_offset = np.concatenate([[0], np.cumsum(per_query)[:-1]])
    within = np.arange(total) - np.repeat(pair_offset, per_query)
    member = order[class_start[q_codes[query_of_pair]] + within]
    scores = np.empty(total, np.float32)
    for start in range(0, total, chunk):
        sl = slice(start, start + chunk)
        scores[sl] = np.einsum("ij,ij->i", q[query_of_pair[sl]], g[member[sl]])
    if leave_one_out:
        scores[member == query_of_pair] = -np.inf
    best = np.full(len(q), -np.inf, np.float32)
    has = per_query > 0
    if has.any():
        best[has] = np.maximum.reduceat(scores, pair_offset[has])
    return best


def _count_first_hit_ranks(q, g, q_codes, g_codes, leave_one_out, block_size):
    """Exact 0-based rank of every query's best same-class item, by counting.

    One blocked float32 matmul pass (under leave-one-out only the upper triangle
    of the symmetric similarity matrix, each block updating its rows and its
    columns) counts, per query, the candidates scoring above its best same-class
    score `b`, outside a band `b +- eps` that covers float32 rounding (a bound of
    `2 * dim * 2**-24 * |q| * max|g|`). Where the band holds exactly one score,
    that is the best same-class item and the count is its rank whatever the
    rounding; the few queries with other scores in the band (ties, near-ties) are
    ranked by `_first_hit_ranks`, exactly as documented. No top-k is selected,
    so Recall@K for every K costs one pass. Returns `None` (use the search) if
    the classes are too large for `_best_same_class`.
    """
    best = _best_same_class(q, g, q_codes, g_codes, leave_one_out)
    if best is None:
        return None
    has = np.isfinite(best)
    unit = q.shape[1] * 2.0**-24  # relative error bound of a float32 dot product
    q_sq = np.einsum("ij,ij->i", q, q).astype(np.float64) * (1 + 2 * unit)
    g_sq = float(np.einsum("ij,ij->i", g, g).max()) * (1 + 2 * unit)
    eps = 2.0 * unit * np.sqrt(q_sq * g_sq) + 1e-30
    # Round the band outwards so that float32 thresholds still contain it.
    lo = np.nextafter((best - eps).astype(np.float32), np.float32(-np.inf))
    hi = np.nextafter((best + eps).astype(np.float32), np.float32(np.inf))
    lo[~has] = hi[~has] = np.inf
    above = np.zeros(len(q), np.int64)  # scores > hi
    over_lo = np.zeros(len(q), np.int64)  # scores > lo
    buf = np.empty(min(block_size, len(q)) * g.shape[0], np.bool_)

    def count(sims, thresholds, axis, out):
        mask = buf[: sims.size].reshape(sims.shape)
        np.greater(sims, thresholds, out=mask)
        out += mask.view(np.uint8).sum(axis=axis, dtype=np.int32)

    for start in range(0, len(q), block_size):
        stop = min(start + block_size, len(q))
        if leave_one_out:
            # Upper triangle strip: its rows get every column from `start` on (the
            # columns before were counted by earlier strips), and the columns
            # after the block get these rows.
            sims = q[start:stop] @ g[start:].T
            rows = np.arange(stop - start)
            sims[rows, rows] = -np.inf
            rest = sims[:, stop - start :]
            count(rest, hi[None, stop:], 0, above[stop:])
            count(rest, lo[None, stop:], 0, over_lo[stop:])
        else:
            sims = q[start:stop] @ g.T
        count(sims, hi[start:stop, None], 1, above[start:stop])
        count(sims, lo[start:stop, None], 1, over_lo[start:stop])
    ranks = np.where(has, above, _NO_HIT)
    ambiguous = np.flatnonzero(has & (over_lo - above != 1))
    if ambiguous.size:
        ranks[ambiguous] = _first_hit_ranks(
            q, g, q_codes, g_codes, ambiguous, leave_one_out
        )
    return ranks


def _metrics(q, g, q_codes, g_codes, r, loo, ks, with_map, backend, block_size):
    """Recall@K by one counting pass; MAP@R from a top-R search (if needed)."""
    rows = _check_block_size(block_size, backend)
    k_map = int(r.max()) if with_map else 0
    out = {}
    first = None
    if k_map > 0:
        idx, _ = _search(q, g, k_map, loo, backend, block_size)
        first, ap_sum, rp_sum = _scan_neighbors(idx, q_codes, g_codes, r, True)
    else:
        ap_sum = rp_sum = 0.0
    if ks and (first is None or max(ks) > k_map):
        first = _count_first_hit_ranks(q, g, q_codes, g_codes, loo, rows)
        if first is None:  # huge classes: top-k search, then count the misses
            first = _search_then_count(
                q, g, q_codes, g_codes, r, loo, ks, backend, block_size
            )
    for kk in ks:
        out[f"recall@{kk}"] = int(np.count_nonzero(first < kk)) / len(q)
    if with_map:
        out.update(_map_values(ap_sum, rp_sum, r))
    return out


def _search_then_count(q, g, q_codes, g_codes, r, loo, ks, backend, block_size):
    """Top-k search, then exact rank counting for first hits beyond it."""
    k = min(max(ks), _SEARCH_K_CAP)
    idx, _ = _search(q, g, k, loo, backend, block_size)
    first, _, _ = _scan_neighbors(idx, q_codes, g_codes, r, False)
    if max(ks) > k:
        beyond = np.flatnonzero((first == _NO_HIT) & (r > 0))
        if beyond.size:
            first[beyond] = _first_hit_ranks(q, g, q_codes, g_codes, beyond, loo)
    return first


def _map_values(ap_sum, rp_sum, r):
    num_valid = int(np.count_nonzero(r > 0))
    if num_valid == 0:
        _logger.warning("No query has another item of its class: MAP@R is NaN.")
        return {"map@r": float("nan"), "r_precision": float("nan")}
    return {"map@r": ap_sum / num_valid, "r_precision": rp_sum / num_valid}


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
    ql = _as_labels(query_labels, "query_labels", nn.shape[0])
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
    ks = _check_ks(ks, nn.shape[1], f"`neighbor_indices` has {nn.shape[1]} columns")
    r = _num_relevant(q_codes, g_codes, leave_one_out)
    with_map = int(r.max()) <= nn.shape[1]
    first, ap_sum, rp_sum = _scan_neighbors(nn, q_codes, g_codes, r, with_map)
    out = {f"recall@{k}": int(np.count_nonzero(first < k)) / len(first) for k in ks}
    if with_map:
        out.update(_map_values(ap_sum, rp_sum, r))
    return out


def retrieval_metrics(
    query_embeddings,
    query_labels,
    gallery_embeddings=None,
    gallery_labels=None,
    ks=(1, 2, 4, 8),
    backend: str = "scann",
    block_size: int | None = None,
) -> dict[str, float]:
    """Recall@K for every K, MAP@R and R-precision from a single search.

    Args:
        query_embeddings: `(num_queries, dim)` L2-normalised embeddings.
        query_labels: `(num_queries,)` class labels.
        gallery_embeddings: `(num_gallery, dim)` embeddings, or `None` for the
            leave-one-out protocol (CUB, Cars, SOP).
        gallery_labels: `(num_gallery,)` labels, or `None`.
        ks: the K of Recall@K (computed by rank counting, see `recall_at_k`).
        backend: `"scann"` (default) or `"exact"`: the top-R search for MAP@R
            and R-precision; see `nearest_neighbors`.
        block_size: query rows per block of the search and of the counting
            pass; see `nearest_neighbors`.

    Returns:
        `{"recall@1": ..., "recall@K": ..., "map@r": ..., "r_precision": ...}`.

    Example:
    >>> x = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], "float32")
    >>> retrieval_metrics(x, [0, 0, 1, 1], ks=(1,), backend="exact")["recall@1"]
    1.0
    """
    _check_backend(backend)
    q, q_codes, g, g_codes, loo = _prepare(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels
    )
    ks = _check_ks(ks, g.shape[0] - int(loo), _gallery_reason(g.shape[0], loo))
    r = _num_relevant(q_codes, g_codes, loo)
    return _metrics(q, g, q_codes, g_codes, r, loo, ks, True, backend, block_size)


def recall_at_k(
    query_embeddings,
    query_labels,
    gallery_embeddings=None,
    gallery_labels=None,
    ks=(1, 2, 4, 8),
    backend: str = "scann",
    block_size: int | None = None,
) -> dict[int, float]:
    """Recall@K: the fraction of queries with a same-class item in their top K.

    Without a gallery this is the leave-one-out protocol of CUB, Cars and SOP
    (each query searches all other queries; itself is excluded by index); with a
    gallery, the In-Shop query/gallery protocol. A query with no other item of its
    class counts as a miss at every K.

    All K come from one counting pass: the rank of each query's best same-class
    item is the number of candidates scoring higher (plus equal scores at lower
    indices), counted in a blocked float32 matmul pass (only the upper triangle
    of the similarity matrix under leave-one-out), so no top-K selection is done
    and R@1000 costs the same as R@1. Counts are taken outside a float32 rounding
    band around the best same-class score; the few queries with another score in
    that band are re-ranked from their own row of scores, exactly as documented
    for ties. `backend` is not used here unless queries have more than 256
    same-class items on average (then: a backend top-64 search, and the same
    counting for the queries it misses).

    Args:
        query_embeddings: `(num_queries, dim)` L2-normalised embeddings.
        query_labels: `(num_queries,)` class labels.
        gallery_embeddings: `(num_gallery, dim)` embeddings, or `None`.
        gallery_labels: `(num_gallery,)` labels, or `None`.
        ks: the K values; each at most the gallery size (`num_queries - 1` for
            leave-one-out).
        backend: `"scann"` (default) or `"exact"`; used only by the fallback
            search described above; see `nearest_neighbors`.
        block_size: query rows per block of the counting pass (memory
            `block_size * num_gallery` floats); `None` picks 1024.

    Returns:
        `{K: recall}` for every K in `ks`.

    Example:
    >>> x = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], "float32")
    >>> recall_at_k(x, [0, 0, 1, 1], ks=(1, 2), backend="exact")
    {1: 0.5, 2: 1.0}
    """
    _check_backend(backend)
    q, q_codes, g, g_codes, loo = _prepare(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels
    )
    ks = _check_ks(ks, g.shape[0] - int(loo), _gallery_reason(g.shape[0], loo))
    r = _num_relevant(q_codes, g_codes, loo)
    out = _metrics(q, g, q_codes, g_codes, r, loo, ks, False, backend, block_size)
    return {k: out[f"recall@{k}"] for k in ks}


def _map_and_rp(
    query_embeddings,
    query_labels,
    gallery_embeddings,
    gallery_labels,
    backend,
    block_size,
):
    _check_backend(backend)
    q, q_codes, g, g_codes, loo = _prepare(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels
    )
    r = _num_relevant(q_codes, g_codes, loo)
    return _metrics(q, g, q_codes, g_codes, r, loo, (), True, backend, block_size)


def map_at_r(
    query_embeddings,
    query_labels,
    gallery_embeddings=None,
    gallery_labels=None,
    backend: str = "scann",
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
        backend: `"scann"` or `"exact"`; see `nearest_neighbors`.
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
    backend: str = "scann",
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
        backend: `"scann"` or `"exact"`; see `nearest_neighbors`.
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
