"""Gallery search speed: brute force vs tree_ah (and faiss), through the SavedModel.

Run:
    python benchmarks/search_speed.py             # 1,000,000 x 128, ~30 min
    python benchmarks/search_speed.py --n 100000  # a few minutes

A synthetic clustered gallery (`--n` L2-normalised 128-d vectors in n / 10
classes of n / 1000 categories, see `clustered`) is searched by 10,000 new
queries from the same classes. For each method the table gives:
- build + write s: building the index and writing the retrieval SavedModel
  (`xbm_tf.retrieval.export_retrieval_model`; faiss: building its index);
- index MB: the SavedModel directory on disk (the tiny network is ~0.2 MB of it;
  faiss: its serialized index);
- batched queries/s: the 10,000 queries in batches of `--batch` through the
  SavedModel's `search_embeddings` signature (faiss: `index.search`), median
  [min-max] of `--repeats` round-robin runs;
- single-image latency p50 / p99 ms: one 64 x 64 x 3 image at a time through
  `serving_default` (tiny CNN backbone + search), interleaved between methods;
- recall@10 against exact search (TensorFlow matmul + top-k).

tree_ah is tuned first on 2,000 separate tuning queries: for `--num_leaves`, the
smallest `leaves_to_search` (and the `reorder` depth) whose recall@10 reaches
`--target_recall` wins; the test queries are used only for the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from xbm_tf.backbones import build_embedding_model  # noqa: E402
from xbm_tf.export import (  # noqa: E402
    export_embedding_model,
    load_exported_embedder,
)
from xbm_tf.retrieval import (  # noqa: E402
    export_retrieval_model,
    load_retrieval_model,
    nearest_neighbors,
)
from xbm_tf.retrieval.serving import _scann_ops  # noqa: E402

K = 10
DIM = 128
IMAGE = (64, 64, 3)
NETWORK_ONLY = "tiny CNN alone (embedding-only SavedModel)"


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n, dim, seed=0, category_noise=1.0, item_noise=0.8):
    """A gallery like a trained model's: n / 1000 categories of n / 100 classes.

    Class centres scatter around category centres and items around class
    centres (Gaussian noise of norm ~`category_noise` / `item_noise`), all on the
    unit sphere. With the defaults about 86% of a query's 10 nearest neighbours
    are of its class (cosine ~0.67 to the first, ~0.53 to the tenth).

    Returns:
        `(gallery, class_centres)`.
    """
    rng = np.random.default_rng(seed)
    categories = _unit(rng.standard_normal((max(1, n // 1000), dim)))
    num_classes = max(1, n // 10)
    noise = rng.standard_normal((num_classes, dim), dtype=np.float32)
    parents = categories[rng.integers(0, len(categories), num_classes)]
    classes = _unit(parents + category_noise / np.sqrt(dim) * noise)
    gallery = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block *= item_noise / np.sqrt(dim)
        block += classes[rng.integers(0, num_classes, stop - start)]
        gallery[start:stop] = _unit(block)
    return gallery, classes


def queries_near(classes, n, dim, seed, item_noise=0.8):
    """New items of random classes (not in the gallery)."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n, dim), dtype=np.float32) * (
        item_noise / np.sqrt(dim)
    )
    return _unit(classes[rng.integers(0, len(classes), n)] + noise)


def recall(found, exact):
    return float(
        np.mean([len(set(a) & set(b)) / exact.shape[1] for a, b in zip(found, exact)])
    )


def dir_mb(path):
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 2**20


