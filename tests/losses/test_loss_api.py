"""The loss API: exact label comparison, hyper-parameters, saving custom losses."""

from __future__ import annotations

import inspect
import math

import keras
import numpy as np
import pytest

from xbm_tf.losses import (
    ContrastiveLoss,
    MultiSimilarityLoss,
    PairLoss,
    TripletLoss,
    contrastive_loss,
    multi_similarity_loss,
    triplet_loss,
)
from xbm_tf.losses.base import hyper_parameters


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _embeddings(n=4, d=3, seed=0):
    return _unit(np.random.default_rng(seed).normal(size=(n, d)))


# --- Labels compare exactly, whatever their integer dtype -------------------------


@pytest.mark.parametrize(
    "dtype, first", [("float32", 2**24), ("float16", 2048), (None, 2**31 + 7)]
)
def test_wrapper_keeps_large_labels_apart(dtype, first, float32_gap):
    e = _embeddings(seed=3)
    labels = np.arange(first, first + 4, dtype=np.int64)  # four classes
    want = np.mean(contrastive_loss(e, labels, e, labels, query_key_index=np.arange(4)))
    merged = np.mean(  # what labels rounded to one float would give
        contrastive_loss(e, labels * 0, e, labels * 0, query_key_index=np.arange(4))
    )
    assert abs(want - merged) > 0.05  # the two cases differ
    got = float(ContrastiveLoss(dtype=dtype)(labels, e))
    # The wrapper's kernels against the float32 function: the inputs rounded
    # (2 per similarity), 3-wide similarities, sums over 3 keys and the mean over
    # 4 queries: 12 roundings of float16 (2**-11) or float32 (conftest's
    # float32_gap), on terms of order 1.
    gap = 12 * 2.0**-11 if dtype == "float16" else float32_gap(12)
    assert got == pytest.approx(float(want), abs=gap)


@pytest.mark.parametrize(
    "query_label, key_label",
    [
        (np.array([5], np.uint8), np.array([261], np.int32)),  # 261 = 5 mod 256
        (np.array([5], np.int32), np.array([2**32 + 5], np.int64)),
        (np.array([2**32 + 5], np.int64), np.array([5], np.int32)),
        (np.array([5], np.int8), np.array([2**16 + 5], np.uint32)),
    ],
)
def test_pair_masks_do_not_narrow_labels(query_label, key_label):
    q = _unit([[1.0, 0.0]])
    k = _unit([[0.6, 0.8]])  # s = 0.6: a positive costs 0.4, a negative 0.6
    got = float(contrastive_loss(q, query_label, k, key_label, neg_margin=0.5)[0])
    assert got == pytest.approx(0.6, abs=1e-6)  # a negative, not a positive
    same = float(contrastive_loss(q, query_label, k, query_label, neg_margin=0.5)[0])
    assert same == pytest.approx(0.4, abs=1e-6)


def test_labels_that_cannot_compare_exactly_are_errors():
    e = _embeddings()
    with pytest.raises(TypeError, match="y_true \\(labels\\) must be integers"):
        ContrastiveLoss()(np.array([0.0, 0.0, 1.0, 1.0], np.float32), e)
    with pytest.raises(TypeError, match="key_labels must be integers, got float64"):
        contrastive_loss(e, np.arange(4), e, np.arange(4.0))
    with pytest.raises(TypeError, match="query_labels are uint64"):
        contrastive_loss(e, np.arange(4, dtype=np.uint64), e, np.arange(4))


def test_wrapper_reductions_and_sample_weight():
    e = _embeddings(n=6)
    y = np.array([0, 0, 1, 1, 2, 2])
    per_query = np.asarray(contrastive_loss(e, y, e, y, query_key_index=np.arange(6)))
    w = np.array([1.0, 0.0, 2.0, 1.0, 0.5, 0.5], np.float32)
    np.testing.assert_allclose(
        ContrastiveLoss(reduction="none")(y, e), per_query, rtol=1e-6
    )
    assert float(ContrastiveLoss(reduction="sum")(y, e)) == pytest.approx(
        per_query.sum(), rel=1e-6
    )
    assert float(ContrastiveLoss()(y, e, sample_weight=w)) == pytest.approx(
        (per_query * w).sum() / 6, rel=1e-6
    )
    weighted = ContrastiveLoss(reduction="mean_with_sample_weight")
    assert float(weighted(y, e, sample_weight=w)) == pytest.approx(
        (per_query * w).sum() / w.sum(), rel=1e-6
    )


# --- Hyper-parameters: one name, one default, read-only ---------------------------


# The README's table of defaults, as literals: the functions define them, the
# classes (constructor, hyper_parameters, get_config) must show the same values.
DOCUMENTED_DEFAULTS = {
    "contrastive": {"neg_margin": 0.5, "pair_reduction": "sum"},
    "triplet": {"margin": 0.1, "mining": "semihard", "pair_reduction": "sum"},
    "multi_similarity": {"alpha": 2.0, "beta": 40.0, "threshold": 0.5, "epsilon": 0.1},
}


