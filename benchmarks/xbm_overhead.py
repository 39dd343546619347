"""The cost of Cross-Batch Memory, as ratios measured in one run on this machine.

Commands (from the repository root, after `pip install -e .`):
    python benchmarks/xbm_overhead.py          # B=64, D in {128, 512}, M in {8192,
                                               # 65536}: ~10 min on 2 shared cores
    python benchmarks/xbm_overhead.py --quick  # D=64, M in {1024, 4096}: ~2 min

Everything is compiled with XLA (`tf.function(jit_compile=True)`) on the CPU:

(a) the XBM part of a training step, as `XBMContrastiveModel.compute_losses` runs
    it: `CrossBatchMemory.enqueue` of the batch, `contrastive_loss` of the batch
    (queries) against the memory (keys) with `key_mask=valid` and
    `query_key_index=rows`, summed over queries and divided by B, and its gradient
    w.r.t. the query embeddings;
(b) the floor: the bare `B x M x D` similarity `q @ k.T` and its gradient w.r.t. `q`
    (`tf.reduce_sum(q @ k.T)` under a GradientTape: two matmuls of 2*B*M*D flops,
    which XLA keeps as two dots);
(c) one `XBMContrastiveModel.train_step` of a small CNN with the memory, against the
    same model with the memory loss disabled (`xbm_start_step=10**9`, so the
    warm-up gate never opens, and `memory_size=B`, so its memory costs
    no RAM). The step with the memory is timed twice: `xbm_start_step=0` (no
    gate at all) and `xbm_start_step=1` (through the warm-up gate, as in real training
    with a warm-up).

Time: each (D, M) runs in a fresh process. After warm-up calls the timed calls are
interleaved (a, b, enqueue, then the reverse order, round after round; the three
train steps likewise), so machine noise hits all of them alike; a ratio is the
median over rounds of the ratio within a round, with its min and max.

Memory: `tf.config.experimental.get_memory_info("CPU:0")` raises "Allocator stats
not available" on CPU, so this reads the resident set of a second fresh process from
`/proc/self/status`, with glibc's `MALLOC_MMAP_THRESHOLD_` fixed at 64 KiB so that
every large buffer is mapped when allocated and unmapped when freed (by default glibc
keeps freed buffers and reuses them, and a second call then shows no growth). It
reports the growth of VmRSS when the memory layer is built and filled (to compare
with `M*D*4` bytes), and the transient peak of two calls of a compiled step above the
resident set before them (VmHWM, reset through `/proc/self/clear_refs`; where the
kernel refuses the reset the peak is since process start, and the output says so).
These are bytes touched by live buffers, not allocator statistics.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from keras import ops  # noqa: E402

from xbm_tf import CrossBatchMemory, XBMContrastiveModel  # noqa: E402
from xbm_tf.losses import contrastive_loss  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "Small shapes and few repeats.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "B, the number of queries.")
_DIMS = flags.DEFINE_list("dims", ["128", "512"], "Embedding widths D.")
_SIZES = flags.DEFINE_list("memory_sizes", ["8192", "65536"], "Memory sizes M.")
_IMAGE = flags.DEFINE_integer("image_size", 64, "Side of the CNN's RGB inputs.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 11, "Timed rounds (medians are reported).")
_TARGET = flags.DEFINE_float("target", 2.0, "Target for (a)/(b) at the largest M, D.")
_WHOLE_STEP = flags.DEFINE_bool("whole_step", True, "Also time the CNN train step.")
_CONFIG = flags.DEFINE_string(
    "config",
    None,
    "Internal: 'D,M,time' or 'D,M,memory' measures one configuration in this "
    "process and prints its result as a JSON line.",
)

_RESULT_TAG = "XBM_OVERHEAD_RESULT "
_MB = 2.0**20


# ---------------------------------------------------------------- measurement tools


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} line")
    return int(match.group(1))


def _rss_bytes() -> int:
    return _proc_status_kib("VmRSS") * 1024


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS; False if the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    return _proc_status_kib("VmHWM") * 1024


def _block(outputs):
    """Waits for every tensor in `outputs` (values fetched to the host)."""
    for value in tf.nest.flatten(outputs):
        np.asarray(value)


def _interleaved(functions: dict, warmup: int, repeats: int) -> dict:
    """Seconds per call of each function, `repeats` interleaved rounds.

    Args:
        functions: name -> zero-argument callable returning tensors.
        warmup: untimed calls of each function first.
        repeats: timed rounds; odd rounds run the functions in reverse order.

    Returns:
        name -> list of `repeats` durations in seconds, round by round.
    """
    for function in functions.values():
        for _ in range(warmup):
            _block(function())
    times = {name: [] for name in functions}
    names = list(functions)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            _block(functions[name]())
            times[name].append(time.perf_counter() - start)
    return times


def _median_ratio(numerator: list, denominator: list) -> float:
    return float(np.median(np.asarray(numerator) / np.asarray(denominator)))


def _step_peak(function, calls: int = 2) -> tuple[int, bool]:
    """Peak RSS above the current RSS over `calls` calls of `function`.

    Returns:
        `(bytes, reset)`: `reset` is False if VmHWM could not be reset, and the
        peak is then the process's peak since it started.
    """
    exact = _reset_peak()
    before = _rss_bytes()
    for _ in range(calls):
        _block(function())
    return _peak_bytes() - before, exact


# ----------------------------------------------------------- one (D, M) in a process


def _unit_rows(rows: int, dim: int, seed: int):
    values = keras.random.normal((rows, dim), seed=seed)
    return values / ops.sqrt(ops.sum(ops.square(values), axis=1, keepdims=True))


def _small_cnn(image_size: int, dim: int):
    """Three stride-2 3x3 convolutions (32, 64, 128 channels), pooling, Dense(D)."""
    return keras.Sequential(
        [
            keras.Input((image_size, image_size, 3)),
            keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(128, 3, strides=2, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(dim),
        ]
    )


def _xbm_part(memory, batch_size: int):
    """(a): enqueue + batch-vs-memory contrastive loss + its gradient, under XLA."""

    @tf.function(jit_compile=True)
    def step(queries, labels):
        with tf.GradientTape() as tape:
            tape.watch(queries)
            rows = memory.enqueue(queries, labels)
            keys, key_labels, valid = memory.read()
            losses = contrastive_loss(
                queries,
                labels,
                keys,
                key_labels,
                key_mask=valid,
                query_key_index=rows,
            )
            loss = tf.reduce_sum(losses) / float(batch_size)
        return loss, tape.gradient(loss, queries)

    return step


def _floor():
    """(b): the bare similarity matmul and its gradient, under XLA."""

    @tf.function(jit_compile=True)
    def step(queries, keys):
        with tf.GradientTape() as tape:
            tape.watch(queries)
            total = tf.reduce_sum(tf.matmul(queries, keys, transpose_b=True))
        return total, tape.gradient(total, queries)

    return step


def _warm_up_compiler(batch_size: int) -> None:
    """Compiles a tiny XBM step so one-time XLA/LLVM memory is not counted later."""
    memory = CrossBatchMemory(2 * batch_size, 8)
    queries = _unit_rows(batch_size, 8, seed=1)
    labels = np.arange(batch_size, dtype=np.int32) % 4
    _block(_xbm_part(memory, batch_size)(queries, labels))
    _block(_floor()(queries, _unit_rows(2 * batch_size, 8, seed=2)))


def _fresh_memory(dim: int, memory_size: int, rng):
    """A `CrossBatchMemory` full of unit rows with labels from 1,000 classes."""
    memory = CrossBatchMemory(memory_size, dim)
    memory.embeddings.assign(_unit_rows(memory_size, dim, seed=3))
    memory.labels.assign(rng.integers(0, 1000, memory_size).astype(np.int32))
    memory.count.assign(memory_size)
    return memory


def _part_functions(memory, batch: int, dim: int, memory_size: int) -> dict:
    """(a), (b) and the enqueue alone, compiled, as zero-argument callables."""
    queries = tf.constant(_unit_rows(batch, dim, seed=4))
    labels = tf.constant(np.arange(batch, dtype=np.int32) // 4)  # 4 per class
    keys = tf.constant(_unit_rows(memory_size, dim, seed=5))
    xbm_step, floor_step = _xbm_part(memory, batch), _floor()
    enqueue = tf.function(memory.enqueue, jit_compile=True)
    functions = {
        "xbm": lambda: xbm_step(queries, labels),
        "floor": lambda: floor_step(queries, keys),
        "enqueue": lambda: enqueue(queries, labels),
    }
    for function in functions.values():
        _block(function())  # compiles
    return functions


def _train_steps(dim: int, memory_size: int, rng) -> dict:
    """The three compiled `train_step` variants of (c), as zero-argument callables."""
    batch, size = _BATCH.value, _IMAGE.value
    images = rng.uniform(size=(batch, size, size, 3)).astype(np.float32)
    data = (tf.constant(images), tf.constant(np.arange(batch, dtype=np.int32) // 4))
    variants = {
        "with_xbm": dict(memory_size=memory_size, xbm_start_step=0),
        "with_xbm_cond": dict(memory_size=memory_size, xbm_start_step=1),
        "without_xbm": dict(memory_size=batch, xbm_start_step=10**9),
    }
    steps = {}
    for name, options in variants.items():
        keras.utils.set_random_seed(0)  # the same initial CNN for every variant
        model = XBMContrastiveModel(_small_cnn(size, dim), **options)
        model.compile(optimizer=keras.optimizers.SGD(1e-3))
        model.optimizer.build(model.trainable_variables)
        train_step = tf.function(model.train_step, jit_compile=True)
        steps[name] = lambda train_step=train_step: train_step(data)
        _block(steps[name]())  # compiles; with_xbm_cond now has the gate open
    return steps


def _time_config(dim: int, memory_size: int) -> dict:
    """Timings of (a), (b), the enqueue and (c), interleaved, in this process."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    batch, warmup, repeats = _BATCH.value, _WARMUP.value, _REPEATS.value
    memory = _fresh_memory(dim, memory_size, rng)
    times = _interleaved(
        _part_functions(memory, batch, dim, memory_size), warmup, repeats
    )
    result = {name + "_s": float(np.median(value)) for name, value in times.items()}
    ratios = np.divide(times["xbm"], times["floor"])
    result.update(
        ratio=float(np.median(ratios)),
        ratio_min=float(np.min(ratios)),
        ratio_max=float(np.max(ratios)),
    )
    del memory
    if _WHOLE_STEP.value:
        times = _interleaved(_train_steps(dim, memory_size, rng), warmup, repeats)
        result.update({name + "_s": float(np.median(t)) for name, t in times.items()})
        without = times["without_xbm"]
        result["step_ratio"] = _median_ratio(times["with_xbm"], without)
        result["step_ratio_cond"] = _median_ratio(times["with_xbm_cond"], without)
    return result


