"""Retrieval-evaluation speed at Stanford Online Products scale, against the floor.

Run:
    python benchmarks/eval_speed.py                 # 60,502 x 512, all methods
    python benchmarks/eval_speed.py --quick         # 12,000 x 512, floor + default
    python benchmarks/eval_speed.py --n 20000 --methods floor,default,numpy

Synthetic SOP-like embeddings (L2-normalised 512-d vectors in classes of 2 to 11
items, clustered so exact leave-one-out R@1 is about 0.8) are evaluated for
R@{1,10,100,1000}, every item querying all others (itself excluded), by:
- `floor`: the float32 GEMM floor, i.e. plain TensorFlow matmuls of exactly the
  blocks the default computes (the upper-triangle strips of the symmetric
  similarity matrix, `n^2 * dim` multiply-adds), with no counting: no exact
  method that computes every score can be faster;
- `default`: `xbm_tf.retrieval.recall_at_k` with its default engine,
  `"exact_rank"`: the same blocked TensorFlow matmul, each block counted for
  its rows and columns (the rank of each query's best same-class item), near-ties
  re-ranked exactly, no top-k;
- `numpy`: a plain numpy baseline, blocked matmul + argpartition of the top 1000;
- `exact` and `scann`: the list engines (`recall_at_k(..., backend=...)`,
  TensorFlow top-k or ScaNN brute-force top-1001 lists);
- `scann_ah`: the approximate engine (tree + AH + exact re-ordering);
- `faiss`: faiss `IndexFlatIP` top-1000 lists, if faiss is installed.
`--embeddings random` evaluates random unit vectors with the same labels instead
(an untrained or collapsed model: mean rank in the thousands). `--breakdown` adds
one more call of the default engine with a timer on each of its phases (the best
same-class scores, the matmuls, the counting, the re-ranking of near-ties).
Methods run round-robin `--repeats` times (interleaved, so a shared machine's
load hits them alike); the table gives the median wall time with its [min-max]
range, the CPU time, the ratio to the floor and to numpy, and R@K differences
from numpy (exact methods must print 0).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from xbm_tf import retrieval  # noqa: E402
from xbm_tf.retrieval import counting  # noqa: E402

KS = (1, 10, 100, 1000)
ALL_METHODS = ("floor", "default", "numpy", "exact", "scann", "scann_ah", "faiss")


def sop_like(n: int, num_classes: int, dim: int, noise: float, seed: int = 0):
    """Clustered unit vectors: classes of 2-11 items, mean size n / num_classes."""
    rng = np.random.default_rng(seed)
    sizes = 2 + rng.binomial(9, (n / num_classes - 2) / 9, size=num_classes)
    while sizes.sum() != n:  # nudge random classes until the total is exact
        i = rng.integers(num_classes)
        step = 1 if sizes.sum() < n else -1
        if 2 <= sizes[i] + step <= 11:
            sizes[i] += step
    labels = np.repeat(np.arange(num_classes), sizes)
    centers = rng.standard_normal((num_classes, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= noise / np.sqrt(dim)
    x += centers[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


@tf.function(reduce_retracing=True)
def _strip(x, start, stop):
    return tf.matmul(x[start:stop], x[start:], transpose_b=True)


def gemm_floor(x, block_size):
    """The default's matmul blocks alone (upper-triangle strips), each handed
    to numpy as the default does: `np.asarray` shares the tensor's buffer
    (`.numpy()` would add a copy, 3 of 9 s at SOP scale)."""
    x_t = tf.constant(x)
    for start in range(0, len(x), block_size):
        stop = min(start + block_size, len(x))
        np.asarray(_strip(x_t, tf.constant(start), tf.constant(stop)))


def gemm_flops(n, dim, block_size):
    return sum(
        2 * min(block_size, n - s) * (n - s) * dim for s in range(0, n, block_size)
    )


def numpy_baseline(x, k, block=1024):
    """Blocked matmul + argpartition + sort of the top k, self excluded."""
    out = np.empty((len(x), k), np.int64)
    for start in range(0, len(x), block):
        sims = x[start : start + block] @ x.T
        rows = np.arange(len(sims))
        sims[rows, rows + start] = -np.inf
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
        out[start : start + block] = np.take_along_axis(part, order, axis=1)
    return out


def faiss_flat(x, k):
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, idx = index.search(x, k + 1)
    drop = idx == np.arange(len(x))[:, None]
    drop[~drop.any(axis=1), -1] = True
    return idx[~drop].reshape(len(x), k)


def breakdown(run):
    """Seconds per phase of one `run()` of the default engine, by timers put
    around `xbm_tf.retrieval.counting`'s functions for the call."""
    spent = {}
    names = {
        "best_same_class": "best same-class scores (float64)",
        "_count_pass": "matmul pass",
        "_block_scores": "matmuls",
        "_rank_in_band": "near-tie re-ranking",
        "first_hit_ranks": "near-tie re-ranking",
    }
    originals = {name: getattr(counting, name) for name in names}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if name == "_block_scores":
                out = np.asarray(out)  # the matmul has run by now
            spent[names[name]] = spent.get(names[name], 0.0) + (
                time.perf_counter() - start
            )
            return out

        return wrapper

    for name, fn in originals.items():
        setattr(counting, name, timed(name, fn))
    try:
        start = time.perf_counter()
        run()
        total = time.perf_counter() - start
    finally:
        for name, fn in originals.items():
            setattr(counting, name, fn)
    matmuls = spent.get("matmuls", 0.0)
    phases = {
        "matmuls": matmuls,
        "counting the blocks": spent.get("matmul pass", 0.0) - matmuls,
    }
    for key in ("best same-class scores (float64)", "near-tie re-ranking"):
        phases[key] = spent.get(key, 0.0)
    phases["the rest (checks, band, order)"] = total - sum(phases.values())
    return total, phases