def tune_tree_ah(gallery, tuning_queries, exact, num_leaves, target):
    """Smallest leaves_to_search (then reorder) reaching `target` recall@10."""
    scann_ops = _scann_ops()
    start = time.perf_counter()
    searcher = (
        scann_ops.builder(gallery, K, "dot_product")
        .tree(num_leaves, 1, training_sample_size=min(len(gallery), 250_000))
        .score_ah(2, anisotropic_quantization_threshold=0.2)
        .reorder(400)
        .build()
    )
    print(f"  tuning index built in {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for reorder in (100, 200, 400):
        for leaves in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256):
            if leaves > num_leaves:
                continue
            start = time.perf_counter()
            idx, _ = searcher.search_batched_parallel(
                tuning_queries,
                final_num_neighbors=K,
                pre_reorder_num_neighbors=reorder,
                leaves_to_search=leaves,
            )
            qps = len(tuning_queries) / (time.perf_counter() - start)
            r = recall(idx.numpy(), exact)
            rows.append((leaves, reorder, r, qps))
            print(
                f"  leaves_to_search={leaves:4d} reorder={reorder:3d} "
                f"recall@10={r:.4f} {qps:8.0f} q/s",
                flush=True,
            )
            if r >= target:
                break
        if rows[-1][2] >= target:
            break
    good = [row for row in rows if row[2] >= target]
    if not good:
        return max(rows, key=lambda row: row[2])[:2]
    return max(good, key=lambda row: row[3])[:2]


