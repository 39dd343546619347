"""Pair losses: closed forms, a slow reference loop, and the Keras wrappers."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from xbm_tf.losses import (
    ContrastiveLoss,
    MultiSimilarityLoss,
    TripletLoss,
    contrastive_loss,
    multi_similarity_loss,
    triplet_loss,
)

# A query's loss in TensorFlow against the reference loops, which take float32
# similarities from numpy and add them in float64: the similarities over at most
# 6 dimensions, in float32 on both sides (2 x 6 terms), a float32 sum over at
# most 30 keys on one side, and a few roundings of the division (contrastive,
# triplet) or of exp and log (multi-similarity, whose scales cancel: its
# d loss / d s is at most 1): under 46 terms, each within 2**-24 of the terms
# of order 1 (conftest's float32_gap, counting each side's own terms once).
LOOP_GAP = 46 * 2.0**-24


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_problem(seed, b=12, m=30, d=6, classes=4, with_mask=True):
    rng = np.random.default_rng(seed)
    q = _unit(rng.normal(size=(b, d)))
    k = _unit(rng.normal(size=(m, d)))
    ql = rng.integers(0, classes, b)
    kl = rng.integers(0, classes, m)
    mask = rng.random(m) > 0.2 if with_mask else np.ones(m, bool)
    own = rng.permutation(m)[:b].astype(np.int32)
    own[::3] = -1  # some queries have no copy among the keys
    return q, ql, k, kl, mask, own


def _pairs(i, ql, kl, mask, own):
    """The positive and negative key indices of query i, by a plain loop."""
    pos, neg = [], []
    for j in range(len(kl)):
        if not mask[j] or j == own[i]:
            continue
        (pos if kl[j] == ql[i] else neg).append(j)
    return pos, neg


def reference_contrastive(q, ql, k, kl, mask, own, margin):
    out = []
    for i in range(len(q)):
        pos, neg = _pairs(i, ql, kl, mask, own)
        total = 0.0
        for j in pos:
            total += 1.0 - float(q[i] @ k[j])
        for j in neg:
            s = float(q[i] @ k[j])
            if s > margin:
                total += s
        out.append(total)
    return np.array(out)


def reference_triplet(q, ql, k, kl, mask, own, margin, mining):
    out = []
    for i in range(len(q)):
        pos, neg = _pairs(i, ql, kl, mask, own)
        if not pos or not neg:
            out.append(0.0)
            continue
        s = {j: float(q[i] @ k[j]) for j in pos + neg}
        if mining == "hard":
            out.append(
                max(0.0, max(s[j] for j in neg) - min(s[j] for j in pos) + margin)
            )
            continue
        terms = []
        for p in pos:
            semihard = [s[n] for n in neg if s[n] < s[p]]
            chosen = max(semihard) if semihard else min(s[n] for n in neg)
            terms.append(max(0.0, chosen - s[p] + margin))
        out.append(sum(terms) / len(terms))
    return np.array(out)


def reference_multi_similarity(q, ql, k, kl, mask, own, a, b, lam, eps):
    out = []
    for i in range(len(q)):
        pos, neg = _pairs(i, ql, kl, mask, own)
        if not pos or not neg:
            out.append(0.0)
            continue
        sp = [float(q[i] @ k[j]) for j in pos]
        sn = [float(q[i] @ k[j]) for j in neg]
        mined_n = [s for s in sn if s + eps > min(sp)]
        mined_p = [s for s in sp if s - eps < max(sn)]
        if not mined_n or not mined_p:
            out.append(0.0)
            continue
        lp = math.log(1 + sum(math.exp(-a * (s - lam)) for s in mined_p)) / a
        ln = math.log(1 + sum(math.exp(b * (s - lam)) for s in mined_n)) / b
        out.append(lp + ln)
    return np.array(out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrastive_matches_reference_loop(seed):
    q, ql, k, kl, mask, own = _random_problem(seed)
    for margin in (0.0, 0.3):
        got = contrastive_loss(
            q, ql, k, kl, key_mask=mask, query_key_index=own, neg_margin=margin
        )
        want = reference_contrastive(q, ql, k, kl, mask, own, margin)
        np.testing.assert_allclose(np.asarray(got), want, rtol=LOOP_GAP, atol=LOOP_GAP)


@pytest.mark.parametrize("mining", ["hard", "semihard"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_matches_reference_loop(seed, mining):
    q, ql, k, kl, mask, own = _random_problem(seed)
    got = triplet_loss(
        q, ql, k, kl, key_mask=mask, query_key_index=own, margin=0.2, mining=mining
    )
    want = reference_triplet(q, ql, k, kl, mask, own, 0.2, mining)
    np.testing.assert_allclose(np.asarray(got), want, rtol=LOOP_GAP, atol=LOOP_GAP)
    assert np.count_nonzero(want) > 3  # the data exercises the loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_similarity_matches_reference_loop(seed):
    q, ql, k, kl, mask, own = _random_problem(seed)
    got = multi_similarity_loss(q, ql, k, kl, key_mask=mask, query_key_index=own)
    want = reference_multi_similarity(q, ql, k, kl, mask, own, 2.0, 40.0, 0.5, 0.1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=LOOP_GAP, atol=LOOP_GAP)
    assert np.count_nonzero(want) > 3


def test_contrastive_closed_form():
    # Two classes on the unit circle; similarities are cosines of known angles.
    angles = np.array([0.0, np.pi / 3, np.pi / 2, np.pi])
    e = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    labels = np.array([0, 0, 1, 1])
    got = np.asarray(
        contrastive_loss(
            e, labels, e, labels, query_key_index=np.arange(4), neg_margin=0.4
        )
    )
    # Query 0: positive 1 (s=0.5) -> 0.5; negatives 2 (s=0), 3 (s=-1) -> below margin.
    # Query 1: positive 0 -> 0.5; negative 2 (s=cos(pi/6)=0.866) > 0.4 -> 0.866.
    # Query 2: positive 3 (s=0) -> 1; negative 1 (s=0.866) -> 0.866.
    # Query 3: positive 2 -> 1; negatives 0 (s=-1), 1 (s=-0.5): none.
    c = math.cos(math.pi / 6)
    np.testing.assert_allclose(got, [0.5, 0.5 + c, 1 + c, 1.0], atol=1e-6)
    keras_value = ContrastiveLoss(neg_margin=0.4)(labels, e)
    np.testing.assert_allclose(float(keras_value), got.mean(), atol=1e-6)


def test_self_pair_excluded_by_index_not_similarity():
    # One query (label 1) against four keys, as in a memory: its own copy, drifted
    # (s = 0.8, excluded by index); an exact duplicate of another class (s = 1, a
    # hard negative that a similarity threshold would wrongly drop); an exact
    # duplicate of its class (s = 1); and a positive at s = 0.
    q = _unit([[1.0, 0.0]])
    keys = _unit([[0.8, 0.6], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    key_labels = np.array([1, 2, 1, 1])
    args = (q, np.array([1]), keys, key_labels)
    own = np.array([0])
    got = float(contrastive_loss(*args, query_key_index=own, neg_margin=0.5)[0])
    # Index exclusion: 0 (own) + 1 (duplicate negative) + 0 + (1 - 0) = 2.0.
    # No exclusion would give 2.2 (the own copy costs 1 - 0.8); the reference
    # code's threshold (drop s > 1 - 1e-5) 1.2 (keeps the drifted copy, drops both
    # duplicates).
    assert got == pytest.approx(2.0, abs=1e-6)
    hard = float(triplet_loss(*args, query_key_index=own, margin=0.1, mining="hard")[0])
    # Hardest positive s = 0, hardest negative the duplicate, s = 1: 1.1. Under a
    # threshold the query would have no negative left and cost 0.
    assert hard == pytest.approx(1.1, abs=1e-6)
    # Without an index the own copy is an ordinary positive.
    assert float(contrastive_loss(*args, neg_margin=0.5)[0]) == pytest.approx(
        2.2, abs=1e-6
    )


def _edge_problems(seed):
    """Two (query, key) problems that reach every edge case of the losses.

    A: tight clusters of classes 0-2 among the keys, queries of classes 0-3
    (class 3 has no positive; many queries are so close to their class that the
    multi-similarity mining keeps no negative). B: every valid key is of class 0,
    so class-0 queries have no negative and class-1 queries no positive.
    """
    rng = np.random.default_rng(seed)
    centers = _unit(rng.normal(size=(4, 5)))
    ql = rng.integers(0, 4, 12)
    kl = rng.integers(0, 3, 30)
    q = _unit(centers[ql] + 0.15 * rng.normal(size=(12, 5)))
    k = _unit(centers[kl] + 0.15 * rng.normal(size=(30, 5)))
    mask = rng.random(30) > 0.2
    own = np.full(12, -1, np.int32)
    own[:6] = rng.permutation(30)[:6]
    kl_b = np.where(mask, 0, rng.integers(0, 2, 30))  # masked keys may be class 1
    ql_b = rng.integers(0, 2, 12)
    return [(q, ql, k, kl, mask, own), (q, ql_b, k, kl_b, mask, own)]


def _edge_cases(q, ql, k, kl, mask, own, eps=0.1):
    """The set of edge cases the queries of a problem reach (by a plain loop)."""
    cases = set()
    for i in range(len(q)):
        pos, neg = _pairs(i, ql, kl, mask, own)
        if not pos:
            cases.add("no positive")
        if not neg:
            cases.add("no negative")
        if pos and neg:
            sp = [float(q[i] @ k[j]) for j in pos]
            sn = [float(q[i] @ k[j]) for j in neg]
            if not any(s + eps > min(sp) for s in sn):
                cases.add("mining keeps no negative")
            elif not any(s - eps < max(sn) for s in sp):
                cases.add("mining keeps no positive")
            else:
                cases.add("mined both")
    return cases


@pytest.mark.parametrize("seed", [0, 1])
def test_reference_loops_on_queries_without_positives_negatives_or_mined_pairs(seed):
    reached = set()
    for q, ql, k, kl, mask, own in [*_edge_problems(seed), _random_problem(seed)]:
        reached |= _edge_cases(q, ql, k, kl, mask, own)
        kw = dict(key_mask=mask, query_key_index=own)
        np.testing.assert_allclose(
            contrastive_loss(q, ql, k, kl, neg_margin=0.3, **kw),
            reference_contrastive(q, ql, k, kl, mask, own, 0.3),
            rtol=LOOP_GAP,
            atol=LOOP_GAP,
        )
        for mining in ("hard", "semihard"):
            np.testing.assert_allclose(
                triplet_loss(q, ql, k, kl, margin=0.2, mining=mining, **kw),
                reference_triplet(q, ql, k, kl, mask, own, 0.2, mining),
                rtol=LOOP_GAP,
                atol=LOOP_GAP,
            )
        np.testing.assert_allclose(
            multi_similarity_loss(q, ql, k, kl, **kw),
            reference_multi_similarity(q, ql, k, kl, mask, own, 2.0, 40.0, 0.5, 0.1),
            rtol=LOOP_GAP,
            atol=LOOP_GAP,
        )
    assert {
        "no positive",
        "no negative",
        "mining keeps no negative",
        "mined both",
    } <= reached, reached


def test_multi_similarity_mining_that_empties_one_side_costs_zero():
    # Positives at s = 0.9 and 0.8, negatives at s = 0.2 and 0.75. With epsilon
    # 0.02 no negative has s + epsilon > min(s_pos) = 0.8: mining keeps none,
    # and then no positive either (s - epsilon < max(s_neg) = 0.75 holds for
    # none), so the query costs 0; mining cannot empty only the negative side.
    # With epsilon 0.1 the 0.75 negative is kept, and the positive 0.8
    # (0.8 - 0.1 < 0.75).
    q = _unit([[1.0, 0.0]])
    sims = np.array([0.9, 0.8, 0.2, 0.75])
    keys = np.stack([sims, np.sqrt(1 - sims**2)], axis=1).astype(np.float32)
    args = (q, np.array([0]), keys, np.array([0, 0, 1, 1]))
    assert float(multi_similarity_loss(*args, epsilon=0.02)[0]) == 0.0
    kept = float(multi_similarity_loss(*args, epsilon=0.1)[0])
    want = (
        math.log(1 + math.exp(-2 * (0.8 - 0.5))) / 2
        + math.log(1 + math.exp(40 * (0.75 - 0.5))) / 40
    )
    assert kept == pytest.approx(want, rel=1e-5)


def test_key_mask_removes_keys_and_any_label_works():
    q = _unit([[1.0, 0.0]])
    k = _unit([[0.0, 1.0], [1.0, 1.0]])
    # Label 0 on an empty slot must not make it a positive.
    got = contrastive_loss(
        q,
        np.array([0]),
        k,
        np.array([0, 7]),
        key_mask=np.array([False, True]),
        neg_margin=0.5,
    )
    np.testing.assert_allclose(np.asarray(got), [math.sqrt(0.5)], atol=1e-6)


def test_triplet_closed_form_hard():
    e = _unit([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    labels = np.array([0, 0, 1, 1])
    got = np.asarray(
        triplet_loss(
            e,
            labels,
            e,
            labels,
            query_key_index=np.arange(4),
            margin=0.1,
            mining="hard",
        )
    )
    # Query 0: s_pos = 0.8, hardest neg s = 0.6 -> relu(0.6 - 0.8 + 0.1) = 0.
    # Query 1: s_pos = 0.8, hardest neg s(1,2) = 0.96 -> 0.26.
    np.testing.assert_allclose(got, [0.0, 0.26, 0.26, 0.0], atol=1e-6)


def test_multi_similarity_closed_form_single_pair():
    e = _unit([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    labels = np.array([0, 0, 1])
    got = np.asarray(
        multi_similarity_loss(
            e[:1], labels[:1], e, labels, query_key_index=np.array([0])
        )
    )
    # s_pos = 0.6, s_neg = 0.8: both survive mining (0.8 + 0.1 > 0.6; 0.5 < 0.8).
    want = (
        math.log(1 + math.exp(-2 * (0.6 - 0.5))) / 2
        + math.log(1 + math.exp(40 * (0.8 - 0.5))) / 40
    )
    np.testing.assert_allclose(got, [want], rtol=1e-5)


@pytest.mark.parametrize(
    "loss",
    [
        ContrastiveLoss(neg_margin=0.3),
        TripletLoss(mining="hard"),
        MultiSimilarityLoss(beta=30.0),
    ],
)
def test_keras_wrapper_round_trips_config(loss):
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(clone) is type(loss)
    assert clone.get_config() == loss.get_config()
    e = _unit(np.random.default_rng(0).normal(size=(8, 4)))
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    assert float(clone(y, e)) == pytest.approx(float(loss(y, e)), abs=1e-6)


def test_triplet_rejects_unknown_mining():
    with pytest.raises(ValueError, match="mining must be one of"):
        TripletLoss(mining="easy")
