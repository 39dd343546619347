"""The whole train step with and without XLA, interleaved in one run.

Commands (from the repository root, after `pip install -e .`):
    python benchmarks/compile_mode.py                       # quickstart + ResNet-50
    python benchmarks/compile_mode.py --models=quickstart   # seconds

Each model is an `XBMContrastiveModel` with its memory in use (`xbm_start_step=0`),
contrastive loss, Adam; its `train_step` is compiled twice, as `fit` compiles it:
`tf.function(train_step, jit_compile=True)` (XLA) and `jit_compile=False` (the
TensorFlow graph executor, with oneDNN kernels on x86 CPUs). Both copies start from
the same weights and memory. After untimed calls (compilation included) the timed
calls alternate, round after round, in swapped order every other round; the table
reports median milliseconds per step with [min-max], and the median per-round
ratio XLA / no XLA.

- quickstart: the quickstart's model (configs/quickstart.flags): the tiny CNN on
  28x28x1 images, 64-d embeddings, P x K = 8 x 8 = 64, memory 4,096 rows.
- resnet50: ResNet-50 (weights=None) at 224x224x3, 512-d embeddings, max pooling,
  a batch of --resnet_batch, memory --resnet_memory rows.

The XLA compile time (the first call) is reported too: a run pays it once.
"""

from __future__ import annotations

import os
import platform
import re
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from xbm_tf import XBMContrastiveModel, build_embedding_model  # noqa: E402

_MODELS = flags.DEFINE_list(
    "models", ["quickstart", "resnet50"], "Which models: quickstart, resnet50."
)
_RESNET_BATCH = flags.DEFINE_integer("resnet_batch", 8, "ResNet-50 batch size.")
_RESNET_MEMORY = flags.DEFINE_integer(
    "resnet_memory", 16384, "ResNet-50 memory rows (512-d)."
)
_MEMORY_DTYPE = flags.DEFINE_enum(
    "memory_dtype", "float32", ["float32", "bfloat16", "float16"], "Memory dtype."
)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after the compiling one.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed rounds (quickstart).")
_RESNET_REPEATS = flags.DEFINE_integer("resnet_repeats", 3, "Timed rounds (ResNet).")

SETTINGS = {
    # name: backbone, input shape, embedding dim, batch, memory rows
    "quickstart": ("tiny", (28, 28, 1), 64, lambda: 64, lambda: 4096),
    "resnet50": (
        "resnet50",
        (224, 224, 3),
        512,
        lambda: _RESNET_BATCH.value,
        lambda: _RESNET_MEMORY.value,
    ),
}


def _block(outputs):
    for value in tf.nest.flatten(outputs):
        np.asarray(value)


def _step(name: str, jit: bool):
    """A compiled train step of `name` and its first-call (compile) seconds."""
    backbone, shape, dim, batch, memory = SETTINGS[name]
    keras.utils.set_random_seed(0)
    embedder = build_embedding_model(backbone, dim, input_shape=shape, weights=None)
    model = XBMContrastiveModel(
        embedder,
        memory_size=memory(),
        xbm_start_step=0,
        memory_dtype=_MEMORY_DTYPE.value,
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-4))
    model.optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, size=(batch(), *shape)).astype(np.float32))
    labels = tf.constant(np.arange(batch(), dtype=np.int32) // 4)
    step = tf.function(model.train_step, jit_compile=jit)
    start = time.perf_counter()
    _block(step((images, labels)))
    compile_s = time.perf_counter() - start
    return (lambda: step((images, labels))), compile_s


def _measure(name: str, repeats: int) -> dict:
    steps, compile_s = {}, {}
    for mode, jit in (("xla", True), ("no_xla", False)):
        print(f"compiling {name} ({mode}) ...", file=sys.stderr, flush=True)
        steps[mode], compile_s[mode] = _step(name, jit)
        for _ in range(_WARMUP.value):
            _block(steps[mode]())
    times = {mode: [] for mode in steps}
    order = list(steps)
    for round_index in range(repeats):
        for mode in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            _block(steps[mode]())
            times[mode].append(time.perf_counter() - start)
    ratios = np.divide(times["xla"], times["no_xla"])
    return {
        "times": times,
        "compile_s": compile_s,
        "ratio": float(np.median(ratios)),
        "ratio_range": (float(ratios.min()), float(ratios.max())),
    }


def _ms(values) -> str:
    values = 1e3 * np.asarray(values)
    return f"{np.median(values):.1f} [{values.min():.1f}-{values.max():.1f}]"


def _cpu() -> str:
    """The CPU's model name and its bfloat16 flags (AVX-512 BF16, AMX), from
    /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            text = cpuinfo.read()
    except OSError:
        return platform.processor() or "unknown"
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
    found = set(flags.group(1).split()) if flags else set()
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in found] or ["no bf16 dot"]
    return f"{name.group(1).strip() if name else 'unknown'}, {', '.join(bf16)}"


def main(argv):
    del argv
    unknown = set(_MODELS.value) - set(SETTINGS)
    if unknown:
        raise app.UsageError(f"--models: unknown {sorted(unknown)}")
    load_before = os.getloadavg()[0]
    results = {}
    for name in _MODELS.value:
        repeats = _RESNET_REPEATS.value if name == "resnet50" else _REPEATS.value
        results[name] = _measure(name, repeats)
        r = results[name]
        print(
            f"{name}: XLA {_ms(r['times']['xla'])} ms, no XLA "
            f"{_ms(r['times']['no_xla'])} ms, ratio {r['ratio']:.2f}",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"Machine: {os.cpu_count()} CPUs ({_cpu()}), "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, memory "
        f"{_MEMORY_DTYPE.value}. Load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after."
    )
    print()
    print(
        "| model | batch | memory rows | XLA ms/step | no XLA ms/step "
        "| ratio XLA / no XLA [min-max] | XLA compile s | no-XLA trace s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        _, _, _, batch, memory = SETTINGS[name]
        low, high = r["ratio_range"]
        print(
            f"| {name} | {batch()} | {memory()} | {_ms(r['times']['xla'])} "
            f"| {_ms(r['times']['no_xla'])} | {r['ratio']:.2f} [{low:.2f}-{high:.2f}]"
            f" | {r['compile_s']['xla']:.1f} | {r['compile_s']['no_xla']:.1f} |"
        )


if __name__ == "__main__":
    app.run(main)
