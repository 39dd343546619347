"""pair_reduction: "sum" (the paper's) and "mean" (a scale that ignores M)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_losses import _pairs, _random_problem, _unit

from xbm_tf.losses import (
    ContrastiveLoss,
    TripletLoss,
    contrastive_loss,
    fused_contrastive_loss,
    triplet_loss,
)


def _problem(seed):
    """A random problem with up to 40 keys in 4 dimensions."""
    return _random_problem(seed, m=40, d=4)


def reference_contrastive_mean(q, ql, k, kl, mask, own, margin):
    """Each query: mean of 1 - s over positives + mean of s over hard negatives."""
    out = []
    for i in range(len(q)):
        pos, neg = _pairs(i, ql, kl, mask, own)
        pos_terms = [1.0 - float(q[i] @ k[j]) for j in pos]
        neg_terms = [float(q[i] @ k[j]) for j in neg if float(q[i] @ k[j]) > margin]
        total = 0.0
        if pos_terms:
            total += sum(pos_terms) / len(pos_terms)
        if neg_terms:
            total += sum(neg_terms) / len(neg_terms)
        out.append(total)
    return np.array(out)


def reference_semihard_mean(q, ql, k, kl, mask, own, margin):
    """Each query: the mean of its non-zero semi-hard triplet losses."""
    out = []
    for i in range(len(q)):
        pos, neg = _pairs(i, ql, kl, mask, own)
        if not pos or not neg:
            out.append(0.0)
            continue
        s = {j: float(q[i] @ k[j]) for j in pos + neg}
        terms = []
        for p in pos:
            semihard = [s[n] for n in neg if s[n] < s[p]]
            chosen = max(semihard) if semihard else min(s[n] for n in neg)
            terms.append(max(0.0, chosen - s[p] + margin))
        active = [t for t in terms if t > 0]
        out.append(sum(active) / len(active) if active else 0.0)
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrastive_mean_matches_reference_loop(seed):
    q, ql, k, kl, mask, own = _problem(seed)
    for margin in (0.0, 0.3):
        got = contrastive_loss(
            q, ql, k, kl, mask, own, neg_margin=margin, pair_reduction="mean"
        )
        want = reference_contrastive_mean(q, ql, k, kl, mask, own, margin)
        # float32 (matmul and sums of <= 40 terms in [-1, 2]) against float64
        # dot products: errors of a few 2^-24 per term, far below 1e-5.
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
        # The mean is not the sum: the data has queries with several pairs.
        summed = contrastive_loss(q, ql, k, kl, mask, own, neg_margin=margin)
        assert np.abs(np.asarray(summed) - want).max() > 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_mean_matches_reference_loop(seed):
    q, ql, k, kl, mask, own = _problem(seed)
    got = triplet_loss(q, ql, k, kl, mask, own, margin=0.2, pair_reduction="mean")
    want = reference_semihard_mean(q, ql, k, kl, mask, own, 0.2)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    default = np.asarray(triplet_loss(q, ql, k, kl, mask, own, margin=0.2))
    assert np.all(want >= default - 1e-6) and np.any(want > default + 1e-3)
    # With batch-hard mining a query has one triplet: the mean is the sum.
    hard = [
        np.asarray(triplet_loss(q, ql, k, kl, mask, own, mining="hard", **kw))
        for kw in ({}, {"pair_reduction": "mean"})
    ]
    np.testing.assert_array_equal(*hard)


def _random_keys(num_keys, seed, d=8, classes=16):
    rng = np.random.default_rng(seed)
    return _unit(rng.normal(size=(num_keys, d))), rng.integers(0, classes, num_keys)


@pytest.mark.parametrize(
    "loss",
    [
        ContrastiveLoss(pair_reduction="mean"),
        TripletLoss(pair_reduction="mean"),
        ContrastiveLoss(pair_reduction="sum"),
    ],
)
def test_mean_keeps_its_scale_as_the_keys_grow(loss):
    # 64 queries against 256 and 4,096 random unit keys of 16 classes in 8-d
    # (so that many negatives lie above the margin). Each query's mean is over
    # ~16 positives and ~30 hard negatives at M = 256, so the batch mean has a
    # sampling error of a few percent at most; the sum grows 16x.
    queries, query_labels = _random_keys(64, seed=0)
    values = []
    for num_keys in (256, 4096):
        keys, key_labels = _random_keys(num_keys, seed=num_keys)
        per_query = loss.pair_loss(queries, query_labels, keys, key_labels)
        values.append(float(np.mean(per_query)))
    ratio = values[1] / values[0]
    if loss.pair_reduction == "mean":
        assert 0.9 < ratio < 1.1, values
    else:
        assert ratio > 10, values


@pytest.mark.parametrize(
    "loss",
    [
        ContrastiveLoss(neg_margin=0.3, pair_reduction="mean"),
        TripletLoss(margin=0.2, pair_reduction="mean"),
    ],
)
def test_pair_reduction_round_trips_through_config(loss):
    assert loss.get_config()["pair_reduction"] == "mean"
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert clone.pair_reduction == "mean"
    e = _unit(np.random.default_rng(0).normal(size=(8, 4)))
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    assert float(clone(y, e)) == pytest.approx(float(loss(y, e)), abs=1e-6)


def test_default_is_the_sum_and_bad_values_are_named():
    assert ContrastiveLoss().pair_reduction == "sum"
    assert TripletLoss().pair_reduction == "sum"
    for make in (
        lambda: ContrastiveLoss(pair_reduction="avg"),
        lambda: TripletLoss(pair_reduction="avg"),
        lambda: contrastive_loss(*_problem(0)[:4], pair_reduction="avg"),
        lambda: fused_contrastive_loss(*_problem(0)[:4], pair_reduction="avg"),
    ):
        with pytest.raises(ValueError, match="pair_reduction must be one of"):
            make()


def test_model_saves_and_loads_the_pair_reduction(tmp_path):
    from xbm_tf import XBMContrastiveModel, build_embedding_model

    backbone = build_embedding_model(
        "tiny", input_shape=(8, 8, 1), embedding_dim=4, weights=None
    )
    model = XBMContrastiveModel(
        backbone, memory_size=8, loss=ContrastiveLoss(pair_reduction="mean")
    )
    model.compile(optimizer="adam")
    model(tf.zeros((1, 8, 8, 1)))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.pair_loss.pair_reduction == "mean"
