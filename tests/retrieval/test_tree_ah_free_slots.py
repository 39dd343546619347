"""A tree_ah retrieval SavedModel that finds fewer than k items fills free slots."""

from __future__ import annotations

import numpy as np
import pytest

from xbm_tf.backbones import build_embedding_model
from xbm_tf.retrieval import export_retrieval_model, load_retrieval_model


@pytest.mark.parametrize("rows", [[0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
def test_free_slots_are_minus_one_and_minus_inf(tmp_path, rows):
    # 120 items in 30 leaves, 1 searched: about 4 items found per query, so in
    # a batch every query may find fewer than k = 10 (ScaNN then returns fewer
    # columns than asked), or some find more than others.
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((120, 16)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    model = build_embedding_model("tiny", 16, input_shape=(8, 8, 1), weights=None)
    path = export_retrieval_model(
        model,
        gallery,
        tmp_path / "ah",
        10,
        index="tree_ah",
        num_leaves=30,
        leaves_to_search=1,
        reorder=10,
    )
    out = load_retrieval_model(path).search_embeddings(gallery[rows])
    ids, scores = np.asarray(out["ids"]), np.asarray(out["scores"])
    assert ids.shape == scores.shape == (len(rows), 10)
    free = ids == -1
    assert free.any() and (scores[free] == -np.inf).all()
    assert np.isfinite(scores[~free]).all()
    assert (np.diff(np.where(free, -2.0, scores), axis=1) <= 0).all()  # sorted
    for row in free:  # the free slots come last
        assert not row[: row.argmax()].any() if row.any() else True
        assert row[row.argmax() :].all() if row.any() else True
    found = gallery[np.where(free, 0, ids)]
    want = np.einsum("qd,qkd->qk", gallery[rows], found)
    np.testing.assert_allclose(scores[~free], want[~free], atol=1e-6)
