"""The dtype the losses multiply a half-precision memory in, on this machine.

A bfloat16 or float16 memory halves the bytes of the keys. Whether multiplying
them as stored is also faster depends on the kernel TensorFlow has for that
dtype here:

- a GPU (cuBLAS), or a CPU with a bfloat16 dot (`avx512_bf16` or `amx_bf16`;
  float16: `avx512_fp16` or `amx_fp16`): oneDNN multiplies the half values at
  up to twice its float32 rate, so the keys are multiplied as stored;
- any other CPU (AVX2 only, AVX-512 without BF16, ARM): TensorFlow falls back to
  Eigen's half-precision matmul, 2-3x slower than float32, so the keys are cast
  to float32 first (one `M x D` copy per step) and multiplied by oneDNN.

`docs/performance.md` gives the measurements (`benchmarks/half_matmul_paths.py`).
"""

from __future__ import annotations

import functools

import tensorflow as tf

__all__: list[str] = []

# CPU flags (as in /proc/cpuinfo) of a fast dot for each half dtype.
_FAST_DOT_FLAGS = {
    "bfloat16": frozenset({"avx512_bf16", "amx_bf16"}),
    "float16": frozenset({"avx512_fp16", "amx_fp16"}),
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def matmul_dtype(dtype) -> tf.DType:
    """The dtype to multiply keys stored in `dtype` in: `dtype` itself when it
    is float32, or a half dtype this machine multiplies fast; float32 else."""
    dtype = tf.as_dtype(dtype)
    fast = _FAST_DOT_FLAGS.get(dtype.name)
    if fast is None:
        return dtype
    if tf.config.list_logical_devices("GPU") or cpu_flags() & fast:
        return dtype
    return tf.float32
