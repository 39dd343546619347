"""Tests for xbm_tf.retrieval.engines: one name per engine, identical exact Recall@K.

The reference is a slow loop over exactly summed dot products (`math.fsum` of the
float64 products of float32 inputs, which are exact), ties by lower index, so it
does not share the engines' float32 kernels or their float64 re-ranking.
"""

from __future__ import annotations

import importlib.machinery
import math

import numpy as np
import pytest

import xbm_tf
from xbm_tf import retrieval
from xbm_tf.retrieval import engines


def _exact_recall(q, ql, g=None, gl=None, ks=(1,)):
    """Recall@K from exactly summed scores, ties by lower index."""
    loo = g is None
    if loo:
        g, gl = q, ql
    g64, q64 = g.astype(np.float64), q.astype(np.float64)
    hits = {k: 0 for k in ks}
    for i in range(len(q)):
        sims = [math.fsum(q64[i] * g64[j]) for j in range(len(g))]
        cands = [j for j in range(len(g)) if not (loo and j == i)]
        order = sorted(cands, key=lambda j: (-sims[j], j))
        rel = [gl[j] == ql[i] for j in order]
        for k in ks:
            hits[k] += any(rel[:k])
    return {k: hits[k] / len(q) for k in ks}


def _near_ties(num_bases, variants, dim, num_classes, seed):
    """Groups of vectors a few float32 ulps apart, with random labels.

    Within a group the exact dot products with any query differ by about 1e-8,
    below float32 rounding (about 1e-7), so a float32 matmul orders them by
    rounding noise; only an exact re-ranking gets them right. Some variants
    are exact duplicates (equal exact scores: lower index first).
    """
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((num_bases, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    x = np.repeat(base, variants, axis=0)
    for row in x[rng.random(len(x)) < 0.8]:  # the other 20% stay duplicates
        for j in rng.choice(dim, 3, replace=False):
            steps = rng.integers(1, 4)
            direction = np.float32(np.inf if rng.random() < 0.5 else -np.inf)
            for _ in range(steps):
                row[j] = np.nextafter(row[j], direction)
    order = rng.permutation(len(x))  # groups spread over the index range
    return x[order], rng.integers(0, num_classes, size=len(x))


def _exact_lists(q, g, k, loo):
    """Top-k rows by exactly summed scores (math.fsum), ties by lower index."""
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    lists = []
    for i in range(len(q)):
        sims = [math.fsum(q64[i] * g64[j]) for j in range(len(g))]
        cands = [j for j in range(len(g)) if not (loo and j == i)]
        lists.append(sorted(cands, key=lambda j: (-sims[j], j))[:k])
    return np.array(lists)


@pytest.mark.parametrize("loo, k, copies", [(True, 9, 1), (False, 9, 1), (True, 40, 3)])
def test_exact_lists_are_canonical_on_near_duplicates(loo, k, copies, near_duplicates):
    # Every exact engine, at any block size, must return the order of the exact
    # scores (equal ones by lower index), not the order of float32 noise.
    x = near_duplicates(200 // (copies + 1), 32, seed=4, copies=copies)
    q = x if loo else near_duplicates(25, 32, seed=5)
    g = None if loo else x
    want = _exact_lists(q, x, k, loo)
    for backend, block_size in (
        ("exact", 7),
        ("exact", 1024),
        ("scann", 5),
        ("scann", None),
    ):
        idx, scores = retrieval.nearest_neighbors(
            q, g, k=k, backend=backend, block_size=block_size
        )
        np.testing.assert_array_equal(idx, want, err_msg=f"{backend} {block_size}")
        assert np.all(np.diff(scores, axis=1) <= 0)
    # The re-ranking is what gets it right: float32 top_k alone does not.
    _, plain = engines._top_k_block(q, x, 0, k, loo)
    assert not np.array_equal(plain.numpy(), want)
    # `ordered` puts only the first places in the canonical order.
    for backend in ("exact", "scann"):
        idx, _ = retrieval.nearest_neighbors(q, g, k=k, backend=backend, ordered=3)
        np.testing.assert_array_equal(idx[:, :3], want[:, :3], err_msg=backend)


def test_a_near_duplicate_group_larger_than_the_candidates_is_searched_whole(
    near_duplicates,
):
    # 40 copies of one row (3e-8 noise) hold every query's top k: more than the
    # k + 16 float32 candidates, so the rounding band reaches the last one and
    # the query is searched over the whole gallery.
    rng = np.random.default_rng(6)
    x = near_duplicates(60, 32, seed=6)
    group = x[:1] + 3e-8 * rng.standard_normal((40, 32)).astype(np.float32)
    g = np.concatenate([x, group])[rng.permutation(len(x) + 40)]
    q = x[:1] + 0.01 * rng.standard_normal((8, 32)).astype(np.float32)
    want = _exact_lists(q, g, 5, False)
    for backend in ("exact", "scann"):
        idx, _ = retrieval.nearest_neighbors(q, g, k=5, backend=backend)
        np.testing.assert_array_equal(idx, want, err_msg=backend)


def test_engine_names():
    assert retrieval.ENGINES == ("exact_rank", "exact", "scann", "scann_ah")
    assert retrieval.EXACT_ENGINES == ("exact_rank", "exact", "scann")
    assert retrieval.APPROXIMATE_ENGINES == ("scann_ah",)
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"one of \('exact_rank'.*'scann_ah'\).*'xyz'"):
        retrieval.recall_at_k(x, [0, 0, 1, 1], ks=(1,), backend="xyz")
    with pytest.raises(ValueError, match=r"`backend` must be one of"):
        retrieval.nearest_neighbors(x, k=1, backend="faiss")


@pytest.mark.parametrize("block_size", [None, 7])
def test_exact_engines_identical_recall_on_ties_and_near_ties(block_size):
    x, y = _near_ties(num_bases=20, variants=6, dim=16, num_classes=3, seed=0)
    ks = (1, 2, 3, 5, 8, 30)
    want = _exact_recall(x, y, ks=ks)
    assert 0.1 < want[1] < want[5] < 1.0  # R@1 depends on the near-ties
    for backend in retrieval.EXACT_ENGINES:
        got = retrieval.recall_at_k(x, y, ks=ks, backend=backend, block_size=block_size)
        assert got == want, backend
    q, ql, g, gl = x[:40], y[:40], x[40:], y[40:]
    want = _exact_recall(q, ql, g, gl, ks=(1, 2, 4, 60))
    for backend in retrieval.EXACT_ENGINES:
        got = retrieval.recall_at_k(
            q, ql, g, gl, ks=(1, 2, 4, 60), backend=backend, block_size=block_size
        )
        assert got == want, backend


def test_exact_engines_identical_recall_on_exact_ties():
    # Entries of +-0.5: every score is a multiple of 1/4 in any arithmetic.
    rng = np.random.default_rng(3)
    x = np.zeros((160, 8), np.float32)
    for row in x:
        row[rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    y = rng.integers(0, 10, size=160)
    ks = (1, 4, 16, 100)
    want = _exact_recall(x, y, ks=ks)
    for backend in retrieval.EXACT_ENGINES:
        assert retrieval.recall_at_k(x, y, ks=ks, backend=backend) == want, backend
        got = retrieval.retrieval_metrics(x, y, ks=ks, backend=backend)
        assert {k: got[f"recall@{k}"] for k in ks} == want, backend
        assert "approximate" not in got


def _separated_clusters(num_clusters, size, dim, seed):
    """`num_clusters` tight clusters of `size` unit rows, far from each other,
    and labels that split each cluster into two classes at random.

    Within a cluster every cosine similarity is above 0.98, between clusters
    below 0.7 (random centres in 32-d). With fewer clusters than ScaNN's leaves
    (sqrt(N)) and clusters smaller than its re-ordered candidates (at least
    100), whatever partition ScaNN's k-means draws in a process, each query's
    searched leaves hold its whole cluster, whose items are then all re-scored
    exactly. So the approximate lists equal the exact ones in every process,
    and the metrics are not trivial: the classes interleave within a cluster.
    """
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_clusters, dim))
    cluster = np.repeat(np.arange(num_clusters), size)
    x = centers[cluster] + 0.05 * rng.standard_normal((len(cluster), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = 2 * cluster + rng.integers(0, 2, len(cluster))
    order = rng.permutation(len(cluster))
    return x[order].astype(np.float32), labels[order], cluster[order]


def test_scann_ah_equals_exact_on_separated_clusters_and_is_labelled(clustered):
    x, y, cluster = _separated_clusters(30, 100, 32, seed=1)
    sims = x @ x.T
    same = cluster[:, None] == cluster[None, :]
    assert sims[same].min() > 0.98 and sims[~same].max() < 0.7  # unambiguous
    exact, exact_scores = retrieval.nearest_neighbors(x, k=10, backend="exact")
    approx, scores = retrieval.nearest_neighbors(x, k=10, backend="scann_ah")
    assert approx.shape == (3000, 10) and approx.min() >= 0
    assert not np.any(approx == np.arange(3000)[:, None])  # self excluded
    assert np.all(np.diff(scores, axis=1) <= 0)
    np.testing.assert_array_equal(approx, exact)
    np.testing.assert_allclose(scores, exact_scores, rtol=0, atol=1e-6)
    got = retrieval.retrieval_metrics(x, y, ks=(1, 10), backend="scann_ah")
    want = retrieval.retrieval_metrics(x, y, ks=(1, 10))
    assert got.pop("approximate") == 1.0 and "approximate" not in want
    assert 0.3 < want["recall@1"] < 0.9 and want["map@r"] < 0.9  # not trivial
    assert got == want


def test_scann_ah_is_labelled_approximate_on_overlapping_clusters(clustered):
    # Overlapping clusters: the approximate lists may differ from exact search
    # (by ScaNN's k-means, which varies from process to process), so only the
    # label and the list invariants are asserted here.
    x, y = clustered(600, 12, 16, noise=0.6, seed=1)
    approx, scores = retrieval.nearest_neighbors(x, k=10, backend="scann_ah")
    assert approx.shape == (600, 10) and approx.min() >= 0
    assert not np.any(approx == np.arange(600)[:, None])
    assert np.all(np.diff(scores, axis=1) <= 0)
    true = np.einsum("qd,qkd->qk", x, x[approx])
    np.testing.assert_allclose(scores, true, atol=1e-5)  # re-scored exactly
    got = retrieval.retrieval_metrics(x, y, ks=(1, 10), backend="scann_ah")
    assert got["approximate"] == 1.0


def test_scann_ah_completes_short_rows_exactly(monkeypatch, clustered):
    # Searching 1 leaf of 20 cannot fill 100 neighbours: ScaNN pads those rows
    # with (0, NaN); they are searched exactly instead.
    import scann

    def one_leaf(_, g, n):
        builder = scann.scann_ops_pybind.builder(g, n, "dot_product")
        builder = builder.tree(20, 1, training_sample_size=len(g))
        return builder.score_ah(2).reorder(n).build()

    monkeypatch.setattr(engines, "_scann_ah_searcher", one_leaf)
    x, _ = clustered(300, 10, 8, noise=1.0, seed=2)
    idx, scores = retrieval.nearest_neighbors(x, k=100, backend="scann_ah")
    want_idx, want_scores = retrieval.nearest_neighbors(x, k=100, backend="exact")
    assert np.isfinite(scores).all()
    assert np.array_equal(np.sort(idx, axis=1), np.sort(want_idx, axis=1))
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_top_level_names_are_the_retrieval_ones_and_old_modules_are_gone():
    assert xbm_tf.recall_at_k is retrieval.recall_at_k
    assert xbm_tf.map_at_r is retrieval.map_at_r
    assert xbm_tf.r_precision is retrieval.r_precision
    assert xbm_tf.RetrievalEvaluation is retrieval.RetrievalEvaluation
    assert xbm_tf.retrieval is retrieval
    # Looked up in the package's own folder: a development environment's editable
    # install of another checkout could otherwise answer the import.
    for old in ("xbm_tf.evaluation", "xbm_tf.retrieval_callback"):
        assert importlib.machinery.PathFinder.find_spec(old, xbm_tf.__path__) is None
    assert importlib.machinery.PathFinder.find_spec("xbm_tf.model", xbm_tf.__path__)
