"""The loss API: exact label comparison, hyper-parameters, saving custom losses."""

from __future__ import annotations

import inspect
import math
import warnings

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
def test_wrapper_keeps_large_labels_apart(dtype, first):
    e = _embeddings(seed=3)
    labels = np.arange(first, first + 4, dtype=np.int64)  # four classes
    want = np.mean(contrastive_loss(e, labels, e, labels, query_key_index=np.arange(4)))
    merged = np.mean(  # what labels rounded to one float would give
        contrastive_loss(e, labels * 0, e, labels * 0, query_key_index=np.arange(4))
    )
    assert abs(want - merged) > 0.05  # the two cases differ
    got = float(ContrastiveLoss(dtype=dtype)(labels, e))
    assert got == pytest.approx(float(want), abs=2e-3 if dtype == "float16" else 1e-6)


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


@pytest.mark.parametrize(
    "cls, fn",
    [
        (ContrastiveLoss, contrastive_loss),
        (TripletLoss, triplet_loss),
        (MultiSimilarityLoss, multi_similarity_loss),
    ],
)
def test_class_defaults_are_the_functions_defaults(cls, fn):
    defaults = hyper_parameters(fn)
    signature = {
        name: p.default
        for name, p in inspect.signature(cls).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert signature == defaults
    assert cls().hyper_parameters == defaults
    config = cls().get_config()
    assert {k: config[k] for k in defaults} == defaults


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
    # The deprecated names are read-only too, and name the new one.
    with pytest.raises(AttributeError, match="margin is the deprecated name of neg"):
        loss.margin = -1.0
    ms = MultiSimilarityLoss()
    with pytest.raises(AttributeError, match="margin is the deprecated name of eps"):
        ms.margin = -1.0
    assert loss.hyper_parameters == {"neg_margin": 0.5, "pair_reduction": "sum"}
    assert ms.epsilon == hyper_parameters(multi_similarity_loss)["epsilon"]


def test_unknown_hyper_parameter_is_named():
    with pytest.raises(TypeError, match=r"unknown hyper-parameter\(s\) \['gap'\]"):
        TripletLoss(gap=0.3)


@pytest.mark.parametrize(
    "old, new",
    [
        (
            lambda: ContrastiveLoss(margin=0.3),
            lambda: ContrastiveLoss(neg_margin=0.3),
        ),
        (
            lambda: MultiSimilarityLoss(
                scale_pos=3.0, scale_neg=30.0, thresh=0.4, margin=0.2
            ),
            lambda: MultiSimilarityLoss(
                alpha=3.0, beta=30.0, threshold=0.4, epsilon=0.2
            ),
        ),
    ],
)
def test_old_names_still_work_with_a_deprecation_warning(old, new):
    with pytest.warns(DeprecationWarning, match="is deprecated, use"):
        old_loss = old()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new_loss = new()
    assert old_loss.hyper_parameters == new_loss.hyper_parameters
    assert old_loss.hyper_parameters != type(new_loss)().hyper_parameters


def test_old_names_in_functions_and_conflicts():
    e = _embeddings(n=6)
    y = np.array([0, 0, 1, 1, 2, 2])
    with pytest.warns(DeprecationWarning, match="margin= is deprecated"):
        old = contrastive_loss(e, y, e, y, margin=0.1)
    np.testing.assert_allclose(old, contrastive_loss(e, y, e, y, neg_margin=0.1))
    with pytest.raises(TypeError, match="pass neg_margin= only"):
        ContrastiveLoss(neg_margin=0.3, margin=0.2)


def test_configs_saved_with_the_old_names_still_load():
    # What xbm_tf 0.1.0 wrote into .keras files.
    old_configs = [
        (
            "ContrastiveLoss",
            {"name": "contrastive_loss", "reduction": "sum_over_batch_size"},
            {"margin": 0.3},
            {"neg_margin": 0.3, "pair_reduction": "sum"},  # saved before the mean
        ),
        (
            "MultiSimilarityLoss",
            {"name": "multi_similarity_loss", "reduction": "sum_over_batch_size"},
            {"scale_pos": 2.0, "scale_neg": 30.0, "thresh": 0.5, "margin": 0.1},
            {"alpha": 2.0, "beta": 30.0, "threshold": 0.5, "epsilon": 0.1},
        ),
    ]
    for class_name, base, old, new in old_configs:
        config = {
            "module": "xbm_tf.losses",
            "class_name": class_name,
            "config": {**base, **old},
            "registered_name": f"xbm_tf>{class_name}",
        }
        with pytest.warns(DeprecationWarning):
            loss = keras.losses.deserialize(config)
        assert type(loss).__name__ == class_name
        assert loss.hyper_parameters == new


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
