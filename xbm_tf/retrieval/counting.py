"""Exact ranks of each query's best same-class item, without top-K lists.

Recall@K only needs, per query, the 0-based rank of its best same-class item (a hit
at K iff rank < K). The rank is the number of candidates ordered before it: those
with a larger score, and those with an equal score and a lower index.

"Exact" has one definition for every exact engine: the order of the exact dot
products of the float32 embeddings, ties by lower index. Scores further apart than
the float32 rounding band (`inputs.score_band`) are ordered as computed, by any
kernel; a query with other scores inside the band around its best same-class
score (ties, duplicates, near-ties within a few ulps) is re-ranked by
`first_hit_ranks` from float64 dot products computed pair by pair, which are the
same for equal vectors wherever they sit in the gallery. So `"exact_rank"`
(`count_first_hit_ranks`) and the list engines (`ranks_from_lists`) agree exactly.

`count_first_hit_ranks` is one blocked float32 matmul pass in TensorFlow (oneDNN
GEMM), each block counted in numpy while TensorFlow computes the next; under
leave-one-out only the upper triangle of the symmetric similarity matrix is
computed, each block counting for its rows and for its columns.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf

from xbm_tf.retrieval import inputs

__all__: list[str] = []

NO_HIT = np.iinfo(np.int64).max
DEFAULT_BLOCK_SIZE = 1024
# Above this many same-class pairs per query, rank counting falls back to search.
MAX_PAIRS_PER_QUERY = 256


def _canonical_scores(query: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Float64 dot products, each summed alone in a fixed order (per-pair).

    `query` is one `(D,)` row for all `(n, D)` items, or `(n, D)` rows, one per
    item; either way each dot product is the same float64 sum.
    """
    return (items.astype(np.float64) * query.astype(np.float64)).sum(axis=1)