def _memory_config(dim: int, memory_size: int) -> dict:
    """Resident and peak memory of the same computations, in this process.

    Run with `MALLOC_MMAP_THRESHOLD_` fixed (see `_run_in_subprocess`), so every large
    buffer is mapped when allocated and unmapped when freed, and VmRSS/VmHWM follow
    the live buffers instead of what glibc keeps cached from earlier calls.
    """
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    batch = _BATCH.value
    _warm_up_compiler(batch)
    before = _rss_bytes()
    memory = _fresh_memory(dim, memory_size, rng)
    result = {"memory_resident_bytes": _rss_bytes() - before}
    functions = _part_functions(memory, batch, dim, memory_size)
    result["xbm_peak_bytes"], exact = _step_peak(functions["xbm"])
    result["floor_peak_bytes"], _ = _step_peak(functions["floor"])
    result["peak_is_per_step"] = exact
    del memory, functions
    if _WHOLE_STEP.value:
        steps = _train_steps(dim, memory_size, rng)
        result["model_peak_bytes"] = {
            name: _step_peak(steps[name])[0] for name in ("with_xbm", "without_xbm")
        }
    return result


# ------------------------------------------------------------------ the whole table


def _machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE)
        if match:
            cpu = match.group(1).strip()
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "tf": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
    }


