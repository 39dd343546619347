"""The ways to multiply a half-precision memory, against the float32 matmul pair.

Run:
    python benchmarks/half_matmul_paths.py
    # as an AVX2-only CPU would run it, on an AVX-512 machine (see below):
    ONEDNN_MAX_CPU_ISA=AVX2 XLA_FLAGS=--xla_cpu_max_isa=AVX2 \
        python benchmarks/half_matmul_paths.py
    TF_ENABLE_ONEDNN_OPTS=0 XLA_FLAGS=--xla_cpu_max_isa=AVX2 \
        python benchmarks/half_matmul_paths.py --native

Times the fused contrastive loss's two matmuls (`q @ k.T`, then its gradient
matrix `@ k`; B x M x D = 64 x 65,536 x 512 by default) for keys stored in
bfloat16, each way the losses could run them, interleaved `--repeats` times,
and prints medians [min-max] with the ratio to the float32 pair on oneDNN:
- `float32`: float32 keys, TensorFlow's kernels (the floor);
- `cast`: bfloat16 keys cast to float32, then the float32 kernels (what the
  losses do on a CPU without a fast bfloat16 dot, `xbm_tf.losses.matmul_dtype`);
- `xla`: bfloat16 keys inside one `jit_compile=True` function (XLA's CPU backend
  widens them to float32);
- `native` (with `--native`): bfloat16 keys multiplied as stored by
  TensorFlow's kernel (what the losses do on a CPU with AVX-512 BF16 or AMX).

On an AVX-512 machine, `ONEDNN_MAX_CPU_ISA=AVX2` keeps oneDNN to AVX2 and
`--xla_cpu_max_isa=AVX2` does the same for XLA: the float32, cast and XLA paths
then run the instructions of an AVX2-only CPU. oneDNN so limited fails on a
bfloat16 matmul, which TensorFlow would not send it on a real AVX2 CPU (it uses
Eigen's kernel there), so `native` is timed with oneDNN off
(`TF_ENABLE_ONEDNN_OPTS=0`), where every matmul is Eigen's.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from eval_speed import _cpu_name  # noqa: E402  (this folder)

from xbm_tf.losses.matmul_dtype import cpu_flags  # noqa: E402


def _pair(q, k):
    return tf.matmul(tf.matmul(q, k, transpose_b=True), k)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--memory", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--native", action="store_true", help="also the bfloat16 matmul as stored"
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    q = tf.constant(rng.standard_normal((args.batch, args.dim)), tf.float32)
    k = tf.constant(rng.standard_normal((args.memory, args.dim)), tf.float32)
    k_half = tf.cast(k, tf.bfloat16)
    paths = {
        "float32": (tf.function(_pair), q, k),
        "cast": (tf.function(lambda q, k: _pair(q, tf.cast(k, tf.float32))), q, k_half),
        "xla": (tf.function(_pair, jit_compile=True), tf.cast(q, tf.bfloat16), k_half),
    }
    if args.native:
        paths["native"] = (tf.function(_pair), tf.cast(q, tf.bfloat16), k_half)
    times = {name: [] for name in paths}
    for fn, a, b in paths.values():
        fn(a, b).numpy()  # trace and compile
    for _ in range(args.repeats):
        for name, (fn, a, b) in paths.items():
            start = time.perf_counter()
            fn(a, b).numpy()
            times[name].append(time.perf_counter() - start)
    env = {
        key: os.environ[key]
        for key in ("ONEDNN_MAX_CPU_ISA", "TF_ENABLE_ONEDNN_OPTS", "XLA_FLAGS")
        if key in os.environ
    }
    fast = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"}) or ["no bfloat16 dot"]
    print(f"machine: {_cpu_name()}, {', '.join(fast)}")
    print(f"B x M x D = {args.batch} x {args.memory} x {args.dim}; env {env or '-'}")
    print(f"load average: {tuple(round(v, 2) for v in os.getloadavg())}")
    floor = np.median(times["float32"])
    for name, values in times.items():
        ms = np.array(values) * 1e3
        print(
            f"{name:8s} {np.median(ms):7.1f} ms [{ms.min():.1f}-{ms.max():.1f}]"
            f"  {np.median(values) / floor:5.2f}x float32"
        )


if __name__ == "__main__":
    main()
