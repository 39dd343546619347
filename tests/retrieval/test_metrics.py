"""Tests for xbm_tf.retrieval.metrics: every exact engine against a slow numpy loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xbm_tf import retrieval as ev
from xbm_tf.retrieval import counting
from xbm_tf.retrieval import metrics as metrics_module

BACKENDS = ev.EXACT_ENGINES  # exact_rank, exact, scann


def _unit(degrees):
    a = np.deg2rad(np.asarray(degrees, np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def _reference(q, ql, g=None, gl=None, ks=(1,)):
    """The obvious loop: rank every candidate of every query, one at a time."""
    loo = g is None
    if loo:
        g, gl = q, ql
    g64 = g.astype(np.float64)
    hits = {k: 0 for k in ks}
    aps, rps, neighbors = [], [], []
    for i in range(len(q)):
        sims = g64 @ q[i].astype(np.float64)
        cands = [j for j in range(len(g)) if not (loo and j == i)]
        order = sorted(cands, key=lambda j: (-sims[j], j))
        neighbors.append(order)
        rel = [gl[j] == ql[i] for j in order]
        for k in ks:
            hits[k] += any(rel[:k])
        r = sum(rel)
        if r > 0:
            precisions = [sum(rel[: i + 1]) / (i + 1) for i in range(r)]
            aps.append(sum(p for p, hit in zip(precisions, rel[:r]) if hit) / r)
            rps.append(sum(rel[:r]) / r)
    recall = {k: hits[k] / len(q) for k in ks}
    mean = (lambda v: sum(v) / len(v)) if aps else (lambda v: float("nan"))
    return recall, mean(aps), mean(rps), neighbors


@pytest.mark.parametrize("backend", BACKENDS)
def test_leave_one_out_matches_reference(backend, clustered, float32_gap):
    x, y = clustered(300, 40, 16, noise=1.0, seed=0)
    ks = (1, 2, 4, 8, 16)
    recall, map_r, rp, nbrs = _reference(x, y, ks=ks)
    assert 0.3 < recall[1] < 0.95  # the data is neither trivial nor hopeless
    assert ev.recall_at_k(x, y, ks=ks, backend=backend) == recall
    assert ev.map_at_r(x, y, backend=backend) == pytest.approx(map_r, abs=1e-12)
    assert ev.r_precision(x, y, backend=backend) == pytest.approx(rp, abs=1e-12)
    idx, scores = ev.nearest_neighbors(x, k=16, backend=backend)
    np.testing.assert_array_equal(idx, np.array([n[:16] for n in nbrs]))
    # Two float32 kernels (the engine's, numpy's) of 16-wide dot products of
    # unit vectors (conftest's float32_gap).
    np.testing.assert_allclose(
        scores,
        np.take_along_axis(x @ x.T, idx.astype(int), axis=1),
        rtol=0,
        atol=float32_gap(16),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_gallery_matches_reference(backend, clustered):
    x, y = clustered(400, 30, 12, noise=1.2, seed=1)
    q, ql, g, gl = x[:150], y[:150], x[150:], y[150:]
    ks = (1, 10, 20, 30)
    recall, map_r, rp, nbrs = _reference(q, ql, g, gl, ks=ks)
    assert ev.recall_at_k(q, ql, g, gl, ks=ks, backend=backend) == recall
    got = ev.retrieval_metrics(q, ql, g, gl, ks=ks, backend=backend)
    assert {k: got[f"recall@{k}"] for k in ks} == recall
    assert got["map@r"] == pytest.approx(map_r, abs=1e-12)
    assert got["r_precision"] == pytest.approx(rp, abs=1e-12)
    idx, _ = ev.nearest_neighbors(q, g, k=30, backend=backend)
    np.testing.assert_array_equal(idx, np.array([n[:30] for n in nbrs]))


def test_exact_block_size_does_not_change_results(clustered, float32_gap):
    x, y = clustered(123, 10, 8, noise=1.0, seed=2)
    full = ev.nearest_neighbors(x, k=5, backend="exact", block_size=1024)
    for block in (1, 7, 122):
        got = ev.nearest_neighbors(x, k=5, backend="exact", block_size=block)
        np.testing.assert_array_equal(got[0], full[0])
        # Other block shapes, other kernels: 8-wide dot products of unit
        # vectors (conftest's float32_gap).
        np.testing.assert_allclose(got[1], full[1], rtol=0, atol=float32_gap(8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_equal_to_gallery_size(backend, clustered):
    x, y = clustered(20, 4, 6, noise=1.0, seed=3)
    _, _, _, nbrs = _reference(x, y)
    idx, _ = ev.nearest_neighbors(x, k=19, backend=backend)
    np.testing.assert_array_equal(idx, np.array(nbrs))
    assert ev.recall_at_k(x, y, ks=19, backend=backend) == {19: 1.0}
    idx, _ = ev.nearest_neighbors(x[:5], x[5:], k=15, backend=backend)
    assert sorted(idx[0].tolist()) == list(range(15))


def test_scann_agrees_with_exact_on_larger_data(clustered):
    x, y = clustered(3000, 500, 32, noise=1.0, seed=4)
    ks = (1, 10, 100)
    exact = ev.retrieval_metrics(x, y, ks=ks, backend="exact")
    scann = ev.retrieval_metrics(x, y, ks=ks, backend="scann")
    assert 0.3 < exact["recall@1"] < 0.95
    for key in exact:
        assert abs(exact[key] - scann[key]) <= 1e-3, key
    a = ev.nearest_neighbors(x, k=10, backend="exact")[0]
    b = ev.nearest_neighbors(x, k=10, backend="scann")[0]
    assert np.mean(a == b) > 0.999


@pytest.mark.parametrize("backend", BACKENDS)
def test_four_points_closed_form(backend):
    # Angles 0, 36.9, 53.1, 90 degrees; classes A A B B. Nearest: 0->1 (A, hit),
    # 1->2 (miss), 2->1 (miss), 3->2 (hit); second nearest of 1 is 0, of 2 is 3.
    x = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1]], np.float32)
    y = np.array([0, 0, 1, 1])
    assert ev.recall_at_k(x, y, ks=(1, 2, 3), backend=backend) == {
        1: 0.5,
        2: 1.0,
        3: 1.0,
    }
    assert ev.map_at_r(x, y, backend=backend) == 0.5  # R = 1: AP@R = hit@1
    assert ev.r_precision(x, y, backend=backend) == 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_map_at_r_by_hand(backend):
    # Angles (A: 0, 12, 41; B: 20, 30, 100). Ranked neighbours, R = 2 each:
    # 0: 12 A, 20 B -> AP 1/2 * 1 = .5, RP .5      12: 20 B, 0 A -> AP .25, RP .5
    # 41: 30 B, 20 B -> 0, 0                       20: 12 A, 30 B -> .25, .5
    # 30: 20 B, 41 A -> .5, .5                     100: 41 A, 30 B -> .25, .5
    x = _unit([0, 12, 41, 20, 30, 100])
    y = np.array([0, 0, 0, 1, 1, 1])
    assert ev.map_at_r(x, y, backend=backend) == pytest.approx(1.75 / 6)
    assert ev.r_precision(x, y, backend=backend) == pytest.approx(2.5 / 6)
    assert ev.recall_at_k(x, y, ks=1, backend=backend) == {1: pytest.approx(2 / 6)}
    # Query/gallery with R = 3: hits at ranks 1 and 3 -> AP = (1 + 2/3) / 3.
    q = _unit([0])
    g = _unit([5, 10, 15, 50, 20])
    gl = np.array([0, 1, 0, 0, 1])
    assert ev.map_at_r(q, [0], g, gl, backend=backend) == pytest.approx(5 / 9)
    assert ev.r_precision(q, [0], g, gl, backend=backend) == pytest.approx(2 / 3)


def _exact_ties(n, dim, seed):
    """Unit vectors with four entries of +-0.5: every dot product is a multiple of
    1/4, computed exactly in float32 whatever the summation order, so ties are
    real ties on every backend."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, dim), np.float32)
    for row in x:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return x


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_break_by_lower_index(backend):
    x = _exact_ties(150, 6, seed=5)
    y = np.arange(150) % 7
    ks = (1, 3, 10, 40)
    recall, map_r, _, nbrs = _reference(x, y, ks=ks)
    for k in (1, 3, 10, 40):  # the K-th position falls inside groups of ties
        idx, scores = ev.nearest_neighbors(x, k=k, backend=backend)
        np.testing.assert_array_equal(idx, np.array([n[:k] for n in nbrs]))
        assert np.all(np.diff(scores, axis=1) <= 0)
    assert ev.recall_at_k(x, y, ks=ks, backend=backend) == recall
    assert ev.map_at_r(x, y, backend=backend) == pytest.approx(map_r, abs=1e-12)
    # Duplicates of the query: self is excluded by index, not by score.
    d = np.repeat(x[:1], 5, axis=0)
    idx, scores = ev.nearest_neighbors(d, k=4, backend=backend)
    assert idx.tolist() == [
        [1, 2, 3, 4],
        [0, 2, 3, 4],
        [0, 1, 3, 4],
        [0, 1, 2, 4],
        [0, 1, 2, 3],
    ]
    assert np.all(scores == 1.0)
    # Query/gallery: equal scores from different vectors, [0, 1] . [+-0.6, 0.8].
    g = np.array([[0.6, 0.8], [1, 0], [-0.6, 0.8], [0, -1]], np.float32)
    idx, _ = ev.nearest_neighbors(
        np.array([[0, 1]], np.float32), g, k=2, backend=backend
    )
    assert idx.tolist() == [[0, 2]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_singleton_class_counts_as_miss_and_is_excluded_from_map(backend):
    x = np.array([[1, 0], [0.8, 0.6], [0.6, 0.8], [0, 1], [-1, 0]], np.float32)
    y = np.array([0, 0, 1, 1, 7])  # class 7 has no other member
    assert ev.recall_at_k(x, y, ks=(1, 4), backend=backend) == {1: 0.4, 4: 0.8}
    assert ev.map_at_r(x, y, backend=backend) == 0.5  # mean over the 4 others
    assert ev.r_precision(x, y, backend=backend) == 0.5
    # No query has a match: recall 0, MAP@R undefined.
    singles = np.arange(5)
    assert ev.recall_at_k(x, singles, ks=1, backend=backend) == {1: 0.0}
    assert math.isnan(ev.map_at_r(x, singles, backend=backend))
    got = ev.retrieval_metrics(x, singles, ks=(1,), backend=backend)
    assert got["recall@1"] == 0.0 and math.isnan(got["r_precision"])


def test_metrics_from_neighbors_matches_search(clustered):
    x, y = clustered(200, 20, 8, noise=1.0, seed=6)
    idx, _ = ev.nearest_neighbors(x, k=50, backend="exact")
    got = ev.metrics_from_neighbors(idx, y, ks=(1, 5, 50))
    assert got == pytest.approx(ev.retrieval_metrics(x, y, ks=(1, 5, 50)))
    # Too few columns for MAP@R: only recall is returned.
    assert set(ev.metrics_from_neighbors(idx[:, :2], y, ks=(1, 2))) == {
        "recall@1",
        "recall@2",
    }


_X = np.eye(4, dtype=np.float32)
_Y = np.array([0, 0, 1, 1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ks=(5,)), r"K=5 is too large: leave-one-out over 4 queries leaves 3"),
        (dict(ks=(1, 4)), r"K=4 is too large"),
        (
            dict(gallery_embeddings=_X[:2], gallery_labels=_Y[:2], ks=(3,)),
            r"K=3 is too large: the gallery has 2 items",
        ),
        (dict(ks=()), r"`ks` is empty"),
        (dict(ks=(0,)), r"positive integer; got 0"),
        (dict(ks=(1.5,)), r"positive integer; got 1.5"),
        (dict(query_labels=_Y[:3]), r"`query_labels` has 3 labels but .* 4 rows"),
        (dict(query_labels=_Y[:, None]), r"`query_labels` must be 1-D.*\(4, 1\)"),
        (dict(query_embeddings=_X[0]), r"must be 2-D.*got shape \(4,\)"),
        (dict(query_embeddings=_X[:0], query_labels=_Y[:0]), r"empty: shape \(0, 4\)"),
        (dict(query_embeddings=_X[:1], query_labels=_Y[:1]), r"at least 2 queries"),
        (
            dict(gallery_embeddings=_X[:, :3], gallery_labels=_Y),
            r"query embeddings have dim 4, gallery embeddings have dim 3",
        ),
        (
            dict(gallery_embeddings=_X[:0], gallery_labels=_Y[:0]),
            r"`gallery_embeddings` is empty",
        ),
        (
            dict(gallery_embeddings=_X, gallery_labels=_Y[:2]),
            r"`gallery_labels` has 2 labels but the embeddings have 4 rows",
        ),
        (dict(gallery_embeddings=_X), r"both `gallery_embeddings` and"),
        (dict(backend="faiss"), r"`backend` must be one of .*'faiss'"),
        (dict(block_size=0), r"`block_size` must be a positive integer; got 0"),
        (
            dict(query_embeddings=np.where(np.eye(4) > 0, np.nan, 0)),
            r"non-finite values in 4 rows",
        ),
    ],
)
def test_errors_name_the_problem(kwargs, match):
    args = dict(query_embeddings=_X, query_labels=_Y, ks=(1,), backend="exact")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ev.recall_at_k(**args)