@pytest.mark.parametrize(
    "cls, fn, name",
    [
        (ContrastiveLoss, contrastive_loss, "contrastive"),
        (TripletLoss, triplet_loss, "triplet"),
        (MultiSimilarityLoss, multi_similarity_loss, "multi_similarity"),
    ],
)
def test_class_and_function_defaults_are_the_documented_values(cls, fn, name):
    want = DOCUMENTED_DEFAULTS[name]
    assert hyper_parameters(fn) == want
    signature = {
        name: p.default
        for name, p in inspect.signature(cls).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert signature == want
    assert cls().hyper_parameters == want
    config = cls().get_config()
    assert {k: config[k] for k in want} == want


@pytest.mark.parametrize(
    "cls, fn",
    [
        (ContrastiveLoss, contrastive_loss),
        (TripletLoss, triplet_loss),
        (MultiSimilarityLoss, multi_similarity_loss),
    ],
)
def test_class_default_computes_the_function_default(cls, fn):
    # Behaviour, not just values: the default class gives the default function's
    # per-query losses, which differ from those of other hyper-parameters.
    e = _embeddings(n=8, d=4, seed=5)
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    index = np.arange(8)
    want = np.asarray(fn(e, labels, e, labels, query_key_index=index))
    got = cls()(labels, e)
    np.testing.assert_allclose(float(got), float(np.mean(want)), rtol=1e-6)
    choices = ("mining", "pair_reduction")  # string choices: kept
    other = {k: v * 0.5 for k, v in hyper_parameters(fn).items() if k not in choices}
    moved = np.asarray(fn(e, labels, e, labels, query_key_index=index, **other))
    assert not np.allclose(moved, want)


def test_distinct_hyper_parameter_names():
    assert list(hyper_parameters(contrastive_loss)) == ["neg_margin", "pair_reduction"]
    assert list(hyper_parameters(triplet_loss)) == [
        "margin",
        "mining",
        "pair_reduction",
    ]
    assert list(hyper_parameters(multi_similarity_loss)) == [
        "alpha",
        "beta",
        "threshold",
        "epsilon",
    ]


def test_hyper_parameters_are_read_only_and_used():
    e = _embeddings(n=6)
    y = np.array([0, 0, 1, 1, 2, 2])
    loss = ContrastiveLoss(neg_margin=0.5)
    before = float(loss(y, e))
    with pytest.raises(AttributeError, match="neg_margin is read-only.*new loss"):
        loss.neg_margin = -1.0
    assert loss.neg_margin == 0.5 and float(loss(y, e)) == before
    # A new loss is the way to change it, and the value is then used.
    changed = float(ContrastiveLoss(neg_margin=-1.0)(y, e))
    want = np.mean(
        contrastive_loss(e, y, e, y, query_key_index=np.arange(6), neg_margin=-1.0)
    )
    assert changed == pytest.approx(float(want), rel=1e-6) and changed != before
    with pytest.raises(AttributeError, match="read-only"):
        loss.fn = triplet_loss
    copy = loss.hyper_parameters
    copy["neg_margin"] = 0.0
    assert loss.neg_margin == 0.5
    ms = MultiSimilarityLoss()
    assert loss.hyper_parameters == {"neg_margin": 0.5, "pair_reduction": "sum"}
    assert ms.epsilon == hyper_parameters(multi_similarity_loss)["epsilon"]


def test_unknown_hyper_parameter_is_named():
    with pytest.raises(TypeError, match=r"unknown hyper-parameter\(s\) \['gap'\]"):
        TripletLoss(gap=0.3)


@pytest.mark.parametrize(
    "make, old",
    [
        (lambda: ContrastiveLoss(margin=0.3), "margin"),
        (lambda: MultiSimilarityLoss(scale_pos=3.0), "scale_pos"),
        (lambda: MultiSimilarityLoss(thresh=0.4), "thresh"),
    ],
)
def test_names_from_before_the_rename_are_unknown(make, old):
    # The old names (margin=, scale_pos=, ...) were removed: no saved file in
    # tests/fixtures uses them, and no release shipped with them.
    with pytest.raises(TypeError, match=rf"unknown hyper-parameter\(s\) \['{old}'\]"):
        make()
    e = _embeddings(n=6)
    y = np.array([0, 0, 1, 1, 2, 2])
    with pytest.raises(TypeError, match="margin"):
        contrastive_loss(e, y, e, y, margin=0.1)


def test_configs_saved_before_pair_reduction_still_load():
    # What xbm_tf 0.1.0 wrote into .keras files: no pair_reduction, so "sum".
    config = {
        "module": "xbm_tf.losses",
        "class_name": "ContrastiveLoss",
        "config": {
            "name": "contrastive_loss",
            "reduction": "sum_over_batch_size",
            "neg_margin": 0.3,
        },
        "registered_name": "xbm_tf>ContrastiveLoss",
    }
    loss = keras.losses.deserialize(config)
    assert type(loss).__name__ == "ContrastiveLoss"
    assert loss.hyper_parameters == {"neg_margin": 0.3, "pair_reduction": "sum"}


# --- Custom losses save -----------------------------------------------------------


def test_custom_pair_loss_round_trips_through_serialization(scaled_contrastive):
    loss = PairLoss(scaled_contrastive, scale=3.0)
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(clone) is PairLoss and clone.fn is scaled_contrastive
    assert clone.hyper_parameters == {"scale": 3.0}
    e = _embeddings(n=6)
    y = np.array([0, 0, 1, 1, 2, 2])
    assert float(clone(y, e)) == pytest.approx(3 * float(ContrastiveLoss()(y, e)))


def test_unregistered_function_cannot_be_saved_and_says_why():
    def local_loss(
        query_embeddings,
        query_labels,
        key_embeddings,
        key_labels,
        key_mask=None,
        query_key_index=None,
    ):
        return contrastive_loss(
            query_embeddings, query_labels, key_embeddings, key_labels
        )

    loss = PairLoss(local_loss)
    e = _embeddings()
    assert math.isfinite(float(loss(np.arange(4), e)))  # usable, just not savable
    with pytest.raises(ValueError, match="PairLoss\\(local_loss\\) cannot be saved.*"):
        keras.losses.serialize(loss)


def test_bad_function_signature_is_named():
    with pytest.raises(TypeError, match="must have the pair-loss signature"):
        PairLoss(lambda y_true, y_pred: 0.0)
