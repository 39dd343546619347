"""Tests for xbm_tf.losses.matmul_dtype: which dtype a half memory is multiplied in."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow as tf

import xbm_tf.losses.matmul_dtype as module
from xbm_tf.losses import fused_contrastive_loss
from xbm_tf.losses.pairs import similarity_matrix

READ_CPU_FLAGS = module.cpu_flags  # before any test pretends other flags


@pytest.mark.parametrize(
    "flags, bf16, f16",
    [
        ({"avx2", "fma"}, "float32", "float32"),  # AMD EPYC: no half dot
        ({"avx512f", "avx512_bf16", "amx_bf16"}, "bfloat16", "float32"),
        ({"avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16"}, "bfloat16", "float16"),
    ],
)
def test_half_keys_are_multiplied_as_stored_only_with_a_fast_dot(
    monkeypatch, flags, bf16, f16
):
    monkeypatch.setattr(module, "cpu_flags", lambda: frozenset(flags))
    assert module.matmul_dtype("bfloat16").name == bf16
    assert module.matmul_dtype(tf.float16).name == f16
    assert module.matmul_dtype("float32") == tf.float32


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="no /proc/cpuinfo")
def test_cpu_flags_reads_this_cpu():
    with open("/proc/cpuinfo") as f:
        line = next(ln for ln in f if ln.startswith("flags"))
    assert READ_CPU_FLAGS() == frozenset(line.split(":", 1)[1].split())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_without_a_fast_dot_half_keys_give_the_float32_results(monkeypatch, dtype):
    # Cast to float32, the stored half values are multiplied exactly as float32
    # keys holding the same values: the same kernel on the same numbers.
    monkeypatch.setattr(module, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    rng = np.random.default_rng(0)
    q = rng.normal(size=(6, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    k_half = tf.cast(tf.math.l2_normalize(rng.normal(size=(40, 16)), 1), dtype)
    k_plain = tf.cast(k_half, tf.float32)
    ql, kl = np.arange(6) % 3, np.arange(40) % 3
    queries = tf.constant(q)
    results = {}
    for name, keys in (("half", k_half), ("float32", k_plain)):
        with tf.GradientTape() as tape:
            tape.watch(queries)
            sim = similarity_matrix(queries, keys)
            loss = fused_contrastive_loss(queries, ql, keys, kl, neg_margin=0.1)
            total = tf.reduce_sum(sim) + tf.reduce_sum(loss)
        results[name] = [sim.numpy(), loss.numpy(), tape.gradient(total, queries)]
    for got, want in zip(results["half"], results["float32"]):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