def first_hit_ranks(q, g, q_codes, g_codes, rows, leave_one_out, band, chunk=256):
    """Exact 0-based rank of the best same-class item, for the queries `rows`.

    The float32 scores of a query's row select every candidate whose exact score
    may reach its best same-class score (within twice the rounding band); these
    are re-scored in float64, pair by pair, and counted: larger scores, and equal
    scores at lower indices. Every query in `rows` must have a same-class item.
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
            top = scores[members].max()
            cand = np.flatnonzero(scores >= top - 2.0 * band[row])
            exact = _canonical_scores(q[row], g[cand])
            member = g_codes[cand] == code
            best = exact[member].max()
            j = cand[member & (exact == best)].min()
            ranks[start + i] = np.count_nonzero(exact > best) + np.count_nonzero(
                (exact == best) & (cand < j)
            )
    return ranks


def ranks_from_lists(q, g, q_codes, g_codes, idx, scores, r, loo, max_k, exact):
    """First-hit ranks from sorted top-n lists, exact up to `max_k`.

    A hit at list position p < max_k is the rank when its neighbours in the
    list are outside the rounding band; a query without a hit before `max_k` is
    a miss when positions max_k - 1 and max_k are outside the band. Other queries
    (near-ties at the decisive place, or first hits beyond a short list) are
    ranked by `first_hit_ranks`. With `exact=False` (approximate lists) the list
    positions are taken as they are. Returns ranks, `NO_HIT` for ranks >= max_k.
    """
    num_queries, n = idx.shape
    num_candidates = g.shape[0] - int(loo)
    hit = g_codes[idx] == q_codes[:, None]
    found = hit.any(axis=1)
    pos = np.where(found, hit.argmax(axis=1), n)
    first = np.where(found & (pos < max_k), pos, NO_HIT).astype(np.int64)
    if not exact:
        return first
    band = inputs.score_band(q, g)
    s = scores.astype(np.float64)
    rows = np.arange(num_queries)
    inside = found & (pos < max_k)
    p = np.minimum(pos, n - 1)
    gap_before = s[rows, np.maximum(p - 1, 0)] - s[rows, p]
    gap_after = s[rows, p] - s[rows, np.minimum(p + 1, n - 1)]
    ambiguous = inside & (p > 0) & (gap_before <= band)
    ambiguous |= inside & (p + 1 < n) & (gap_after <= band)
    ambiguous |= inside & (p + 1 >= n) & (n < num_candidates)
    outside = ~inside & (r > 0)
    if n > max_k:
        boundary = s[:, max_k - 1] - s[:, max_k]
        ambiguous |= outside & (boundary <= band)
    elif n < num_candidates:
        ambiguous |= outside  # first hits beyond a short list: count them
    redo = np.flatnonzero(ambiguous & (r > 0))
    if redo.size:
        ranks = first_hit_ranks(q, g, q_codes, g_codes, redo, loo, band)
        first[redo] = np.where(ranks < max_k, ranks, NO_HIT)
    return first


def best_same_class(q, g, q_codes, g_codes, leave_one_out, chunk=65536):
    """Best same-class score per query (self excluded), `-inf` if there is none.

    Scores come from per-pair dot products, so they may differ from a matmul's by
    rounding; `count_first_hit_ranks` allows for that. Returns `None` if the
    classes are so large that the pairs would cost more than the matmul.
    """
    counts = np.bincount(g_codes, minlength=int(q_codes.max()) + 1)
    per_query = counts[q_codes]
    total = int(per_query.sum())
    if total > MAX_PAIRS_PER_QUERY * len(q):
        return None
    order = np.argsort(g_codes, kind="stable")
    class_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    if leave_one_out:  # classes of equal size at once: (C, s, dim) @ (C, dim, s)
        best = np.full(len(q), -np.inf, np.float32)
        for size in np.unique(counts[counts > 1]):
            classes = np.flatnonzero(counts == size)
            step = max(1, chunk // (size * size))
            for c0 in range(0, len(classes), step):
                cls = classes[c0 : c0 + step]
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
    best = np.full(len(q), -np.inf, np.float32)
    has = per_query > 0
    if has.any():
        best[has] = np.maximum.reduceat(scores, pair_offset[has])
    return best


@tf.function(reduce_retracing=True)
def _block_scores(q, g, start, stop, leave_one_out):
    """One block of float32 scores: rows start:stop against the gallery (or the
    upper-triangle strip, columns start:, under leave-one-out)."""
    gallery = g[start:] if leave_one_out else g
    return tf.matmul(q[start:stop], gallery, transpose_b=True)


def block_pass(q, g, leave_one_out, block_size, count):
    """Calls `count(sims, start, stop)` for every block of the blocked matmul.

    TensorFlow computes block i + 1 while a worker thread runs `count` on block i
    (numpy releases the GIL), so the counting overlaps the GEMM.
    """
    q_t = tf.constant(q)
    g_t = q_t if leave_one_out else tf.constant(g)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for start in range(0, len(q), block_size):
            stop = min(start + block_size, len(q))
            sims = _block_scores(
                q_t, g_t, tf.constant(start), tf.constant(stop), leave_one_out
            ).numpy()
            if pending is not None:
                pending.result()
            pending = pool.submit(count, sims, start, stop)
        pending.result()


def count_first_hit_ranks(q, g, q_codes, g_codes, leave_one_out, block_size):
    """Exact 0-based rank of every query's best same-class item, by counting.

    One blocked float32 matmul pass (`block_pass`) counts, per query, the
    candidates scoring above its best same-class score `b`, outside a band
    `b +- eps` that covers float32 rounding (`inputs.score_band`). Where the band
    holds exactly one score, that is the best same-class item and the count is
    its rank whatever the rounding; the few queries with other scores in the band
    are ranked by `first_hit_ranks`. No top-k is selected, so Recall@K for every
    K costs one pass. Returns `None` (use a search) if the classes are too large
    for `best_same_class`.
    """
    best = best_same_class(q, g, q_codes, g_codes, leave_one_out)
    if best is None:
        return None
    has = np.isfinite(best)
    band = inputs.score_band(q, g)
    # Round the band outwards so that float32 thresholds still contain it.
    lo = np.nextafter((best - band).astype(np.float32), np.float32(-np.inf))
    hi = np.nextafter((best + band).astype(np.float32), np.float32(np.inf))
    lo[~has] = hi[~has] = np.inf
    above = np.zeros(len(q), np.int64)  # scores > hi
    over_lo = np.zeros(len(q), np.int64)  # scores > lo
    mask = np.empty(g.shape[0], np.bool_)

    def count(sims, start, stop):
        # Row by row: each comparison's mask (one row, 60,502 bytes at SOP
        # scale) stays in cache for the count that reads it, and a 1-D
        # count_nonzero is numpy's fast path; the whole-block masks and axis
        # sums ran 3x slower, and bound the pass on a fast GEMM.
        width = stop - start
        # Under leave-one-out the strip starts at column `start`: its first
        # `width` columns are the rows' own square (self on the diagonal, not a
        # candidate); the columns after it get these rows (earlier rows were
        # counted by earlier strips). Their counts add up in uint8, flushed
        # before they can wrap.
        columns = slice(stop, None) if leave_one_out else slice(0, 0)
        hi_c, lo_c = hi[columns], lo[columns]
        pending = np.zeros((2, hi_c.size), np.uint8)
        for r in range(width):
            row, i = sims[r], start + r
            np.greater(row, hi[i], out=mask[: row.size])
            above[i] += np.count_nonzero(mask[: row.size])
            np.greater(row, lo[i], out=mask[: row.size])
            over_lo[i] += np.count_nonzero(mask[: row.size])
            if leave_one_out:
                rest, rest_mask = row[width:], mask[: hi_c.size]
                for k, thresholds in enumerate((hi_c, lo_c)):
                    np.greater(rest, thresholds, out=rest_mask)
                    np.add(pending[k], rest_mask.view(np.uint8), out=pending[k])
                if r % 255 == 254 or r == width - 1:
                    above[columns] += pending[0]
                    over_lo[columns] += pending[1]
                    pending[:] = 0
        if leave_one_out:
            self_scores = sims[np.arange(width), np.arange(width)]
            above[start:stop] -= self_scores > hi[start:stop]
            over_lo[start:stop] -= self_scores > lo[start:stop]

    block_pass(q, g, leave_one_out, block_size, count)
    ranks = np.where(has, above, NO_HIT)
    ambiguous = np.flatnonzero(has & (over_lo - above != 1))
    if ambiguous.size:
        ranks[ambiguous] = first_hit_ranks(
            q, g, q_codes, g_codes, ambiguous, leave_one_out, band
        )
    return ranks
