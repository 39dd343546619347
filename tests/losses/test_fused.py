"""fused_contrastive_loss: the values and query gradients of contrastive_loss."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import xbm_tf.losses.matmul_dtype as matmul_dtype_module
from xbm_tf import CrossBatchMemory, XBMContrastiveModel, build_embedding_model
from xbm_tf.losses import (
    ContrastiveLoss,
    TripletLoss,
    contrastive_loss,
    fused_contrastive_loss,
    triplet_loss,
)
from xbm_tf.losses.fused import memory_pair_loss
from xbm_tf.losses.pairs import similarity_matrix

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
def test_equals_contrastive_loss_values_and_gradients(
    seed, jit, reduction, float32_gap
):
    q, ql, k, kl, mask, own = _problem(seed)
    weights = np.linspace(0.5, 2.0, len(q)).astype(np.float32)  # upstream grads
    args = (q, ql, k, kl, mask, own, weights)
    want_l, want_g = _loss_and_grad(contrastive_loss, *args, reduction=reduction)
    got_l, got_g = _loss_and_grad(
        fused_contrastive_loss, *args, jit=jit, reduction=reduction
    )
    assert np.all(want_l > 0)
    # Two kernels (and XLA or not) add the same terms in other orders. A loss is
    # a sum of non-negative terms (1 - s, or s > margin) over 40 keys, each an
    # 8-wide similarity: 49 roundings with the weight, two more with the mean
    # (the count's reciprocal and its product), relative to the loss itself
    # (conftest's float32_gap).
    np.testing.assert_allclose(got_l, want_l, rtol=float32_gap(51), atol=0)
    # A gradient row is w_i sum_j c_ij k_j (c = dL/ds in {-1, 0, 1}): 41
    # roundings, relative to w_i sum_j |c_ij k_j|, as the terms cancel.
    _, coef = _dense_coefficients(q, ql, k, kl, mask, own, 0.3, reduction)
    scale = weights[:, None] * (np.abs(coef) @ np.abs(k))
    assert np.all(np.abs(got_g - want_g) <= float32_gap(41) * scale)


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
    # Other losses run exactly their own function on the keys as stored.
    triplet = TripletLoss(margin=0.2, mining="semihard", pair_reduction=reduction)
    got = memory_pair_loss(triplet, q, ql, k_half, kl, mask, own)
    want = triplet_loss(
        q, ql, k_half, kl, mask, own, margin=0.2, pair_reduction=reduction
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
    want = triplet_loss(q, ql, tensor, kl, mask, own, margin=0.2, mining="hard")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_keys_are_multiplied_as_stored(dtype, monkeypatch):
    # The generic losses' similarity_matrix multiplies a half-precision memory
    # in its dtype (queries cast to it) instead of copying it to float32, on a
    # machine with a fast half dot (here pretended, so any CPU runs this).
    flags = {"avx512_bf16", "amx_bf16", "avx512_fp16"}
    monkeypatch.setattr(matmul_dtype_module, "cpu_flags", lambda: frozenset(flags))
    q, _, k, _, _, _ = _problem(7, b=12, m=300, d=64)
    k_half = tf.cast(k, dtype)
    plain = tf.cast(k_half, "float32").numpy()  # the stored values, exactly
    weights = np.random.default_rng(0).normal(size=(len(q), len(k)))
    weights = weights.astype(np.float32)
    queries = tf.constant(q)
    results = {}
    for name, keys in (("half", k_half), ("float32", plain)):
        with tf.GradientTape() as tape:
            tape.watch(queries)
            sim = similarity_matrix(queries, keys)
            total = tf.reduce_sum(sim * weights)
        results[name] = (sim.numpy(), tape.gradient(total, queries).numpy())
    assert results["half"][0].dtype == np.float32
    sim_error = np.abs(results["half"][0] - results["float32"][0])
    grad_error = np.abs(results["half"][1] - results["float32"][1])
    # Unit vectors: the queries rounded to the keys' dtype move each s by at
    # most 2^-9 (bfloat16; float16: 2^-11), and s is rounded once more (2^-9
    # of |s| <= 1): |ds| <= 2^-8.
    assert sim_error.max() <= BF16_EPS and sim_error.max() > 0
    # The gradient W @ k is summed in the keys' dtype from W rounded (2^-9
    # relative per term) and rounded once (2^-9 of the result).
    bound = BF16_EPS * (np.abs(weights) @ np.abs(plain))
    assert np.all(grad_error <= bound) and grad_error.max() > 0


def _buffer(tensor):
    """The address of a tensor's data (the same address: the same buffer)."""
    return np.from_dlpack(tensor).__array_interface__["data"][0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_after_an_enqueue_dense_reads_of_the_memory_share_its_buffer(dtype):
    # The loss's matmuls read the memory densely outside XLA. A scatter outside
    # XLA would switch the variable to TensorFlow's copy-on-read mode, in which
    # every dense read copies all M x D values; the enqueue writes inside XLA.
    backbone = build_embedding_model("tiny", 8, input_shape=(8, 8, 1))
    model = XBMContrastiveModel(
        backbone, memory_size=32, xbm_start_step=0, memory_dtype=dtype
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
    images = tf.random.uniform((8, 8, 8, 1))
    labels = tf.constant([0, 0, 1, 1, 2, 2, 3, 3])
    step = tf.function(model.train_step, jit_compile=False)
    for _ in range(2):
        step((images, labels))
    model.memory.enqueue(tf.ones((8, 8)), labels)  # eagerly, too
    variable = model.memory.embeddings  # uint16 bits for bfloat16
    assert int(model.memory.count.numpy()) == 24
    first, second = (tf.convert_to_tensor(variable) for _ in range(2))
    assert _buffer(first) == _buffer(second)

    # The check can fail: after a scatter outside XLA the reads are copies.
    tf.raw_ops.ResourceScatterUpdate(
        resource=variable.handle, indices=[0], updates=first[:1]
    )
    first, second = (tf.convert_to_tensor(variable) for _ in range(2))
    assert _buffer(first) != _buffer(second)
