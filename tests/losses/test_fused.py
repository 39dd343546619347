"""fused_contrastive_loss: the values and query gradients of contrastive_loss."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from xbm_tf import CrossBatchMemory, XBMContrastiveModel, build_embedding_model
from xbm_tf.losses import (
    ContrastiveLoss,
    TripletLoss,
    contrastive_loss,
    fused_contrastive_loss,
    triplet_loss,
)
from xbm_tf.losses.fused import memory_pair_loss

BF16_EPS = 2.0**-8  # bfloat16 keeps 8 significant bits: rounding error <= 2^-9


def _unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _problem(seed, b=10, m=40, d=8, classes=3):
    """Random unit queries and keys; labels include 0; some keys masked; some
    queries have their own copy among the keys (-1: none)."""
    rng = np.random.default_rng(seed)
    q = _unit(rng.normal(size=(b, d)))
    k = _unit(rng.normal(size=(m, d)))
    own = rng.permutation(m)[:b].astype(np.int32)
    k[own] = q  # a query's own copy: similarity 1
    own[::3] = -1
    ql = rng.integers(0, classes, b).astype(np.int32)
    kl = rng.integers(0, classes, m).astype(np.int32)
    mask = rng.random(m) > 0.25
    return q, ql, k, kl, mask, own


def _loss_and_grad(
    fn, q, ql, k, kl, mask, own, weights, margin=0.3, jit=False, reduction="sum"
):
    def run(q):
        with tf.GradientTape() as tape:
            tape.watch(q)
            losses = fn(
                q,
                ql,
                k,
                kl,
                key_mask=mask,
                query_key_index=own,
                neg_margin=margin,
                pair_reduction=reduction,
            )
            total = tf.reduce_sum(losses * weights)
        return losses, tape.gradient(total, q)

    if jit:
        run = tf.function(run, jit_compile=True)
    losses, grad = run(tf.constant(q))
    return np.asarray(losses), np.asarray(grad)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_equals_contrastive_loss_values_and_gradients(seed, jit, reduction):
    q, ql, k, kl, mask, own = _problem(seed)
    weights = np.linspace(0.5, 2.0, len(q)).astype(np.float32)  # upstream grads
    args = (q, ql, k, kl, mask, own, weights)
    want_l, want_g = _loss_and_grad(contrastive_loss, *args, reduction=reduction)
    got_l, got_g = _loss_and_grad(
        fused_contrastive_loss, *args, jit=jit, reduction=reduction
    )
    assert np.all(want_l > 0)
    np.testing.assert_allclose(got_l, want_l, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-6)


def test_hand_derived_gradient_of_a_tiny_case():
    # One query e_x; keys: its own copy (excluded), a positive, a hard negative
    # (s = 0.8 > margin), an easy negative (s = 0.1), a masked positive.
    q = np.array([[1.0, 0.0]], np.float32)
    k = _unit([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [0.1, 0.99498744], [0.0, 1.0]])
    kl = np.array([7, 7, 0, 0, 7])
    losses, grad = _loss_and_grad(
        fused_contrastive_loss,
        q,
        np.array([7]),
        k,
        kl,
        np.array([True, True, True, True, False]),
        np.array([0]),
        np.array([3.0], np.float32),
        margin=0.5,
    )
    # L = (1 - q.k1) + q.k2 = (1 - 0.6) + 0.8; dL/dq = -k1 + k2.
    np.testing.assert_allclose(losses, [1.2], rtol=1e-6)
    np.testing.assert_allclose(grad, 3.0 * (k[2:3] - k[1:2]), rtol=1e-6, atol=1e-7)


def test_hand_derived_gradient_of_a_tiny_case_with_the_mean():
    # One query e_x; keys: two positives (s = 0.6, 0.0), two hard negatives
    # (s = 0.8, 0.6), an easy negative (s = 0.1), a masked hard negative.
    q = np.array([[1.0, 0.0]], np.float32)
    k = _unit([[0.6, 0.8], [0.0, 1.0], [0.8, 0.6], [0.6, -0.8], [0.1, 0.99498744]])
    k = np.concatenate([k, k[2:3]])
    kl = np.array([7, 7, 0, 1, 0, 0])
    mask = np.array([True, True, True, True, True, False])
    for fn in (contrastive_loss, fused_contrastive_loss):
        losses, grad = _loss_and_grad(
            fn, q, np.array([7]), k, kl, mask, np.array([-1]),
            np.array([3.0], np.float32), margin=0.5, reduction="mean",
        )  # fmt: skip
        # L = ((1 - 0.6) + (1 - 0)) / 2 + (0.8 + 0.6) / 2 = 1.4;
        # dL/dq = -(k0 + k1) / 2 + (k2 + k3) / 2.
        np.testing.assert_allclose(losses, [1.4], rtol=1e-6)
        want = 3.0 * ((k[2] + k[3]) - (k[0] + k[1])) / 2
        np.testing.assert_allclose(grad, want[None], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_keys_match_float32_within_rounding(dtype, reduction):
    q, ql, k, kl, mask, own = _problem(3, b=16, m=200, d=16)
    margin = 0.3
    weights = np.ones(len(q), np.float32)
    # Keep every similarity away from the margin, so that rounding flips no
    # hard-negative decision and the comparison is about rounding alone.
    sim = q @ k.T
    near = np.abs(sim - margin) < 0.02
    mask = mask & ~near.any(axis=0)
    want_l, want_g = _loss_and_grad(
        contrastive_loss, q, ql, k, kl, mask, own, weights, margin, reduction=reduction
    )
    k_half = tf.cast(k, dtype)
    got_l, got_g = _loss_and_grad(
        fused_contrastive_loss,
        q,
        ql,
        k_half,
        kl,
        mask,
        own,
        weights,
        margin,
        reduction=reduction,
    )
    # Every term of the sums carries q and k rounded (each <= 2^-9 relative, so
    # |ds| <= 2 * 2^-9 for unit vectors) and s rounded once more (2^-9):
    # |dL_i| <= 3 * 2^-9 * (terms of query i) < 2^-7 * terms, each term
    # weighted by its |c_ij| (1, or 1 / count with the mean).
    plain = tf.cast(k_half, "float32").numpy()
    _, coef = _dense_coefficients(q, ql, plain, kl, mask, own, margin, reduction)
    terms = np.abs(coef).sum(axis=1)
    assert np.all(np.abs(got_l - want_l) <= 2.0**-7 * terms + 1e-6)
    # Gradient: sum_j c_ij k_j with k_j rounded (2^-9 relative per component)
    # and the result rounded once (2^-9): bounded by 2^-8 * sum_j |c_ij k_jd|.
    bound = BF16_EPS * (np.abs(coef) @ np.abs(k)) + BF16_EPS * np.abs(want_g)
    assert np.all(np.abs(got_g - want_g) <= bound + 1e-6)
    assert np.abs(got_g - want_g).max() > 0  # the rounding is really there


def _dense_coefficients(q, ql, k, kl, mask, own, margin, reduction="sum"):
    """dL/ds by a plain loop: -1 positive, +1 hard negative, 0 elsewhere; with
    the mean, each divided by the query's count of its kind."""
    sim = q @ k.T
    coef = np.zeros_like(sim)
    for i in range(len(q)):
        for j in range(len(k)):
            if not mask[j] or j == own[i]:
                continue
            if ql[i] == kl[j]:
                coef[i, j] = -1.0
            elif sim[i, j] > margin:
                coef[i, j] = 1.0
        if reduction == "mean":
            for sign in (-1.0, 1.0):
                kind = coef[i] == sign
                coef[i, kind] /= max(kind.sum(), 1)
    return sim, coef


