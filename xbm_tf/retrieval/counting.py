"""Exact ranks of each query's best same-class item, without top-K lists.

Recall@K only needs, per query, the 0-based rank of its best same-class item (a hit
at K iff rank < K). The rank is the number of candidates ordered before it: those
with a larger score, and those with an equal score and a lower index.

"Exact" has one definition for every exact engine: the order of the exact dot
products of the float32 embeddings, ties by lower index. Scores further apart than
the float32 rounding band (`inputs.score_band`) are ordered as computed, by any
kernel; a query with other scores inside the band around its best same-class
score (ties, duplicates, near-ties within a few ulps) is re-ranked from float64
dot products computed pair by pair (`_canonical_scores`), which are the same for
equal vectors wherever they sit in the gallery. So `"exact_rank"`
(`count_first_hit_ranks`) and the list engines (`ranks_from_lists`) agree exactly.

`count_first_hit_ranks` is one blocked float32 matmul pass in TensorFlow (oneDNN
GEMM), each block then counted in numpy by one thread per CPU; under
leave-one-out only the upper triangle of the symmetric similarity matrix is
computed, each block counting for its rows and for its columns. The candidates
inside a query's band are kept during the pass, so its near-ties are re-ranked
without a second matmul (`_rank_in_band`).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf

from xbm_tf.retrieval import inputs

__all__: list[str] = []

NO_HIT = np.iinfo(np.int64).max
DEFAULT_BLOCK_SIZE = 1024
# Above this many same-class pairs per query, rank counting falls back to search.
MAX_PAIRS_PER_QUERY = 256
# Rows counted per numpy call, and the share of scores above a threshold from
# which a block is counted densely (see `count_first_hit_ranks`).
_ROWS_AT_ONCE = 32
_DENSE = 64


def _canonical_scores(query: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Float64 dot products, each summed alone in a fixed order (per-pair).

    `query` is one `(D,)` row for all `(n, D)` items, or `(n, D)` rows, one per
    item; either way each dot product is the same float64 sum.
    """
    return (items.astype(np.float64) * query.astype(np.float64)).sum(axis=1)