def faiss_methods(gallery, queries, exact, args):
    try:
        import faiss
    except ImportError:
        print("faiss not installed: skipped", flush=True)
        return []
    out = []
    start = time.perf_counter()
    flat = faiss.IndexFlatIP(DIM)
    flat.add(gallery)
    out.append(("faiss IndexFlatIP (exact)", flat, time.perf_counter() - start))
    start = time.perf_counter()
    nlist = args.num_leaves
    ivf = faiss.IndexIVFFlat(
        faiss.IndexFlatIP(DIM), DIM, nlist, faiss.METRIC_INNER_PRODUCT
    )
    ivf.train(gallery[np.random.default_rng(0).permutation(len(gallery))[:250_000]])
    ivf.add(gallery)
    build = time.perf_counter() - start
    for nprobe in (1, 2, 4, 8, 16, 32, 64, 128):
        ivf.nprobe = nprobe
        _, idx = ivf.search(queries[: len(queries) // 5], K)
        if recall(idx, exact[: len(queries) // 5]) >= args.target_recall:
            break
    out.append((f"faiss IndexIVFFlat nlist={nlist} nprobe={ivf.nprobe}", ivf, build))
    return [(name, index, build, faiss) for name, index, build in out]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery size")
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=1000, help="batched search")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency_samples", type=int, default=300)
    parser.add_argument("--num_leaves", type=int, default=None, help="sqrt(n)")
    parser.add_argument(
        "--exact_queries",
        type=int,
        default=500,
        help="exact methods (brute force, faiss flat) are timed on this many",
    )
    parser.add_argument("--target_recall", type=float, default=0.96)
    parser.add_argument("--workdir", default=None, help="default: a temp dir")
    parser.add_argument("--skip_faiss", action="store_true")
    args = parser.parse_args()
    if args.num_leaves is None:
        args.num_leaves = int(np.sqrt(args.n))
    workdir = args.workdir or tempfile.mkdtemp(prefix="search_speed_")
    os.makedirs(workdir, exist_ok=True)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"TF {tf.__version__}, load {os.getloadavg()}",
        flush=True,
    )

    gallery, classes = clustered(args.n, DIM)
    queries = queries_near(classes, args.queries, DIM, 1)
    tuning = queries_near(classes, 2000, DIM, 2)
    start = time.perf_counter()
    exact, _ = nearest_neighbors(queries, gallery, K, "exact", block_size=256)
    exact_tuning, _ = nearest_neighbors(tuning, gallery, K, "exact", block_size=256)
    print(f"exact ground truth: {time.perf_counter() - start:.1f} s", flush=True)

    print(f"tuning tree_ah, num_leaves={args.num_leaves}:", flush=True)
    leaves, reorder = tune_tree_ah(
        gallery, tuning, exact_tuning, args.num_leaves, args.target_recall
    )
    print(f"chosen: leaves_to_search={leaves}, reorder={reorder}", flush=True)

    model = build_embedding_model("tiny", DIM, input_shape=IMAGE)
    methods = {}
    for name, options in [
        ("brute_force", {}),
        (
            "tree_ah",
            dict(num_leaves=args.num_leaves, leaves_to_search=leaves, reorder=reorder),
        ),
    ]:
        path = os.path.join(workdir, name)
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        export_retrieval_model(model, gallery, path, k=K, index=name, **options)
        build = time.perf_counter() - start
        label = (
            name
            if not options
            else (f"tree_ah leaves={args.num_leaves}/{leaves} reorder={reorder}")
        )
        methods[label] = dict(
            kind="savedmodel",
            exact=not options,
            model=load_retrieval_model(path),
            build=build,
            mb=dir_mb(path),
        )
        print(
            f"{label}: exported in {build:.1f} s, {methods[label]['mb']:.0f} MB",
            flush=True,
        )
    if not args.skip_faiss:
        for name, index, build, faiss in faiss_methods(gallery, queries, exact, args):
            methods[name] = dict(
                kind="faiss",
                exact="Flat" in name,
                model=index,
                build=build,
                mb=len(faiss.serialize_index(index)) / 2**20,
            )

    def batched(method):
        found = []
        timed = queries[: args.exact_queries] if method["exact"] else queries
        start = time.perf_counter()
        for s in range(0, len(timed), args.batch):
            chunk = timed[s : s + args.batch]
            if method["kind"] == "faiss":
                found.append(method["model"].search(chunk, K)[1])
            else:
                found.append(method["model"].search_embeddings(chunk)["ids"])
        seconds = time.perf_counter() - start
        return len(timed) / seconds, np.concatenate(found)

    qps = {name: [] for name in methods}
    recalls = {}
    for _ in range(args.repeats):
        for name, method in methods.items():
            rate, found = batched(method)
            qps[name].append(rate)
            recalls[name] = recall(found, exact[: len(found)])
        print(f"  load {os.getloadavg()[0]:.1f}", flush=True)

    images = np.random.default_rng(3).uniform(0, 255, (50, *IMAGE)).astype("float32")
    latency = {n: [] for n, m in methods.items() if m["kind"] == "savedmodel"}
    # The embedding network alone (its own SavedModel), for reference.
    embed_path = os.path.join(workdir, "embedding_only")
    shutil.rmtree(embed_path, ignore_errors=True)
    embed = load_exported_embedder(export_embedding_model(model, embed_path))
    methods[NETWORK_ONLY] = dict(kind="network", model=embed, build=0.0, mb=0.0)
    latency[NETWORK_ONLY] = []
    for name in latency:
        methods[name]["model"](images[:1])  # warm-up
    for i in range(args.latency_samples):
        for name in latency:
            start = time.perf_counter()
            methods[name]["model"](images[i % 50 : i % 50 + 1])
            latency[name].append(1e3 * (time.perf_counter() - start))

    base = np.median(qps["brute_force"])
    print(
        f"\n{args.n:,} x {DIM} gallery, {len(queries):,} queries, k={K}, batches of "
        f"{args.batch}, {args.repeats} repeats; load now {os.getloadavg()}\n"
    )
    print(
        "| method | build + write s | index MB | batched queries/s [min-max] "
        "| vs brute force | single-image p50 ms | p99 ms | recall@10 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, method in methods.items():
        lat = latency.get(name)
        if name == NETWORK_ONLY:
            print(
                f"| {name} | - | - | - | - | {np.percentile(lat, 50):.1f} | "
                f"{np.percentile(lat, 99):.1f} | - |"
            )
            continue
        rates = qps[name]
        p50, p99 = (
            (f"{np.percentile(lat, 50):.1f}", f"{np.percentile(lat, 99):.1f}")
            if lat
            else ("-", "-")
        )
        print(
            f"| {name} | {method['build']:.1f} | {method['mb']:.0f} | "
            f"{np.median(rates):,.0f} [{min(rates):,.0f}-{max(rates):,.0f}] | "
            f"{np.median(rates) / base:.1f}x | {p50} | {p99} | {recalls[name]:.4f} |"
        )
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