def test_keys_are_constants_and_bad_dtype_is_named():
    q, ql, k, kl, mask, own = _problem(4)
    keys = tf.Variable(k)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(fused_contrastive_loss(q, ql, keys, kl, mask, own))
    assert tape.gradient(total, keys) is None
    with pytest.raises(ValueError, match="key_embeddings must be one of"):
        fused_contrastive_loss(q, ql, tf.cast(k, "float64"), kl)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_memory_pair_loss_routes_contrastive_to_the_fused_loss(reduction):
    q, ql, k, kl, mask, own = _problem(5)
    k_half = tf.cast(k, "bfloat16")
    loss = ContrastiveLoss(neg_margin=0.2, pair_reduction=reduction)
    got = memory_pair_loss(loss, q, ql, k_half, kl, mask, own)
    want = fused_contrastive_loss(
        q, ql, k_half, kl, mask, own, neg_margin=0.2, pair_reduction=reduction
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Other losses read the memory cast to float32: exactly their own function.
    triplet = TripletLoss(margin=0.2, mining="semihard", pair_reduction=reduction)
    got = memory_pair_loss(triplet, q, ql, k_half, kl, mask, own)
    plain = tf.cast(k_half, "float32")
    want = triplet_loss(
        q, ql, plain, kl, mask, own, margin=0.2, pair_reduction=reduction
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _written_keys(source, k, dtype):
    """`(keys to pass, the same keys as a tensor)`, written by a scatter."""
    if source == "memory":  # uint16 bit patterns for bfloat16
        memory = CrossBatchMemory(len(k), k.shape[1], memory_dtype=dtype)
        memory.enqueue(k, np.zeros(len(k), np.int64))
        return memory.keys(), tf.cast(k, dtype)
    variable = tf.Variable(tf.zeros(k.shape, dtype), trainable=False)
    tf.raw_ops.ResourceScatterUpdate(
        resource=variable.handle,
        indices=tf.range(len(k)),
        updates=tf.cast(k, dtype),
    )
    return variable, tf.constant(variable.numpy())


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("source", ["variable", "memory"])
def test_a_variable_as_keys_equals_its_tensor(mode, dtype, source):
    # The model passes the memory's variable (`CrossBatchMemory.keys()`, read in
    # place inside XLA); after a scatter has written it, as the enqueue does,
    # values and gradients must equal those of the same keys given as a tensor.
    q, ql, k, kl, mask, own = _problem(3)
    keys_in_place, tensor = _written_keys(source, k, dtype)
    weights = np.linspace(0.5, 2.0, len(q)).astype(np.float32)

    def run(keys):
        def step(q):
            with tf.GradientTape() as tape:
                tape.watch(q)
                losses = fused_contrastive_loss(q, ql, keys, kl, mask, own, 0.3)
                total = tf.reduce_sum(losses * weights)
            return losses, tape.gradient(total, q)

        if mode != "eager":
            step = tf.function(step, jit_compile=mode == "xla")
        return [np.asarray(t) for t in step(tf.constant(q))]

    want = run(tensor)
    got = run(keys_in_place)
    assert np.abs(want[1]).max() > 0.1  # a real gradient
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_other_losses_read_the_memory_keys_densely():
    q, ql, k, kl, mask, own = _problem(6)
    keys_in_place, tensor = _written_keys("memory", k, "bfloat16")
    triplet = TripletLoss(margin=0.2, mining="hard")
    got = memory_pair_loss(triplet, q, ql, keys_in_place, kl, mask, own)
    plain = tf.cast(tensor, "float32")
    want = triplet_loss(q, ql, plain, kl, mask, own, margin=0.2, mining="hard")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _memory_reads(graph, handle_names):
    """The ops of `graph` (not of the functions it calls, such as the fused
    loss's XLA functions) that read a placeholder in `handle_names` densely."""
    found = []
    for op in graph.get_operations():
        if op.type == "ReadVariableOp" and op.inputs[0].name in handle_names:
            found.append(op.name)
    return found


def test_the_model_without_xla_never_reads_the_whole_memory_outside_xla():
    # Without XLA a dense read of a scattered variable copies all of it on every
    # step (TensorFlow's copy-on-read mode): the train step must hand the
    # variable to the fused loss, which reads it inside XLA.
    backbone = build_embedding_model("tiny", 8, input_shape=(8, 8, 1))
    model = XBMContrastiveModel(backbone, memory_size=32, xbm_start_step=0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
    images = tf.random.uniform((8, 8, 8, 1))
    labels = tf.constant([0, 0, 1, 1, 2, 2, 3, 3])
    step = tf.function(model.train_step, jit_compile=False)
    concrete = step.get_concrete_function((images, labels))
    embeddings = model.memory.embeddings.value
    handles = {
        placeholder.name
        for tensor, placeholder in concrete.graph.captures
        if tensor is embeddings.handle
    }
    assert handles, "the memory's handle is not captured by the train step"
    assert _memory_reads(concrete.graph, handles) == []

    # The check can fail: a step that reads the memory densely is caught.
    def reading_step(data):
        out = model.train_step(data)
        out["peek"] = model.memory.read()[0][0, 0]
        return out

    concrete = tf.function(reading_step).get_concrete_function((images, labels))
    handles = {
        placeholder.name
        for tensor, placeholder in concrete.graph.captures
        if tensor is embeddings.handle
    }
    assert _memory_reads(concrete.graph, handles)
