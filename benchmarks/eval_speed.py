"""Retrieval-evaluation speed at Stanford Online Products scale, all backends.

Run:
    python benchmarks/eval_speed.py            # 60,502 x 512, minutes on 2 cores
    python benchmarks/eval_speed.py --small    # 6,050 x 128, seconds

Synthetic SOP-like embeddings (60,502 L2-normalised 512-d vectors in ~11,300
classes of 2 to 11 items, clustered so exact leave-one-out R@1 is about 0.8) are
evaluated for R@{1,10,100,1000}, every item querying all others (itself excluded),
by:
- a plain numpy baseline: blocked matmul + argpartition of the top 1000 + sort;
- `xbm_tf.evaluation.recall_at_k` (either backend; the backend only serves
  MAP@R's top-R search): one blocked float32 matmul pass over the upper triangle of
  the symmetric similarity matrix that counts, per query, the items scoring above
  its best same-class item (its exact rank; R@K hit iff rank < K), no top-k;
- the previous default, kept for comparison: ScaNN brute force top-64
  (`search_batched_parallel`), then exact rank counting of the queries not hit;
- ScaNN top-1000 lists from `nearest_neighbors`, i.e. the plain search without rank
  counting, to show what the counting saves;
- faiss `IndexFlatIP` top-1000 lists, if faiss is installed.
All methods are exact; the table shows times, speed-ups over numpy measured in
this one run, and R@K differences from the default (non-zero only through
float rounding of near-ties, e.g. 1 query in 60,502 = 0.00002). With `--repeats N`
the methods run round-robin N times and the fastest time of each is kept, which
damps the noise of a shared machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from xbm_tf import evaluation  # noqa: E402

KS = (1, 10, 100, 1000)
BASELINE = "numpy blocked matmul + argpartition"
DEFAULT = "xbm_tf recall_at_k (default, rank counting)"


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


def scann_then_count(x, labels, ks, block_size):
    """The previous default: ScaNN top-64, then rank counting of the misses."""
    codes = np.unique(labels, return_inverse=True)[1]
    r = np.bincount(codes)[codes] - 1
    first = evaluation._search_then_count(
        x, x, codes, codes, r, True, ks, "scann", block_size
    )
    return {kk: int(np.count_nonzero(first < kk)) / len(x) for kk in ks}


def faiss_flat(x, k):
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, idx = index.search(x, k + 1)
    drop = idx == np.arange(len(x))[:, None]
    drop[~drop.any(axis=1), -1] = True
    return idx[~drop].reshape(len(x), k)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="6,050 x 128 quick run")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--scann_block_size", type=int, default=None)
    parser.add_argument("--block_size", type=int, default=None)
    args = parser.parse_args()

    if args.small:
        n, num_classes, dim, noise = 6050, 1130, 128, 1.6
    else:
        n, num_classes, dim, noise = 60502, 11316, 512, 2.2
    x, labels = sop_like(n, num_classes, dim, noise)
    ks = tuple(k for k in KS if k < n)
    k = max(ks)

    def metrics(idx):
        out = evaluation.metrics_from_neighbors(idx, labels, ks=ks)
        return {kk: out[f"recall@{kk}"] for kk in ks}

    methods = {
        BASELINE: lambda: metrics(numpy_baseline(x, k)),
        DEFAULT: lambda: evaluation.recall_at_k(
            x, labels, ks=ks, block_size=args.block_size
        ),
        "  old default: scann top-64 + count misses": lambda: scann_then_count(
            x, labels, ks, args.scann_block_size
        ),
        f"  scann top-{k} lists, no rank counting": lambda: metrics(
            evaluation.nearest_neighbors(
                x, k=k, backend="scann", block_size=args.scann_block_size
            )[0]
        ),
    }
    try:
        import faiss

        methods[f"faiss {faiss.__version__} IndexFlatIP"] = lambda: metrics(
            faiss_flat(x, k)
        )
        faiss_note = ""
    except ImportError:
        faiss_note = "faiss: skipped (not installed; pip install faiss-cpu to add it)"

    cpu = platform.processor() or "?"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if "model name" in ln]
        cpu = names[0] if names else cpu
    print(f"data: {n} x {dim}, {num_classes} classes, top-{k}, R@{ks}")
    print(f"machine: {os.cpu_count()} CPUs ({cpu}), load average {os.getloadavg()}")

    times = {name: float("inf") for name in methods}
    cpu_times = {name: float("inf") for name in methods}
    recalls = {}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            wall, cpu_start = time.perf_counter(), time.process_time()
            recalls[name] = fn()
            cpu_times[name] = min(cpu_times[name], time.process_time() - cpu_start)
            times[name] = min(times[name], time.perf_counter() - wall)
            print(f"  {name}: {times[name]:.1f} s", flush=True)

    base = times[BASELINE]
    base_cpu = cpu_times[BASELINE]
    exact = recalls[DEFAULT]
    header = (
        f"{'method':42s} {'wall s':>7s} {'speed-up':>8s} {'CPU s':>7s} {'ratio':>6s}"
    )
    header += f" {'R@1':>7s}" + "".join(f" {'dR@' + str(kk):>8s}" for kk in ks)
    print("\n" + header + "\n" + "-" * len(header))
    for name in methods:
        row = f"{name:42s} {times[name]:7.1f} {base / times[name]:7.2f}x"
        row += f" {cpu_times[name]:7.1f} {base_cpu / cpu_times[name]:5.2f}x"
        row += f" {recalls[name][1]:7.4f}"
        row += "".join(f" {recalls[name][kk] - exact[kk]:+8.5f}" for kk in ks)
        print(row)
    if faiss_note:
        print(faiss_note)
    print(
        "speed-up = numpy wall time / wall time; ratio = the same for CPU time "
        "(all threads), which a busy shared machine disturbs less."
    )
    print(f"(load average after the run: {os.getloadavg()})")

    default = times[DEFAULT]
    print(
        f"\ndefault backend vs numpy: {base / default:.2f}x wall, "
        f"{base_cpu / cpu_times[DEFAULT]:.2f}x CPU (target >= 2.5x)"
    )
    for name in methods:
        if name.startswith("faiss"):
            print(
                f"default backend vs faiss flat: {times[name] / default:.2f}x wall, "
                f"{cpu_times[name] / cpu_times[DEFAULT]:.2f}x CPU (target >= 1.0x)"
            )


if __name__ == "__main__":
    main()
