"""The cost of Cross-Batch Memory, as ratios measured in one run on this machine.

Commands (from the repository root, after `pip install -e .`):
    python benchmarks/xbm_overhead.py          # B=64, D in {128, 512}, M in {8192,
                                               # 65536}: ~15 min on 2 shared cores
    python benchmarks/xbm_overhead.py --quick  # D=64, M in {1024, 4096}: ~3 min

Every computation is compiled twice, with XLA (`tf.function(jit_compile=True)`)
and without (`jit_compile=False`: TensorFlow's graph executor and its oneDNN
kernels), on the CPU, and each is compared with the floor of the same compile mode:

(a) the XBM part of a training step, as `XBMContrastiveModel.compute_losses` runs
    it: `CrossBatchMemory.enqueue` of the batch, the contrastive loss of the batch
    (queries) against the memory (keys) with `key_mask=valid` and
    `query_key_index=rows`, summed over queries and divided by B, and its gradient
    w.r.t. the query embeddings. With a float32 and a bfloat16 memory, both through
    `fused_contrastive_loss` (what the model runs), and, for reference, float32
    through the generic `contrastive_loss` (what the model ran before);
(b) the floor: the bare float32 `B x M x D` similarity `q @ k.T` and its gradient
    w.r.t. `q` (`tf.reduce_sum(q @ k.T)` under a GradientTape: two matmuls of
    2*B*M*D flops);
(c) one `XBMContrastiveModel.train_step` of a small CNN with a float32 and a
    bfloat16 memory (`xbm_start_step=1`, so each step passes the open warm-up
    gate, as in real training), the warm-up step of the same float32 model (the
    train function `fit` runs before `xbm_start_step`:
    `train_step(data, use_memory=False)`), and the same CNN without memory
    (`memory_size=B`, `xbm_start_step=10**9`).

(d) when torch and pytorch-metric-learning are installed, their
    `CrossBatchMemory(ContrastiveLoss)` with the same loss (cosine similarity,
    margins 1 and 0.5) and a full memory of the same shape, forward + backward,
    and the torch floor (the same two matmuls), against (a) without XLA.

The targets printed at the end, at the largest (M, D): the float32 XBM part
without XLA at most 1.15x the floor, the bfloat16 one at most 0.6x the float32
floor (on a CPU with AVX-512 BF16 or AMX), and PML's step at least 2.5x ours.

Time: each (D, M) runs in a fresh process. After warm-up calls the timed calls are
interleaved (all the functions of a table in one order, then the reverse order,
round after round), so machine noise hits all of them alike; a ratio is the median
over rounds of the ratio within a round, with its min and max.

Memory: `tf.config.experimental.get_memory_info("CPU:0")` raises "Allocator stats
not available" on CPU, so this reads the resident set of a second fresh process from
`/proc/self/status`, with glibc's `MALLOC_MMAP_THRESHOLD_` fixed at 64 KiB so that
every large buffer is mapped when allocated and unmapped when freed (by default glibc
keeps freed buffers and reuses them, and a second call then shows no growth). It
reports the growth of VmRSS when a float32 and a bfloat16 memory layer are built and
filled (to compare with `M*D*4` and `M*D*2` bytes), and the transient peak of two
calls of a compiled (XLA) step above the resident set before them (VmHWM, reset
through `/proc/self/clear_refs`; where the kernel refuses the reset the peak is
since process start, and the output says so). These are bytes touched by live
buffers, not allocator statistics.
"""

from __future__ import annotations

import functools
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

import xbm_tf.losses.matmul_dtype as matmul_dtype_module  # noqa: E402
from xbm_tf import CrossBatchMemory, XBMContrastiveModel  # noqa: E402
from xbm_tf.losses import ContrastiveLoss, contrastive_loss  # noqa: E402
from xbm_tf.losses.fused import memory_pair_loss  # noqa: E402