def _run_in_subprocess(dim: int, memory_size: int, mode: str) -> dict:
    """Runs `_time_config` or `_memory_config` in a fresh Python process."""
    command = [sys.executable, os.path.abspath(__file__)]
    command += [arg for arg in sys.argv[1:] if not arg.startswith("--config")]
    command.append(f"--config={dim},{memory_size},{mode}")
    env = dict(os.environ)
    if mode == "memory":
        # A fixed threshold turns off glibc's dynamic one: buffers of 64 KiB and
        # more are mmap-ed and returned on free, so RSS follows the live buffers.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in completed.stdout.splitlines():
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG) :])
    raise RuntimeError(
        f"Measuring the {mode} of D={dim}, M={memory_size} failed (exit code "
        f"{completed.returncode}):\n{completed.stderr[-4000:]}"
    )


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / _MB:.1f}"


def _print_tables(machine: dict, results: list, load: tuple) -> None:
    print(
        f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), TensorFlow "
        f"{machine['tf']}, Keras {machine['keras']}, Python {machine['python']}, "
        f"XLA on CPU. Load average {load[0]:.1f} before, {load[1]:.1f} after "
        "(the machine is shared: ratios within a run are what to read)."
    )
    batch = results[0]["B"]
    print()
    print(
        f"XBM part (enqueue + contrastive loss vs memory + gradient) against the "
        f"floor (q @ k.T and its gradient), B={batch}, medians of "
        f"{_REPEATS.value} interleaved rounds:"
    )
    print()
    print(
        "| D | M | XBM part ms | floor ms | ratio (a)/(b) [min-max] | enqueue ms "
        "| M*D*4 MB | memory resident MB | step peak (a) MB | step peak (b) MB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['D']} | {r['M']} | {1e3 * r['xbm_s']:.1f} | {1e3 * r['floor_s']:.1f}"
            f" | {r['ratio']:.2f} [{r['ratio_min']:.2f}-{r['ratio_max']:.2f}]"
            f" | {1e3 * r['enqueue_s']:.2f} | {_mb(r['buffer_bytes'])}"
            f" | {_mb(r['memory_resident_bytes'])} | {_mb(r['xbm_peak_bytes'])}"
            f" | {_mb(r['floor_peak_bytes'])} |"
        )
    print()
    print(
        "enqueue: CrossBatchMemory.enqueue alone in its own XLA call (call overhead "
        "included). memory resident: growth of VmRSS when the memory is built and "
        "filled, to compare with M*D*4. step peak: VmHWM above VmRSS over two calls "
        "of the compiled step, glibc mmap threshold fixed at 64 KiB: the step's "
        "transient buffers, on top of the memory already resident."
    )
    if not all(r["peak_is_per_step"] for r in results):
        print("(Peaks are since process start: /proc/self/clear_refs was refused.)")
    if "step_ratio" in results[0]:
        print()
        print(
            f"Whole XBMContrastiveModel.train_step (XLA) of a small CNN on "
            f"{_IMAGE.value}x{_IMAGE.value}x3 inputs, B={batch}; 'without' is the "
            "same model with xbm_start_step=10**9 and memory_size=B:"
        )
        print()
        print(
            "| D | M | with XBM ms | with XBM, gated ms | without ms "
            "| ratio with/without | ratio gated | step peak with / without MB |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            peaks = r["model_peak_bytes"]
            print(
                f"| {r['D']} | {r['M']} | {1e3 * r['with_xbm_s']:.1f}"
                f" | {1e3 * r['with_xbm_cond_s']:.1f} | {1e3 * r['without_xbm_s']:.1f}"
                f" | {r['step_ratio']:.2f} | {r['step_ratio_cond']:.2f}"
                f" | {_mb(peaks['with_xbm'])} / {_mb(peaks['without_xbm'])} |"
            )
        print()
        print(
            "with XBM: xbm_start_step=0 (no gate). gated: xbm_start_step=1, "
            "after it, so each step passes the open warm-up gate, as real "
            "training with a warm-up does."
        )
    largest = max(results, key=lambda r: (r["M"], r["D"]))
    verdict = "met" if largest["ratio"] <= _TARGET.value else "NOT met"
    print()
    print(
        f"Target (a)/(b) <= {_TARGET.value:g} at M={largest['M']}, D={largest['D']}: "
        f"{verdict} ({largest['ratio']:.2f})."
    )


def main(argv):
    if _QUICK.value:
        for flag, value in (
            (_DIMS, ["64"]),
            (_SIZES, ["1024", "4096"]),
            (_IMAGE, 32),
            (_WARMUP, 1),
            (_REPEATS, 5),
        ):
            if not flags.FLAGS[flag.name].present:
                flags.FLAGS[flag.name].value = value
    if _BATCH.value < 1 or _REPEATS.value < 1 or _WARMUP.value < 0:
        raise app.UsageError("batch_size and repeats must be >= 1, warmup >= 0")
    if _CONFIG.value is not None:
        dim, memory_size, mode = _CONFIG.value.split(",")
        measure = {"time": _time_config, "memory": _memory_config}[mode]
        result = measure(int(dim), int(memory_size))
        print(_RESULT_TAG + json.dumps(result), flush=True)
        return
    configs = [(int(d), int(m)) for d in _DIMS.value for m in _SIZES.value]
    for dim, memory_size in configs:
        if memory_size < _BATCH.value:
            raise app.UsageError(
                f"memory size {memory_size} is smaller than batch_size {_BATCH.value}"
            )
    load_before = os.getloadavg()[0]
    results = []
    for dim, memory_size in configs:
        print(f"running D={dim} M={memory_size} ...", file=sys.stderr, flush=True)
        result = {"D": dim, "M": memory_size, "B": _BATCH.value}
        result["buffer_bytes"] = memory_size * dim * 4
        for mode in ("time", "memory"):
            result.update(_run_in_subprocess(dim, memory_size, mode))
        results.append(result)
    _print_tables(_machine(), results, (load_before, os.getloadavg()[0]))


if __name__ == "__main__":
    app.run(main)
