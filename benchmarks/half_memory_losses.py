"""Triplet and multi-similarity losses against a half-precision memory.

Command (from the repository root):
    python benchmarks/half_memory_losses.py            # B=64, M=65,536, D=512
    python benchmarks/half_memory_losses.py --semihard  # adds semi-hard triplet

The generic losses' `similarity_matrix` multiplies a bfloat16 (or float16)
memory as stored, the queries cast to its dtype. Before, it cast the whole
memory to float32 on every call. This times, without XLA, the loss of B
queries against the memory plus its query gradient both ways, interleaved
(the "cast" variant casts the keys to float32 inside the step, as the old
path did), and reports how far the as-stored values and gradients are from
the float32 computation on the same stored keys.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from xbm_tf.losses import multi_similarity_loss, triplet_loss  # noqa: E402


def clustered(rng, rows, dim, labels, centers, noise=1.2):
    x = centers[labels] + noise * rng.standard_normal((rows, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def step(loss, cast):
    @tf.function(jit_compile=False)
    def run(queries, query_labels, keys, key_labels):
        with tf.GradientTape() as tape:
            tape.watch(queries)
            if cast:
                keys = tf.cast(keys, tf.float32)
            losses = loss(queries, query_labels, keys, key_labels)
            total = tf.reduce_sum(losses)
        return losses, tape.gradient(total, queries)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--memory_size", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--semihard", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    classes = 2000
    centers = rng.standard_normal((classes, args.dim), dtype=np.float32)
    key_labels = rng.integers(0, classes, args.memory_size)
    query_labels = np.repeat(rng.integers(0, classes, args.batch_size // 4), 4)
    keys = clustered(rng, args.memory_size, args.dim, key_labels, centers)
    queries = tf.constant(
        clustered(rng, len(query_labels), args.dim, query_labels, centers)
    )
    stored = tf.cast(keys, args.dtype)
    losses = {
        "multi-similarity": multi_similarity_loss,
        "triplet hard": lambda *a: triplet_loss(*a, mining="hard"),
    }
    if args.semihard:
        losses["triplet semihard"] = triplet_loss
    print(f"load average before: {tuple(round(v, 2) for v in os.getloadavg())}")
    print(
        f"B={len(query_labels)}, M={args.memory_size}, D={args.dim}, "
        f"memory {args.dtype}, no XLA, medians of {args.repeats} interleaved rounds"
    )
    print()
    print(
        "| loss | cast to float32 ms | as stored ms | stored / cast "
        "| loss error / max loss | gradient error / its norm |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, loss in losses.items():
        functions = {"cast": step(loss, True), "stored": step(loss, False)}
        outputs = {
            k: [t.numpy() for t in f(queries, query_labels, stored, key_labels)]
            for k, f in functions.items()
        }
        times = {k: [] for k in functions}
        for round_index in range(args.repeats):
            order = list(functions) if round_index % 2 == 0 else list(functions)[::-1]
            for k in order:
                start = time.perf_counter()
                [
                    np.asarray(t)
                    for t in functions[k](queries, query_labels, stored, key_labels)
                ]
                times[k].append(time.perf_counter() - start)
        (want_l, want_g), (got_l, got_g) = outputs["cast"], outputs["stored"]
        loss_error = np.abs(got_l - want_l).max() / max(np.abs(want_l).max(), 1e-12)
        grad_error = np.linalg.norm(got_g - want_g) / max(np.linalg.norm(want_g), 1e-12)
        ratio = np.median(np.divide(times["stored"], times["cast"]))
        print(
            f"| {name} | {1e3 * np.median(times['cast']):.1f} "
            f"| {1e3 * np.median(times['stored']):.1f} | {ratio:.2f} "
            f"| {loss_error:.1e} | {grad_error:.1e} |"
        )
    print()
    print(f"load average after: {tuple(round(v, 2) for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