_QUICK = flags.DEFINE_bool("quick", False, "Small shapes and few repeats.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "B, the number of queries.")
_DIMS = flags.DEFINE_list("dims", ["128", "512"], "Embedding widths D.")
_SIZES = flags.DEFINE_list("memory_sizes", ["8192", "65536"], "Memory sizes M.")
_IMAGE = flags.DEFINE_integer("image_size", 64, "Side of the CNN's RGB inputs.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 11, "Timed rounds (medians are reported).")
_TARGET = flags.DEFINE_float(
    "target",
    0.6,
    "Target for the bfloat16 (a) / float32 (b) without XLA at the largest M, D.",
)
_WHOLE_STEP = flags.DEFINE_bool("whole_step", True, "Also time the CNN train step.")
_PRETEND = flags.DEFINE_list(
    "pretend_cpu_flags",
    None,
    "Choose the losses' half-precision matmul as on a CPU with just these "
    "/proc/cpuinfo flags (xbm_tf.losses.matmul_dtype), e.g. 'avx2,fma' with "
    "ONEDNN_MAX_CPU_ISA=AVX2 XLA_FLAGS=--xla_cpu_max_isa=AVX2 to run as an "
    "AVX2-only CPU would.",
)
_CONFIG = flags.DEFINE_string(
    "config",
    None,
    "Internal: 'D,M,time' or 'D,M,memory' measures one configuration in this "
    "process and prints its result as a JSON line.",
)

_RESULT_TAG = "XBM_OVERHEAD_RESULT "
_MB = 2.0**20
_MODES = {"xla": True, "no_xla": False}
_DTYPES = ("float32", "bfloat16")
_MARGIN = 0.5


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


def _xbm_part(memory, batch_size: int, jit: bool = True, fused: bool = True):
    """(a): enqueue + batch-vs-memory contrastive loss + its gradient.

    `fused` runs the model's path (`memory_pair_loss`, i.e.
    `fused_contrastive_loss`); otherwise the generic `contrastive_loss`.
    """
    loss = ContrastiveLoss(neg_margin=_MARGIN)

    @tf.function(jit_compile=jit)
    def step(queries, labels):
        with tf.GradientTape() as tape:
            tape.watch(queries)
            rows = memory.enqueue(queries, labels)
            if fused:  # as XBMContrastiveModel.compute_losses does
                keys, key_labels, valid = memory.read()
                losses = memory_pair_loss(
                    loss, queries, labels, keys, key_labels, valid, rows
                )
            else:
                keys, key_labels, valid = memory.read()
                losses = contrastive_loss(
                    queries,
                    labels,
                    keys,
                    key_labels,
                    key_mask=valid,
                    query_key_index=rows,
                    neg_margin=_MARGIN,
                )
            total = tf.reduce_sum(losses) / float(batch_size)
        return total, tape.gradient(total, queries)

    return step


def _floor(jit: bool = True):
    """(b): the bare float32 similarity matmul and its gradient."""

    @tf.function(jit_compile=jit)
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


def _fresh_memory(dim: int, memory_size: int, rng, dtype: str = "float32"):
    """A `CrossBatchMemory` full of unit rows with labels from 1,000 classes."""
    memory = CrossBatchMemory(memory_size, dim, memory_dtype=dtype)
    memory.assign_embeddings(_unit_rows(memory_size, dim, seed=3))
    memory.labels.assign(rng.integers(0, 1000, memory_size).astype(np.int32))
    memory.count.assign(memory_size)
    return memory


def _part_functions(memories: dict, batch: int, dim: int, memory_size: int) -> dict:
    """(a) for each memory dtype and mode, (b) per mode, the enqueue alone (XLA).

    Returns:
        name -> zero-argument callable, compiled: `floor_<mode>`,
        `xbm_<dtype>_<mode>`, `generic_float32_<mode>`, `enqueue_<dtype>`.
    """
    queries = tf.constant(_unit_rows(batch, dim, seed=4))
    labels = tf.constant(np.arange(batch, dtype=np.int32) // 4)  # 4 per class
    keys = tf.constant(_unit_rows(memory_size, dim, seed=5))
    functions = {}

    def bind(step, *args):
        return lambda: step(*args)

    for mode, jit in _MODES.items():
        functions[f"floor_{mode}"] = bind(_floor(jit), queries, keys)
        for dtype, memory in memories.items():
            step = _xbm_part(memory, batch, jit)
            functions[f"xbm_{dtype}_{mode}"] = bind(step, queries, labels)
        if "float32" in memories:
            step = _xbm_part(memories["float32"], batch, jit, fused=False)
            functions[f"generic_float32_{mode}"] = bind(step, queries, labels)
    for dtype, memory in memories.items():
        enqueue = tf.function(memory.enqueue, jit_compile=True)
        functions[f"enqueue_{dtype}"] = bind(enqueue, queries, labels)
    for function in functions.values():
        _block(function())  # compiles
    return functions


def _pml_functions(batch: int, dim: int, memory_size: int) -> dict:
    """pytorch-metric-learning's XBM step and its torch floor, if installed.

    `CrossBatchMemory(ContrastiveLoss(pos_margin=1, neg_margin=0.5,
    distance=CosineSimilarity()))`, the loss of ours (`1 - s` on positives,
    `max(0, s - 0.5)` on negatives), with a full memory: its forward (enqueue
    plus the loss of the batch against the memory) and backward to the batch's
    embeddings. The floor: `(q @ k.T).sum()` and its gradient in torch.

    Returns:
        `{"pml": ..., "torch_floor": ...}` zero-argument callables, or `{}`
        when torch or pytorch-metric-learning cannot be imported.
    """
    try:
        import torch
        from pytorch_metric_learning import distances, losses
    except ImportError:
        return {}
    rng = np.random.default_rng(6)

    def unit(rows):
        values = rng.normal(size=(rows, dim)).astype(np.float32)
        return torch.from_numpy(values / np.linalg.norm(values, axis=1)[:, None])

    queries, keys = unit(batch), unit(memory_size)
    labels = torch.from_numpy(np.arange(batch) // 4)
    xbm = losses.CrossBatchMemory(
        losses.ContrastiveLoss(
            pos_margin=1.0, neg_margin=_MARGIN, distance=distances.CosineSimilarity()
        ),
        embedding_size=dim,
        memory_size=memory_size,
    )
    xbm.embedding_memory = keys.clone()
    xbm.label_memory = torch.from_numpy(rng.integers(0, 1000, memory_size))
    xbm.has_been_filled = True

    def pml():
        embeddings = queries.clone().requires_grad_()
        xbm(embeddings, labels).backward()
        return embeddings.grad.numpy()

    def torch_floor():
        q = queries.clone().requires_grad_()
        (q @ keys.T).sum().backward()
        return q.grad.numpy()

    return {"pml": pml, "torch_floor": torch_floor}


def _train_steps(dim: int, memory_size: int, rng, modes=tuple(_MODES)) -> dict:
    """The compiled `train_step` variants of (c), as zero-argument callables."""
    batch, size = _BATCH.value, _IMAGE.value
    images = rng.uniform(size=(batch, size, size, 3)).astype(np.float32)
    data = (tf.constant(images), tf.constant(np.arange(batch, dtype=np.int32) // 4))
    variants = {
        "with_xbm": (dict(memory_size=memory_size, xbm_start_step=1), True),
        "with_xbm_bf16": (
            dict(memory_size=memory_size, xbm_start_step=1, memory_dtype="bfloat16"),
            True,
        ),
        "warm_up": (dict(memory_size=memory_size, xbm_start_step=10**9), False),
        "without_xbm": (dict(memory_size=batch, xbm_start_step=10**9), True),
    }
    steps = {}
    for mode in modes:
        for name, (options, use_memory) in variants.items():
            keras.utils.set_random_seed(0)  # the same initial CNN for every variant
            model = XBMContrastiveModel(_small_cnn(size, dim), **options)
            model.compile(optimizer=keras.optimizers.SGD(1e-3))
            model.optimizer.build(model.trainable_variables)
            train_step = tf.function(
                functools.partial(model.train_step, use_memory=use_memory),
                jit_compile=_MODES[mode],
            )
            key = f"{name}_{mode}"
            steps[key] = lambda train_step=train_step: train_step(data)
            _block(steps[key]())  # compiles; the gated variants now have it open
    return steps


def _ratios(times: dict, numerator: str, denominator: str) -> dict:
    ratios = np.divide(times[numerator], times[denominator])
    return {
        "ratio": float(np.median(ratios)),
        "min": float(np.min(ratios)),
        "max": float(np.max(ratios)),
    }


def _time_config(dim: int, memory_size: int) -> dict:
    """Timings of (a), (b), the enqueue and (c), interleaved, in this process."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    batch, warmup, repeats = _BATCH.value, _WARMUP.value, _REPEATS.value
    memories = {dtype: _fresh_memory(dim, memory_size, rng, dtype) for dtype in _DTYPES}
    functions = _part_functions(memories, batch, dim, memory_size)
    functions.update(_pml_functions(batch, dim, memory_size))
    times = _interleaved(functions, warmup, repeats)
    result = {name + "_s": float(np.median(value)) for name, value in times.items()}
    result["part_ratios"] = {
        f"{kind}_{mode}": _ratios(times, f"{kind}_{mode}", f"floor_{mode}")
        for mode in _MODES
        for kind in ("xbm_float32", "xbm_bfloat16", "generic_float32")
    }
    if "pml" in times:
        import torch

        result["torch_threads"] = torch.get_num_threads()
        result["pml_ratios"] = {
            f"pml_over_{name}": _ratios(times, "pml", name)
            for name in ("xbm_float32_no_xla", "xbm_bfloat16_no_xla", "torch_floor")
        }
    del memories
    if _WHOLE_STEP.value:
        times = _interleaved(_train_steps(dim, memory_size, rng), warmup, repeats)
        result.update({name + "_s": float(np.median(t)) for name, t in times.items()})
        result["step_ratios"] = {
            f"{name}_{mode}": _ratios(times, f"{name}_{mode}", f"without_xbm_{mode}")
            for mode in _MODES
            for name in ("with_xbm", "with_xbm_bf16", "warm_up")
        }
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
    result, memories = {}, {}
    for dtype in _DTYPES:
        before = _rss_bytes()
        memories[dtype] = _fresh_memory(dim, memory_size, rng, dtype)
        result[f"memory_resident_{dtype}_bytes"] = _rss_bytes() - before
    functions = _part_functions(memories, batch, dim, memory_size)
    exact = True
    for name in ("floor_xla", "xbm_float32_xla", "xbm_bfloat16_xla"):
        result[f"{name}_peak_bytes"], reset = _step_peak(functions[name])
        exact = exact and reset
    result["peak_is_per_step"] = exact
    del memories, functions
    if _WHOLE_STEP.value:
        steps = _train_steps(dim, memory_size, rng, modes=("xla",))
        result["model_peak_bytes"] = {
            name: _step_peak(steps[f"{name}_xla"])[0]
            for name in ("with_xbm", "with_xbm_bf16", "without_xbm")
        }
    return result


# ------------------------------------------------------------------ the whole table


def _machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            text = cpuinfo.read()
    except OSError:
        text = None
    if text is not None:
        match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            cpu = match.group(1).strip()
        found = set(text.split())
        bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in found]
        cpu += ", " + (", ".join(bf16) or "no bf16 dot")
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
    # torch's OpenMP threads spin after each op by default and then take the
    # cores from TensorFlow's next op (and TensorFlow's from torch's): passive
    # waiting lets the two libraries take turns in one process.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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


def _ratio(r: dict) -> str:
    return f"{r['ratio']:.2f} [{r['min']:.2f}-{r['max']:.2f}]"


def _print_tables(machine: dict, results: list, load: tuple) -> None:
    print(
        f"Machine: {machine['nproc']} CPUs ({machine['cpu']}), TensorFlow "
        f"{machine['tf']}, Keras {machine['keras']}, Python {machine['python']}. "
        f"Load average {load[0]:.1f} before, {load[1]:.1f} after "
        "(the machine is shared: ratios within a run are what to read)."
    )
    batch = results[0]["B"]
    print()
    print(
        "XBM part (enqueue + contrastive loss vs memory + gradient) against the "
        f"float32 floor (q @ k.T and its gradient) of the same compile mode, "
        f"B={batch}, medians of {_REPEATS.value} interleaved rounds (ratios: median "
        "[min-max] of per-round ratios):"
    )
    print()
    print(
        "| D | M | mode | floor ms | float32 ms | float32 / floor | bfloat16 ms "
        "| bfloat16 / floor | float32 generic ms | generic / floor |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for mode in _MODES:
            ratios = r["part_ratios"]
            print(
                f"| {r['D']} | {r['M']} | {mode.replace('_', ' ')}"
                f" | {1e3 * r[f'floor_{mode}_s']:.1f}"
                f" | {1e3 * r[f'xbm_float32_{mode}_s']:.1f}"
                f" | {_ratio(ratios[f'xbm_float32_{mode}'])}"
                f" | {1e3 * r[f'xbm_bfloat16_{mode}_s']:.1f}"
                f" | {_ratio(ratios[f'xbm_bfloat16_{mode}'])}"
                f" | {1e3 * r[f'generic_float32_{mode}_s']:.1f}"
                f" | {_ratio(ratios[f'generic_float32_{mode}'])} |"
            )
    print()
    print(
        "float32 and bfloat16: the memory's dtype, through fused_contrastive_loss "
        "(the model's path). float32 generic: the plain contrastive_loss and its "
        "automatic gradient (the model's path before the fused loss)."
    )
    print()
    print(
        "| D | M | enqueue ms f32 / bf16 | M*D*4 MB | resident MB f32 / bf16 "
        "| step peak MB floor / f32 / bf16 (XLA) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['D']} | {r['M']} | {1e3 * r['enqueue_float32_s']:.2f} / "
            f"{1e3 * r['enqueue_bfloat16_s']:.2f} | {_mb(r['buffer_bytes'])}"
            f" | {_mb(r['memory_resident_float32_bytes'])} / "
            f"{_mb(r['memory_resident_bfloat16_bytes'])}"
            f" | {_mb(r['floor_xla_peak_bytes'])} / "
            f"{_mb(r['xbm_float32_xla_peak_bytes'])} / "
            f"{_mb(r['xbm_bfloat16_xla_peak_bytes'])} |"
        )
    print()
    print(
        "enqueue: CrossBatchMemory.enqueue alone in its own XLA call (call overhead "
        "included). resident: growth of VmRSS when the memory is built and filled. "
        "step peak: VmHWM above VmRSS over two calls of the compiled step, glibc "
        "mmap threshold fixed at 64 KiB: the step's transient buffers, on top of the "
        "memory already resident."
    )
    if not all(r["peak_is_per_step"] for r in results):
        print("(Peaks are since process start: /proc/self/clear_refs was refused.)")
    if "pml_ratios" in results[0]:
        print()
        print(
            "pytorch-metric-learning's CrossBatchMemory(ContrastiveLoss(pos_margin=1, "
            "neg_margin=0.5, distance=CosineSimilarity())), full memory, forward + "
            f"backward, torch {results[0]['torch_threads']} threads, interleaved with "
            "the rows above; ours: the XBM part without XLA:"
        )
        print()
        print(
            "| D | M | PML ms | torch floor ms | PML / torch floor | PML / ours f32 "
            "| PML / ours bf16 |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            ratios = r["pml_ratios"]
            print(
                f"| {r['D']} | {r['M']} | {1e3 * r['pml_s']:.1f}"
                f" | {1e3 * r['torch_floor_s']:.1f}"
                f" | {_ratio(ratios['pml_over_torch_floor'])}"
                f" | {_ratio(ratios['pml_over_xbm_float32_no_xla'])}"
                f" | {_ratio(ratios['pml_over_xbm_bfloat16_no_xla'])} |"
            )
    else:
        print()
        print(
            "(pytorch-metric-learning not measured: install torch and "
            "pytorch-metric-learning for its column.)"
        )
    if "step_ratios" in results[0]:
        print()
        print(
            f"Whole XBMContrastiveModel.train_step of a small CNN on "
            f"{_IMAGE.value}x{_IMAGE.value}x3 inputs, B={batch}; 'without' is the "
            "same CNN with memory_size=B and xbm_start_step=10**9; ratios against "
            "'without' in the same mode:"
        )
        print()
        print(
            "| D | M | mode | with XBM ms | ratio | with XBM bf16 ms | ratio "
            "| warm-up step ms | ratio | without ms | peak MB with / bf16 / without |"
        )
        print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            peaks = r["model_peak_bytes"]
            for mode in _MODES:
                ratios = r["step_ratios"]
                print(
                    f"| {r['D']} | {r['M']} | {mode.replace('_', ' ')}"
                    f" | {1e3 * r[f'with_xbm_{mode}_s']:.1f}"
                    f" | {_ratio(ratios[f'with_xbm_{mode}'])}"
                    f" | {1e3 * r[f'with_xbm_bf16_{mode}_s']:.1f}"
                    f" | {_ratio(ratios[f'with_xbm_bf16_{mode}'])}"
                    f" | {1e3 * r[f'warm_up_{mode}_s']:.1f}"
                    f" | {_ratio(ratios[f'warm_up_{mode}'])}"
                    f" | {1e3 * r[f'without_xbm_{mode}_s']:.1f}"
                    f" | {_mb(peaks['with_xbm'])} / {_mb(peaks['with_xbm_bf16'])}"
                    f" / {_mb(peaks['without_xbm'])} |"
                )
        print()
        print(
            "with XBM: xbm_start_step=1, after it (the open warm-up gate). warm-up "
            "step: the train function fit runs before xbm_start_step (no enqueue, no "
            "memory matmul) on the model with the M-row memory. Peaks under XLA."
        )
    largest = max(results, key=lambda r: (r["M"], r["D"]))
    ratios = largest["part_ratios"]
    targets = [
        ("float32 XBM part / floor, no XLA", ratios["xbm_float32_no_xla"], 1.15),
        (
            "bfloat16 XBM part / float32 floor, no XLA",
            ratios["xbm_bfloat16_no_xla"],
            _TARGET.value,
        ),
    ]
    if "pml_ratios" in largest:
        pml = largest["pml_ratios"]["pml_over_xbm_float32_no_xla"]
        targets.append(("PML step / our float32 XBM part, no XLA", pml, 2.5))
    print()
    for name, ratio, bound in targets:
        above = name.startswith("PML")
        met = ratio["ratio"] >= bound if above else ratio["ratio"] <= bound
        print(
            f"Target {name} {'>=' if above else '<='} {bound:g} at "
            f"M={largest['M']}, D={largest['D']}: {'met' if met else 'NOT met'} "
            f"({_ratio(ratio)})."
        )


def main(argv):
    if _PRETEND.value is not None:
        pretended = frozenset(_PRETEND.value)
        matmul_dtype_module.cpu_flags = lambda: pretended
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