def first_hit_ranks(q, g, q_codes, g_codes, rows, leave_one_out, band, chunk=256):
    """Exact 0-based rank of the best same-class item, for the queries `rows`.

    The float32 scores of a query's row, against `top` (its best same-class
    float32 score), sort the candidates: above `top + 2 * band` the exact score
    is surely larger than the best same-class one (counted as such); within
    `top +- 2 * band` it may be larger, equal or smaller, so these are
    re-scored in float64, pair by pair, and counted: larger scores, and equal
    scores at lower indices. Every query in `rows` must have a same-class item.
    """
    order = np.argsort(g_codes, kind="stable")  # members by increasing index
    sorted_codes = g_codes[order]
    ranks = np.empty(len(rows), np.int64)
    g_t = tf.constant(g)
    for start in range(0, len(rows), chunk):
        sub = rows[start : start + chunk]
        # TensorFlow's GEMM: these scores only select the candidates.
        sims = np.asarray(tf.matmul(tf.constant(q[sub]), g_t, transpose_b=True))
        for i, row in enumerate(sub):
            code = q_codes[row]
            lo, hi = np.searchsorted(sorted_codes, [code, code + 1])
            members = order[lo:hi]
            scores = sims[i]
            if leave_one_out:
                members = members[members != row]
            top = scores[members].max()
            clear = np.count_nonzero(scores > top + 2.0 * band[row])
            cand = np.flatnonzero(
                (scores >= top - 2.0 * band[row]) & (scores <= top + 2.0 * band[row])
            )
            if leave_one_out:
                clear -= scores[row] > top + 2.0 * band[row]
                cand = cand[cand != row]
            exact = _canonical_scores(q[row], g[cand])
            member = g_codes[cand] == code
            best = exact[member].max()
            j = cand[member & (exact == best)].min()
            ranks[start + i] = (
                clear
                + np.count_nonzero(exact > best)
                + np.count_nonzero((exact == best) & (cand < j))
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

    Scores are per-pair float64 dot products (of the float32 vectors): within
    about `dim * 2**-53` of the exact ones, so the float32 rounding of a
    matmul's score is the only gap `count_first_hit_ranks` allows for. Returns
    `None` if the classes are so large that the pairs would cost more than the
    matmul. Chunks of about `chunk` pairs run on one thread per CPU.
    """
    counts = np.bincount(g_codes, minlength=int(q_codes.max()) + 1)
    per_query = counts[q_codes]
    total = int(per_query.sum())
    if total > MAX_PAIRS_PER_QUERY * len(q):
        return None
    order = np.argsort(g_codes, kind="stable")
    class_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    best = np.full(len(q), -np.inf)
    if leave_one_out:  # classes of equal size at once: (C, s, dim) @ (C, dim, s)

        def same_size(classes):
            size = counts[classes[0]]
            members = order[class_start[classes][:, None] + np.arange(size)]
            emb = g[members].astype(np.float64)
            sims = np.matmul(emb, emb.transpose(0, 2, 1))
            sims[:, np.arange(size), np.arange(size)] = -np.inf
            best[members] = sims.max(axis=2)

        jobs = []
        for size in np.unique(counts[counts > 1]):
            classes = np.flatnonzero(counts == size)
            step = max(1, chunk // (size * size))
            jobs += [classes[c0 : c0 + step] for c0 in range(0, len(classes), step)]
        _run_on_every_cpu(same_size, jobs)
        return best
    query_of_pair = np.repeat(np.arange(len(q)), per_query)
    pair_offset = np.concatenate([[0], np.cumsum(per_query)[:-1]])
    within = np.arange(total) - np.repeat(pair_offset, per_query)
    member = order[class_start[q_codes[query_of_pair]] + within]
    scores = np.empty(total)

    def pairs(sl):
        scores[sl] = np.einsum(
            "ij,ij->i",
            q[query_of_pair[sl]].astype(np.float64),
            g[member[sl]].astype(np.float64),
        )

    _run_on_every_cpu(pairs, [slice(a, a + chunk) for a in range(0, total, chunk)])
    has = per_query > 0
    if has.any():
        best[has] = np.maximum.reduceat(scores, pair_offset[has])
    return best


def _run_on_every_cpu(job, args):
    """`job(a)` for every `a` of `args`, on one thread per CPU (numpy releases
    the GIL in its loops); the jobs must write disjoint outputs."""
    with ThreadPoolExecutor(max_workers=_num_threads()) as pool:
        for _ in pool.map(job, args):
            pass


@tf.function(reduce_retracing=True)
def _block_scores(q, g, start, stop, leave_one_out):
    """One block of float32 scores: rows start:stop against the gallery (or the
    upper-triangle strip, columns start:, under leave-one-out)."""
    gallery = g[start:] if leave_one_out else g
    return tf.matmul(q[start:stop], gallery, transpose_b=True)


def _num_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def block_pass(q, g, leave_one_out, block_size, count):
    """Yields `count(sims, start, stop, rows)` for every block of the matmul.

    `q` and `g` are float32 tensors (under leave-one-out `g` is `q`). Each
    block is counted after its matmul, its rows (`rows`, a slice of the block)
    split among one thread per CPU (numpy releases the GIL); the calls' results
    come block by block, part by part. Counting one block while TensorFlow
    computes the next was no faster (measured on 2 cores): the GEMM already
    keeps every core busy.
    """
    threads = _num_threads()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(q), block_size):
            stop = min(start + block_size, len(q))
            # np.asarray shares the tensor's buffer (.numpy() would copy it).
            sims = np.asarray(
                _block_scores(
                    q, g, tf.constant(start), tf.constant(stop), leave_one_out
                )
            )
            bounds = np.linspace(0, stop - start, threads + 1).astype(int)
            parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
            yield from pool.map(lambda rows: count(sims, start, stop, rows), parts)


def count_first_hit_ranks(q, g, q_codes, g_codes, leave_one_out, block_size):
    """Exact 0-based rank of every query's best same-class item, by counting.

    One blocked float32 matmul pass (`block_pass`) counts, per query, the
    candidates scoring above its best same-class score `b` (float64, per pair),
    outside a band `b +- eps` that covers the float32 rounding of the matmul
    (half of `inputs.score_band`, which bounds the gap between two float32
    kernels), and keeps the few candidates inside the band. Where the band
    holds exactly one score, that is the best same-class item and the count is
    its rank whatever the rounding; the few queries with other scores in the
    band are ranked from those candidates' float64 scores (`_rank_in_band`). No
    top-k is selected, so Recall@K for every K costs one pass. Returns `None`
    (use a search) if the classes are too large for `best_same_class`.
    """
    best = best_same_class(q, g, q_codes, g_codes, leave_one_out)
    if best is None:
        return None
    has = np.isfinite(best)
    band = inputs.score_band(q, g)
    # One float32 kernel against float64 sums: half the band, and a margin
    # for the float64 rounding of `best` (under dim * 2**-53, that is under
    # 2**-29 of the half band). Rounded outwards, so that float32 thresholds
    # still contain it.
    reach = 0.5 * band * (1.0 + 2.0**-28)
    lo = np.nextafter((best - reach).astype(np.float32), np.float32(-np.inf))
    hi = np.nextafter((best + reach).astype(np.float32), np.float32(np.inf))
    lo[~has] = hi[~has] = np.inf
    # Under leave-one-out the pass sees the items in order of increasing `lo`:
    # then a strip's score s_ij (i < j) counts for column j only if it passes
    # lo_j >= lo_i, so the one comparison with its row's threshold finds the
    # scores of both sides.
    order = np.argsort(lo, kind="stable") if leave_one_out else None
    x_t = tf.constant(q)
    if leave_one_out:
        x_t = tf.gather(x_t, order)  # TensorFlow's gather: on every core
    counts = _count_pass(
        x_t,
        x_t if leave_one_out else tf.constant(g),
        lo if order is None else lo[order],
        hi if order is None else hi[order],
        leave_one_out,
        block_size,
    )
    above, over_lo, band_queries, band_items = counts
    if order is not None:  # back to the caller's indices
        above[order], over_lo[order] = above.copy(), over_lo.copy()
        band_queries, band_items = order[band_queries], order[band_items]
    ranks = np.where(has, above, NO_HIT)
    ambiguous = np.flatnonzero(has & (over_lo - above != 1))
    if ambiguous.size:
        ranks[ambiguous], lost = _rank_in_band(
            q, g, q_codes, g_codes, ambiguous, above, band_queries, band_items
        )
        if lost.size:  # no same-class item inside the band: rank from the row
            ranks[lost] = first_hit_ranks(
                q, g, q_codes, g_codes, lost, leave_one_out, band
            )
    return ranks


def _rank_in_band(q, g, q_codes, g_codes, queries, above, band_queries, band_items):
    """Ranks of `queries` from their candidates inside the band.

    `band_queries[k]`, `band_items[k]` are the pairs whose float32 score lies
    inside the query's band; `above` counts the candidates surely above it.
    Each pair is re-scored in float64 (`_canonical_scores`); the rank is
    `above`, plus the band's candidates with a larger score than the best
    same-class one, plus those with an equal score and a lower index. Returns
    the ranks and the queries whose band holds no same-class item (whose ranks
    here mean nothing: the caller ranks them otherwise).
    """
    wanted = np.zeros(len(q), bool)
    wanted[queries] = True
    keep = wanted[band_queries]
    qi, gi = band_queries[keep], band_items[keep]
    group = np.searchsorted(queries, qi)  # `queries` is sorted
    exact = np.empty(len(qi))

    def rescore(sl):  # chunks of pairs: bounded float64 copies
        exact[sl] = _canonical_scores(q[qi[sl]], g[gi[sl]])

    step = 8192
    _run_on_every_cpu(rescore, [slice(a, a + step) for a in range(0, len(qi), step)])
    same = g_codes[gi] == q_codes[qi]
    best = np.full(len(queries), -np.inf)
    np.maximum.at(best, group[same], exact[same])
    at_best = same & (exact == best[group])
    first = np.full(len(queries), np.iinfo(np.int64).max)
    np.minimum.at(first, group[at_best], gi[at_best])
    before = (exact > best[group]) | ((exact == best[group]) & (gi < first[group]))
    ranks = above[queries] + np.bincount(group[before], minlength=len(queries))
    return ranks, queries[~np.isfinite(best)]


def _count_pass(x, g, lo, hi, leave_one_out, block_size):
    """Per query, the scores above `hi` and above `lo`, and the pairs between.

    `x` and `g` are float32 tensors; under leave-one-out (`g is x`) `lo` must
    not decrease along the items. Returns `above`, `over_lo` (int64 per query)
    and the pairs (query, item) whose score lies in `(lo, hi]` of the query
    (self excluded).
    """
    above = np.zeros(len(lo), np.int64)  # scores > hi
    over_lo = np.zeros(len(lo), np.int64)  # scores > lo

    def count(sims, start, stop, rows):
        # One comparison per score, with its row's `lo`. Scores above a
        # query's best same-class score are rare after any training (the mean
        # rank is a few places), so the few that pass are found with
        # `flatnonzero` and only those are compared with `hi`, and under
        # leave-one-out with their column's thresholds; where many pass (a poor
        # model: random vectors have mean ranks in the thousands), every score
        # is compared with every threshold, so the cost stays bounded. 32 rows
        # at a time: longer numpy calls let two threads share the GIL (at SOP
        # scale 4 rows took 1.3x the counting time of 16, and 16 rows 1.08x
        # that of 32). The rows' own counts are written in place (each row
        # belongs to one call); the columns' are returned.
        width = stop - start
        # Under leave-one-out the strip starts at column `start`: its first
        # `width` columns are the rows' own square (self on the diagonal, not a
        # candidate); the columns after it get these rows (earlier rows were
        # counted by earlier strips).
        first_col = start if leave_one_out else 0
        columns = slice(stop, None) if leave_one_out else slice(0, 0)
        lo_c, hi_c = lo[columns], hi[columns]
        mask = np.empty((2, _ROWS_AT_ONCE, sims.shape[1]), np.bool_)
        col_lo = np.zeros(lo_c.size, np.int64)
        col_hi = np.zeros(lo_c.size, np.int64)
        col_step = np.empty(lo_c.size, np.uint8)
        pending, pending_above = [], []  # column indices, flushed by bincount
        pairs = []  # (query, item) arrays inside the band
        dense = False  # count densely where the previous rows had many passing

        def flush():
            if pending:
                cc, is_above = np.concatenate(pending), np.concatenate(pending_above)
                col_lo[:] += np.bincount(cc, minlength=lo_c.size)
                col_hi[:] += np.bincount(cc[is_above], minlength=lo_c.size)
                pending.clear()
                pending_above.clear()

        def add_columns(counts, m):  # counts += the column sums of mask m
            np.add.reduce(m.view(np.uint8), axis=0, out=col_step)
            counts += col_step

        def in_band(m_lo, m_hi, r0, cols):  # pairs of m_lo & ~m_hi
            np.greater(m_lo, m_hi, out=m_lo)
            rr, cc = np.divmod(np.flatnonzero(m_lo), m_lo.shape[1])
            rr += start + r0
            cc += cols
            if leave_one_out:
                other = cc != rr
                rr, cc = rr[other], cc[other]
            return rr, cc

        for r0 in range(rows.start, rows.stop, _ROWS_AT_ONCE):
            r1 = min(r0 + _ROWS_AT_ONCE, rows.stop)
            block, m, m_hi = sims[r0:r1], mask[0, : r1 - r0], mask[1, : r1 - r0]
            queries = slice(start + r0, start + r1)
            lo_r, hi_r = lo[queries, None], hi[queries, None]
            np.greater(block, lo_r, out=m)
            if dense:
                dense = np.count_nonzero(m) > m.size // _DENSE
                np.greater(block, hi_r, out=m_hi)
                for k in range(r1 - r0):
                    over_lo[start + r0 + k] += np.count_nonzero(m[k])
                    above[start + r0 + k] += np.count_nonzero(m_hi[k])
                if leave_one_out:  # self, on the diagonal, is no candidate
                    own = block[np.arange(r1 - r0), np.arange(r0, r1)]
                    over_lo[queries] -= own > lo_r[:, 0]
                    above[queries] -= own > hi_r[:, 0]
                pairs.append(in_band(m, m_hi, r0, first_col))
                if not leave_one_out:
                    continue
                rest = block[:, width:]
                m, m_hi = m[:, width:], m_hi[:, width:]
                np.greater(rest, lo_c, out=m)
                np.greater(rest, hi_c, out=m_hi)
                add_columns(col_lo, m)
                add_columns(col_hi, m_hi)
                items, column_queries = in_band(m, m_hi, r0, stop)
                pairs.append((column_queries, items))
                continue
            hits = np.flatnonzero(m)
            dense = hits.size > m.size // _DENSE
            rr, cc = np.divmod(hits, m.shape[1])  # 2-D nonzero: slow
            if leave_one_out:
                other = cc != rr + r0
                rr, cc = rr[other], cc[other]
            score = block[rr, cc]
            is_above = score > hi_r[rr, 0]
            over_lo[queries] += np.bincount(rr, minlength=r1 - r0)
            above[queries] += np.bincount(rr[is_above], minlength=r1 - r0)
            rr += start + r0  # indices in the gallery from here on
            cc += first_col
            pairs.append((rr[~is_above], cc[~is_above]))
            if not leave_one_out:
                continue
            beyond = cc >= stop  # the columns' side: passes lo_j >= lo_i too?
            rr, cc, score = rr[beyond], cc[beyond], score[beyond]
            passes = score > lo[cc]
            rr, cc, score = rr[passes], cc[passes], score[passes]
            is_above = score > hi[cc]
            pending.append(cc - stop)
            pending_above.append(is_above)
            pairs.append((cc[~is_above], rr[~is_above]))
            if sum(map(len, pending)) > lo_c.size:  # bounded memory
                flush()
        flush()
        return columns, col_lo, col_hi, pairs

    band_pairs = []
    for columns, col_lo, col_hi, pairs in block_pass(
        x, g, leave_one_out, block_size, count
    ):
        over_lo[columns] += col_lo
        above[columns] += col_hi
        band_pairs += pairs
    band_queries = np.concatenate([p[0] for p in band_pairs] + [np.zeros(0, int)])
    band_items = np.concatenate([p[1] for p in band_pairs] + [np.zeros(0, int)])
    return above, over_lo, band_queries, band_items