def _cpu_name():
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if "model name" in ln]
        if names:
            return names[0]
    return platform.processor() or "?"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=60502, help="items (SOP: 60502)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument(
        "--quick", action="store_true", help="--n 12000, floor and default only"
    )
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset of {','.join(ALL_METHODS)} (default: all; "
        "with --quick: floor,default)",
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--embeddings",
        choices=("clustered", "random"),
        default="clustered",
        help="clustered (like a trained model) or random unit vectors",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="time the default engine's phases in one more call",
    )
    parser.add_argument("--block_size", type=int, default=1024)
    parser.add_argument("--scann_block_size", type=int, default=None)
    args = parser.parse_args()
    n = 12000 if args.quick and args.n == 60502 else args.n
    methods_arg = args.methods or ("floor,default" if args.quick else "")
    chosen = [m for m in methods_arg.split(",") if m] or list(ALL_METHODS)
    unknown = sorted(set(chosen) - set(ALL_METHODS))
    if unknown:
        raise SystemExit(f"error: --methods: unknown {unknown}; use {ALL_METHODS}")
    if n < 12 or args.repeats < 1 or args.block_size < 1:
        raise SystemExit("error: need --n >= 12, --repeats >= 1, --block_size >= 1")

    num_classes = max(2, round(n * 11316 / 60502))
    x, labels = sop_like(n, num_classes, args.dim, noise=2.2)
    if args.embeddings == "random":
        x = np.random.default_rng(1).standard_normal(x.shape, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    ks = tuple(k for k in KS if k < n)
    k = max(ks)

    def lists_recall(idx):
        out = retrieval.metrics_from_neighbors(idx, labels, ks=ks)
        return {kk: out[f"recall@{kk}"] for kk in ks}

    def engine(name):
        size = args.scann_block_size if name.startswith("scann") else args.block_size
        return lambda: retrieval.recall_at_k(
            x, labels, ks=ks, backend=name, block_size=size
        )

    methods = {
        "floor": ("float32 GEMM floor (TF matmul, same blocks)", None),
        "default": (
            "recall_at_k, exact_rank (default)",
            lambda: retrieval.recall_at_k(x, labels, ks=ks, block_size=args.block_size),
        ),
        "numpy": (
            "numpy blocked matmul + argpartition",
            lambda: lists_recall(numpy_baseline(x, k)),
        ),
        "exact": (f"recall_at_k, exact (TF top-{k + 1})", engine("exact")),
        "scann": (f"recall_at_k, scann (brute top-{k + 1})", engine("scann")),
        "scann_ah": ("recall_at_k, scann_ah (APPROXIMATE)", engine("scann_ah")),
    }
    try:
        import faiss

        methods["faiss"] = (
            f"faiss {faiss.__version__} IndexFlatIP",
            lambda: lists_recall(faiss_flat(x, k)),
        )
    except ImportError:
        if "faiss" in chosen:
            print("faiss: skipped (not installed; pip install faiss-cpu to add it)")
        chosen = [m for m in chosen if m != "faiss"]
    methods["floor"] = (methods["floor"][0], lambda: gemm_floor(x, args.block_size))
    chosen = [m for m in ALL_METHODS if m in chosen]

    flops = gemm_flops(n, args.dim, args.block_size)
    print(
        f"data: {n} x {args.dim} {args.embeddings}, {num_classes} classes, "
        f"R@{ks}, leave-one-out"
    )
    print(f"GEMM work of the symmetric pass: {flops / 1e12:.3f} TFLOP (float32)")
    print(f"machine: {os.cpu_count()} CPUs ({_cpu_name()}), TF {tf.__version__}")
    print(f"load average before: {tuple(round(v, 2) for v in os.getloadavg())}")
    tf.constant(1.0)  # start TensorFlow before timing
    gemm_floor(x[:256], 128)  # trace the floor's tf.function

    walls = {m: [] for m in chosen}
    cpus = {m: [] for m in chosen}
    recalls = {}
    for rep in range(args.repeats):
        for m in chosen:
            wall, cpu = time.perf_counter(), time.process_time()
            recalls[m] = methods[m][1]()
            cpus[m].append(time.process_time() - cpu)
            walls[m].append(time.perf_counter() - wall)
            print(f"  [{rep + 1}/{args.repeats}] {m}: {walls[m][-1]:.2f} s", flush=True)
    load_after = tuple(round(v, 2) for v in os.getloadavg())

    med = {m: float(np.median(walls[m])) for m in chosen}
    # dR@K against numpy, else the default, else the first method with R@K.
    with_recall = [m for m in ("numpy", "default", *chosen) if recalls.get(m)]
    ref_name = with_recall[0] if with_recall else None
    reference = recalls.get(ref_name)
    header = (
        f"{'method':44s} {'wall s':>7s} {'[min-max]':>15s} {'CPU s':>7s}"
        f" {'x floor':>7s} {'x numpy':>7s} {'R@1':>7s}"
    )
    header += "".join(f" {'dR@' + str(kk):>8s}" for kk in ks)
    print("\n" + header + "\n" + "-" * len(header))
    for m in chosen:
        row = f"{methods[m][0]:44s} {med[m]:7.2f}"
        row += f" {f'[{min(walls[m]):.2f}-{max(walls[m]):.2f}]':>15s}"
        row += f" {np.median(cpus[m]):7.2f}"
        row += f" {med[m] / med['floor']:6.2f}x" if "floor" in med else f" {'':>7s}"
        row += f" {med['numpy'] / med[m]:6.2f}x" if "numpy" in med else f" {'':>7s}"
        if m in recalls and recalls[m] is not None:
            row += f" {recalls[m][1]:7.4f}"
            row += "".join(f" {recalls[m][kk] - reference[kk]:+8.5f}" for kk in ks)
        print(row)
    print(
        f"x floor = median wall / median floor wall; x numpy = speed-up over numpy; "
        f"dR@K = difference from {ref_name}; medians of {args.repeats} interleaved "
        f"run(s)."
    )
    if "floor" in med:
        print(f"GEMM rate of the floor: {flops / med['floor'] / 1e9:.0f} GFLOP/s")
    if "floor" in med and "default" in med:
        ratios = [d / f for d, f in zip(walls["default"], walls["floor"])]
        print(
            f"default / floor per round: median {np.median(ratios):.2f}x "
            f"[{min(ratios):.2f}-{max(ratios):.2f}] (target <= 1.2x)"
        )
    if args.breakdown:
        total, phases = breakdown(methods["default"][1])
        print(f"\ndefault engine, one more call: {total:.2f} s")
        for name, seconds in phases.items():
            print(f"  {name:34s} {seconds:6.2f} s")
    print(f"load average after: {load_after}")


if __name__ == "__main__":
    main()