def test_other_entry_points_validate():
    with pytest.raises(ValueError, match=r"K=4 is too large.*leaves 3"):
        ev.nearest_neighbors(_X, k=4)
    with pytest.raises(ValueError, match="dim 4, gallery embeddings have dim 2"):
        ev.nearest_neighbors(_X, _X[:, :2], k=1)
    with pytest.raises(ValueError, match="`query_labels` has 2 labels"):
        ev.map_at_r(_X, _Y[:2])
    with pytest.raises(ValueError, match="`backend` must be one of"):
        ev.r_precision(_X, _Y, backend="nope")
    with pytest.raises(ValueError, match=r"K=3 is too large: `neighbor_indices` has 2"):
        ev.metrics_from_neighbors(np.zeros((4, 2), int), _Y, ks=(3,))
    with pytest.raises(
        ValueError, match=r"must lie in \[0, 4\); got values in \[0, 9\]"
    ):
        ev.metrics_from_neighbors(np.array([[9], [0], [0], [0]]), _Y, ks=(1,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_recall_beyond_the_search_counts_ranks_exactly(backend, monkeypatch, clustered):
    # R@K for every K comes from counting the rank of each query's best
    # same-class item (the search cap, here 2, only bounds the top-R search and
    # the large-class fallback); it must equal the loop for K far past the cap.
    monkeypatch.setattr(metrics_module, "SEARCH_K_CAP", 2)
    x, y = clustered(300, 60, 16, noise=1.6, seed=7)
    ks = (1, 2, 3, 10, 50, 299)
    recall, map_r, _, _ = _reference(x, y, ks=ks)
    assert recall[1] < recall[10] < recall[50] < 1.0
    assert ev.recall_at_k(x, y, ks=ks, backend=backend) == recall
    got = ev.retrieval_metrics(x, y, ks=ks, backend=backend)
    assert {k: got[f"recall@{k}"] for k in ks} == recall
    assert got["map@r"] == pytest.approx(map_r, abs=1e-12)
    q, ql, g, gl = x[:100], y[:100], x[100:], y[100:]
    recall, _, _, _ = _reference(q, ql, g, gl, ks=(1, 7, 40))
    assert ev.recall_at_k(q, ql, g, gl, ks=(1, 7, 40), backend=backend) == recall
    # Exact ties: equal scores at lower indices rank first in the count too.
    x = _exact_ties(150, 6, seed=8)
    y = np.arange(150) % 9
    recall, _, _, _ = _reference(x, y, ks=(1, 3, 10, 40))
    assert ev.recall_at_k(x, y, ks=(1, 3, 10, 40), backend=backend) == recall
    assert ev.recall_at_k(x, np.arange(150), ks=(40,), backend=backend) == {40: 0.0}


@pytest.mark.parametrize("block_size", [1, 7, 64, 1000])
def test_rank_counting_is_independent_of_blocks_and_matches_the_loop(
    block_size, clustered
):
    # Leave-one-out counts the upper triangle once, updating rows and columns;
    # every block split must give the loop's ranks, and so must query/gallery.
    x, y = clustered(240, 50, 12, noise=1.4, seed=11)
    ks = (1, 2, 5, 30, 239)
    recall, _, _, _ = _reference(x, y, ks=ks)
    assert recall[1] < recall[30] < 1.0
    assert ev.recall_at_k(x, y, ks=ks, block_size=block_size) == recall
    q, ql, g, gl = x[:90], y[:90], x[90:], y[90:]
    recall, _, _, _ = _reference(q, ql, g, gl, ks=(1, 3, 20, 150))
    got = ev.recall_at_k(q, ql, g, gl, ks=(1, 3, 20, 150), block_size=block_size)
    assert got == recall


def _count_queries(monkeypatch, name):
    """Wraps `counting.<name>(q, g, q_codes, g_codes, queries, ...)`; returns
    the list to which each call appends its number of queries."""
    calls = []
    orig = getattr(counting, name)

    def spy(*args, **kwargs):
        calls.append(len(args[4]))
        return orig(*args, **kwargs)

    monkeypatch.setattr(counting, name, spy)
    return calls


def test_rank_counting_band_and_fallback(monkeypatch):
    # Duplicated vectors put several scores inside the rounding band around the
    # best same-class score: those queries are re-ranked from their own row.
    x = _exact_ties(150, 6, seed=3)
    x = np.concatenate([x, x[:40]])  # exact duplicates at higher indices
    y = np.concatenate([np.arange(150) % 11, np.arange(40) % 5])
    ks = (1, 2, 3, 10, 60)
    recall, _, _, _ = _reference(x, y, ks=ks)
    assert ev.recall_at_k(x, y, ks=ks, block_size=16) == recall
    calls = _count_queries(monkeypatch, "_rank_in_band")
    assert ev.recall_at_k(x, y, ks=ks) == recall
    assert 0 < calls[0] < len(x)  # only the ambiguous queries are re-ranked
    # Classes too large for the pair pass: top-k search, then counting misses.
    monkeypatch.setattr(counting, "MAX_PAIRS_PER_QUERY", 0)
    for backend in BACKENDS:
        assert ev.recall_at_k(x, y, ks=ks, backend=backend) == recall


def test_rank_counting_falls_back_where_the_band_holds_no_same_class_item(
    clustered, monkeypatch
):
    # The band around the best same-class score always holds that item; if it
    # did not (best scores shifted off here), the count would miss candidates
    # between the two, and those queries are ranked from their whole row.
    x, y = clustered(120, 6, 8, noise=1.5, seed=3)
    want = _slow_first_correct_ranks(x, y)
    best_same_class = counting.best_same_class
    monkeypatch.setattr(
        counting, "best_same_class", lambda *args: best_same_class(*args) + 1e-3
    )
    calls = _count_queries(monkeypatch, "first_hit_ranks")
    np.testing.assert_array_equal(ev.first_correct_ranks(x, y, block_size=32), want)
    assert calls and calls[0] > 10  # most queries went this way


def _ranks_in_order(scores, ql, gl, loo):
    """First same-class place per query, candidates by (-score, index)."""
    ranks = []
    for i, row in enumerate(scores):
        cands = np.array([j for j in range(len(gl)) if not (loo and j == i)])
        order = cands[np.lexsort((cands, -row[cands]))]
        hits = np.flatnonzero(gl[order] == ql[i])
        ranks.append(hits[0] if hits.size else -1)
    return np.array(ranks)


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("loo", [True, False])
def test_rank_counting_is_exact_where_float32_rounding_reorders(
    near_duplicates, loo, dense, monkeypatch
):
    # 512-d near-duplicates in mixed classes: each group's exact scores lie
    # closer together than a float32 matmul's rounding, so a count that trusted
    # the matmul's order near a query's best same-class score (a band too
    # narrow) would get places wrong. Both ways of counting a block: only the
    # scores that pass (sparse), or every score (dense, after a block of 2 rows
    # with any score above its threshold).
    monkeypatch.setattr(counting, "_DENSE", 10**12 if dense else 1)
    monkeypatch.setattr(counting, "_ROWS_AT_ONCE", 2)
    x = near_duplicates(40, 512, seed=5, copies=3)
    y = np.random.default_rng(5).integers(0, 30, len(x))
    q, ql, g, gl = (x, y, x, y) if loo else (x[:60], y[:60], x[60:], y[60:])
    exact = q.astype(np.float64) @ g.astype(np.float64).T  # gaps >> 1e-13
    want = _ranks_in_order(exact, ql, gl, loo)
    rounded = _ranks_in_order(q @ g.T, ql, gl, loo)
    assert np.count_nonzero(rounded != want) >= 3  # float32 does reorder here
    args = (q, ql) if loo else (q, ql, g, gl)
    for block_size in (None, 16):
        got = ev.first_correct_ranks(*args, block_size=block_size)
        np.testing.assert_array_equal(got, want)


def _slow_first_correct_ranks(q, ql, g=None, gl=None):
    """Per query: sort the candidates by (-exact score, index), find its class."""
    loo = g is None
    g, gl = (q, ql) if loo else (g, gl)
    ranks = []
    for i in range(len(q)):
        scores = [
            (-math.fsum(float(a) * float(b) for a, b in zip(q[i], g[j])), j)
            for j in range(len(g))
            if not (loo and j == i)
        ]
        order = [j for _, j in sorted(scores)]
        hits = [p for p, j in enumerate(order) if gl[j] == ql[i]]
        ranks.append(hits[0] if hits else -1)
    return np.array(ranks)


@pytest.mark.parametrize("huge_classes", [False, True])
def test_first_correct_ranks_match_a_slow_loop(clustered, monkeypatch, huge_classes):
    if huge_classes:  # the fallback for classes too large to count by pairs
        monkeypatch.setattr(counting, "MAX_PAIRS_PER_QUERY", 1)
    x, y = clustered(120, 6, 8, noise=1.5, seed=3)
    y[7] = 99  # a class of one: never correct
    ranks = ev.first_correct_ranks(x, y, block_size=32)
    np.testing.assert_array_equal(ranks, _slow_first_correct_ranks(x, y))
    monkeypatch.setattr(counting, "_ROWS_AT_ONCE", 2)
    for dense in (1, 10**12):  # count every block sparsely, then densely
        monkeypatch.setattr(counting, "_DENSE", dense)
        got = ev.first_correct_ranks(x, y, block_size=32)
        np.testing.assert_array_equal(got, ranks)
    assert ranks[7] == -1 and ranks.max() > 3  # some queries are hard
    for k, recall in ev.recall_at_k(x, y, ks=(1, 4)).items():
        assert recall == np.count_nonzero((ranks >= 0) & (ranks < k)) / len(y)
    q, ql, g, gl = x[:30], y[:30], x[30:], y[30:]
    np.testing.assert_array_equal(
        ev.first_correct_ranks(q, ql, g, gl), _slow_first_correct_ranks(q, ql, g, gl)
    )
