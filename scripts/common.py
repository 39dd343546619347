"""Flags and data set-up shared by scripts/train.py and scripts/evaluate.py.

Both scripts read the same flagfiles (configs/*.flags), so they define the same
flags here; the library (xbm_tf/) never reads flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from xbm_tf import data, distribute, losses, plots, retrieval
from xbm_tf.losses.base import PAIR_REDUCTIONS, hyper_parameters
from xbm_tf.terminate_on_nonfinite import NonFiniteLossError

DATASETS = ("quickstart", "glyphs", "cub", "cars196", "sop", "inshop", "vehicleid")

DATASET = flags.DEFINE_enum("dataset", None, DATASETS, "Dataset to train on.")
DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "The dataset's extracted folder (or TFDS data_dir with --tfds)."
)
TFDS = flags.DEFINE_bool(
    "tfds", False, "Read the dataset with tensorflow-datasets (cub, cars196, sop)."
)
VEHICLEID_TEST_SIZE = flags.DEFINE_enum(
    "vehicleid_test_size",
    "small",
    ["small", "medium", "large", "all"],
    "VehicleID test list: small (800 vehicles), medium (1,600), large (2,400); "
    "all (evaluate.py only) prints the three in one table.",
)
MAX_PER_CLASS = flags.DEFINE_integer(
    "max_per_class",
    None,
    "Keep at most this many images per class (quickstart, glyphs).",
)
WORKDIR = flags.DEFINE_string("workdir", None, "Output folder.")
OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace an existing output: train.py's --workdir/export, index.py's "
    "--output, a file at search.py's --grid that search.py did not write.",
)
# Input.
RESIZE = flags.DEFINE_integer("resize_size", 256, "Resize before cropping.")
CROP = flags.DEFINE_integer("crop_size", 224, "Crop size fed to the network.")
CHANNELS = flags.DEFINE_integer("channels", 3, "Image channels fed to the network.")
FLIP = flags.DEFINE_bool("flip", True, "Random horizontal flips in training.")
AUGMENTATION = flags.DEFINE_enum(
    "augmentation",
    "keras_cv",
    ["keras_cv", "tf_image"],
    "Random-resized-crop implementation: keras-cv (sequential map) or tf.image "
    "(stateless, parallel map; faster).",
)
P = flags.DEFINE_integer("p", 16, "Classes per batch.")
K = flags.DEFINE_integer("k", 4, "Images per class per batch.")
# Model.
BACKBONE = flags.DEFINE_enum(
    "backbone",
    "resnet50",
    ["resnet50", "mobilenet_v2", "efficientnet_b0", "tiny"],
    "Embedding trunk.",
)
WEIGHTS = flags.DEFINE_string(
    "weights", "imagenet", "'imagenet', 'none', or the path of a local weights file."
)
POOLING = flags.DEFINE_enum("pooling", "max", ["max", "avg"], "Global pooling.")
EMBEDDING_DIM = flags.DEFINE_integer("embedding_dim", 512, "Embedding size.")
MIXED = flags.DEFINE_enum(
    "mixed_precision",
    "none",
    ["none", "mixed_float16", "mixed_bfloat16"],
    "Trunk precision; embeddings, losses and memory stay float32.",
)
# XBM and loss.
LOSS = flags.DEFINE_enum(
    "loss", "contrastive", ["contrastive", "triplet", "multi_similarity"], "Pair loss."
)
# One flag per loss hyper-parameter; each default is the loss function's own.
_CONTRASTIVE = hyper_parameters(losses.contrastive_loss)
_TRIPLET = hyper_parameters(losses.triplet_loss)
_MS = hyper_parameters(losses.multi_similarity_loss)
CONTRASTIVE_NEG_MARGIN = flags.DEFINE_float(
    "contrastive_neg_margin",
    _CONTRASTIVE["neg_margin"],
    "Contrastive loss: negatives with cosine similarity at or below it cost nothing.",
)
CONTRASTIVE_PAIR_REDUCTION = flags.DEFINE_enum(
    "contrastive_pair_reduction",
    _CONTRASTIVE["pair_reduction"],
    list(PAIR_REDUCTIONS),
    "Contrastive loss: each query's sum over its pairs (the paper's; grows with "
    "the memory) or mean over its positives + mean over its active negatives.",
)
TRIPLET_MARGIN = flags.DEFINE_float(
    "triplet_margin",
    _TRIPLET["margin"],
    "Triplet loss: the required similarity gap between positive and negative.",
)
TRIPLET_MINING = flags.DEFINE_enum(
    "triplet_mining",
    _TRIPLET["mining"],
    ["hard", "semihard"],
    "Triplet loss: negative mining.",
)
TRIPLET_PAIR_REDUCTION = flags.DEFINE_enum(
    "triplet_pair_reduction",
    _TRIPLET["pair_reduction"],
    list(PAIR_REDUCTIONS),
    "Triplet loss: each query's mean over its positives' triplets (sum, the "
    "default) or over its active, non-zero triplets (mean).",
)
MS_ALPHA = flags.DEFINE_float(
    "ms_alpha", _MS["alpha"], "Multi-similarity loss: positive scale alpha (> 0)."
)
MS_BETA = flags.DEFINE_float(
    "ms_beta", _MS["beta"], "Multi-similarity loss: negative scale beta (> 0)."
)
MS_THRESHOLD = flags.DEFINE_float(
    "ms_threshold",
    _MS["threshold"],
    "Multi-similarity loss: similarity offset lambda.",
)
MS_EPSILON = flags.DEFINE_float(
    "ms_epsilon", _MS["epsilon"], "Multi-similarity loss: mining margin (>= 0)."
)
MARGIN = flags.DEFINE_float(
    "margin",
    None,
    "Removed: it meant a different thing for each loss. Use "
    "--contrastive_neg_margin or --triplet_margin.",
)
MEMORY_SIZE = flags.DEFINE_integer("memory_size", None, "Rows of the memory (M).")
XBM_WEIGHT = flags.DEFINE_float("xbm_weight", 1.0, "Weight of the memory loss.")
XBM_START = flags.DEFINE_integer(
    "xbm_start_step", 1000, "Optimizer step from which the memory is used."
)
MEMORY_DTYPE = flags.DEFINE_enum(
    "memory_dtype",
    "float32",
    ["float32", "bfloat16", "float16"],
    "Storage and matmul dtype of the memory's embeddings (half precision halves "
    "its bytes; the losses stay float32).",
)
# Optimisation.
OPTIMIZER = flags.DEFINE_enum("optimizer", "adam", ["adam", "sgd"], "Optimizer.")
LR = flags.DEFINE_float("learning_rate", 1e-4, "Initial learning rate.")
WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 5e-4, "Weight decay.")
MOMENTUM = flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
LR_DECAY_STEPS = flags.DEFINE_list(
    "lr_decay_steps",
    [],
    "Steps at which the learning rate is multiplied by --lr_decay_factor.",
)
LR_DECAY_FACTOR = flags.DEFINE_float("lr_decay_factor", 0.1, "Step decay factor.")
STEPS = flags.DEFINE_integer("steps", None, "Total training steps.")
STEPS_PER_EPOCH = flags.DEFINE_integer("steps_per_epoch", 500, "Steps per epoch.")
JIT = flags.DEFINE_bool("jit_compile", True, "Compile the train step with XLA.")
STRATEGY = flags.DEFINE_enum(
    "strategy",
    "default",
    distribute.STRATEGIES,
    "default | mirrored (all GPUs of this machine) | multiworker (the cluster in "
    "TF_CONFIG); --p x --k is the global batch.",
)
CPU_REPLICAS = flags.DEFINE_integer(
    "cpu_replicas",
    None,
    "With --strategy=mirrored: split the CPU into this many logical devices and "
    "mirror over them (a multi-replica run on a machine without GPUs).",
)
SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
BACKUP_EVERY = flags.DEFINE_integer(
    "backup_every_steps",
    100,
    "Back up the training state (atomically) every N steps and at epoch ends; a "
    "killed run resumes from the last backup when run again with the same command.",
)
# Evaluation.
EVAL_EVERY = flags.DEFINE_integer(
    "eval_every_epochs", 1, "Evaluate Recall@K every N epochs (and at the end)."
)
EVAL_BATCH = flags.DEFINE_integer("eval_batch_size", 128, "Evaluation batch size.")
EVAL_BACKEND = flags.DEFINE_enum(
    "eval_backend",
    "exact_rank",
    list(retrieval.ENGINES),
    "Search engine for every metric: exact_rank (exact; Recall@K by rank counting "
    "on TensorFlow matmul blocks), exact (TensorFlow top-k lists), scann (ScaNN "
    "brute force) or scann_ah (ScaNN tree + AH: approximate, labelled so).",
)
RECALL_KS = flags.DEFINE_list("recall_ks", ["1", "2", "4", "8"], "Recall@K values.")
# Feature drift (train.py).
DRIFT_EVERY = flags.DEFINE_integer(
    "drift_every_steps",
    0,
    "Embed a fixed probe set of training images every N optimizer steps and log "
    "its feature drift (drift@dt in log.csv and TensorBoard, feature_drift.png); "
    "0 = off.",
)
DRIFT_DELTAS = flags.DEFINE_list(
    "drift_deltas",
    ["10", "100", "1000"],
    "The dt (optimizer steps, multiples of --drift_every_steps) of drift@dt.",
)
DRIFT_PROBES = flags.DEFINE_integer(
    "drift_probes", 1000, "Training images in the feature-drift probe set."
)
VERBOSE = flags.DEFINE_enum(
    "verbose", "auto", ["auto", "0", "1", "2"], "Keras fit verbosity."
)
# Ablation (scripts/ablation.py): {without, with memory} x batch x memory x seed.
BATCH_SIZES = flags.DEFINE_list(
    "batch_sizes", None, "Ablation: batch sizes P x K (multiples of --k)."
)
MEMORY_SIZES = flags.DEFINE_list(
    "memory_sizes",
    None,
    "Ablation: memory sizes of the runs with memory (default: --memory_size).",
)
SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Ablation: random seeds.")
JOBS = flags.DEFINE_integer("jobs", 1, "Ablation: train.py runs at a time.")
REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Ablation: report the finished runs; train nothing."
)

LOADERS = {
    "quickstart": lambda root, max_per_class: data.load_quickstart(
        max_per_class=max_per_class
    ),
    "glyphs": lambda root, max_per_class: data.load_glyphs(max_per_class=max_per_class),
    "cub": lambda root, _: data.load_cub(root),
    "cars196": lambda root, _: data.load_cars196(root),
    "sop": lambda root, _: data.load_sop(root),
    "inshop": lambda root, _: data.load_inshop(root),
    "vehicleid": lambda root, _: data.load_vehicleid(
        root, test_size=VEHICLEID_TEST_SIZE.value
    ),
}
# Datasets that install with the package (no --data_dir).
PACKAGED_DATASETS = ("quickstart", "glyphs")
TFDS_NAMES = {
    "cub": "caltech_birds2011",
    "cars196": "cars196",
    "sop": "stanford_online_products",
}


class FlagError(ValueError):
    """A flag value that cannot work, found before any long work starts."""


def require(*holders) -> None:
    """Raises FlagError naming every flag of `holders` that has no value."""
    missing = [f"--{h.name}" for h in holders if h.value is None]
    if missing:
        raise FlagError(f"missing required flag(s): {', '.join(missing)}")


def check_finite_floats() -> None:
    """Raises FlagError for a NaN or infinite value of any float flag."""
    for name in sorted(set(flags.FLAGS)):
        flag = flags.FLAGS[name]
        if isinstance(flag.parser, flags.FloatParser) and flag.value is not None:
            if not math.isfinite(flag.value):
                raise FlagError(f"--{name}={flag.value} is not a finite number")


def check_positive(*holders) -> None:
    """Raises FlagError naming the first of `holders` set to a value <= 0."""
    for holder in holders:
        if holder.value is not None and holder.value <= 0:
            raise FlagError(f"--{holder.name}={holder.value} must be positive")


def check_loss_flags() -> None:
    """Checks the loss and memory hyper-parameters for sense."""
    if MARGIN.value is not None:
        raise FlagError(
            f"--margin={MARGIN.value} is ambiguous and no longer read: use "
            "--contrastive_neg_margin (contrastive) or --triplet_margin (triplet)"
        )
    for holder in (CONTRASTIVE_NEG_MARGIN, MS_THRESHOLD):
        if not -1.0 <= holder.value <= 1.0:
            raise FlagError(
                f"--{holder.name}={holder.value} is a cosine similarity threshold: "
                "it must lie in [-1, 1]"
            )
    check_positive(MS_ALPHA, MS_BETA)
    for holder in (TRIPLET_MARGIN, MS_EPSILON, XBM_WEIGHT):
        if holder.value < 0:
            raise FlagError(f"--{holder.name}={holder.value} must be >= 0")


def check_data_flags() -> None:
    """Checks the data and evaluation flags, before anything is loaded."""
    check_finite_floats()
    require(DATASET)
    check_positive(RESIZE, CROP, CHANNELS, EVAL_BATCH, EVAL_EVERY, MAX_PER_CLASS)
    if CROP.value > RESIZE.value:
        raise FlagError(
            f"--crop_size={CROP.value} is larger than --resize_size={RESIZE.value}"
        )
    if DATASET.value not in PACKAGED_DATASETS and not DATA_DIR.value:
        raise FlagError(f"--dataset={DATASET.value} needs --data_dir")
    if DATA_DIR.value and not os.path.isdir(DATA_DIR.value):
        raise FlagError(f"--data_dir={DATA_DIR.value} is not a folder")
    if TFDS.value and DATASET.value not in TFDS_NAMES:
        raise FlagError(
            f"--tfds supports --dataset in {sorted(TFDS_NAMES)}, not {DATASET.value}"
        )
    if any(k < 1 for k in recall_ks()):
        raise FlagError(f"--recall_ks must be positive, got {RECALL_KS.value}")


def check_strategy_flags() -> None:
    """Checks --strategy and --cpu_replicas, before TensorFlow sets up devices."""
    if CPU_REPLICAS.value is None:
        return
    if STRATEGY.value != "mirrored":
        raise FlagError(
            f"--cpu_replicas={CPU_REPLICAS.value} needs --strategy=mirrored, not "
            f"--strategy={STRATEGY.value}"
        )
    if CPU_REPLICAS.value < 1:
        raise FlagError(f"--cpu_replicas={CPU_REPLICAS.value} must be positive")


def make_strategy():
    """The strategy of --strategy (and --cpu_replicas); make it first of all."""
    check_strategy_flags()
    try:
        return distribute.make_strategy(STRATEGY.value, cpu_replicas=CPU_REPLICAS.value)
    except ValueError as error:  # a bad TF_CONFIG, or devices set up already
        raise FlagError(f"--strategy={STRATEGY.value}: {error}") from None


def drift_deltas() -> list[int]:
    """--drift_deltas as integers, checked against --drift_every_steps."""
    try:
        deltas = [int(dt) for dt in DRIFT_DELTAS.value]
    except ValueError:
        raise FlagError(
            f"--drift_deltas must be integers, got {DRIFT_DELTAS.value}"
        ) from None
    every = DRIFT_EVERY.value
    if not deltas or any(dt < 1 or dt % every for dt in deltas):
        raise FlagError(
            f"--drift_deltas={','.join(DRIFT_DELTAS.value)} must be positive "
            f"multiples of --drift_every_steps={every}"
        )
    return deltas


def recall_ks() -> list[int]:
    try:
        return [int(k) for k in RECALL_KS.value]
    except ValueError:
        raise FlagError(
            f"--recall_ks must be integers, got {RECALL_KS.value}"
        ) from None


def vehicleid_test_sizes() -> list[str]:
    """The VehicleID test sizes --vehicleid_test_size asks for."""
    if VEHICLEID_TEST_SIZE.value == "all":
        return list(data.VEHICLEID_TEST_LISTS)
    return [VEHICLEID_TEST_SIZE.value]


EVALUATION_SPLITS = ("test", "query", "gallery")


def screen(image_set: data.ImageSet) -> data.ImageSet:
    """`image_set` without its corrupt image files, which are reported.

    Checked with `data.drop_corrupt_images` (cheap: two small reads per file);
    the count and the first five skipped files are printed. Call it before any
    long work starts. In-memory images are never corrupt.
    """
    if image_set.kind == "array":
        return image_set
    kept, skipped = data.drop_corrupt_images(image_set)
    if skipped:
        first = "; ".join(f"{p}: {why}" for p, why in list(skipped.items())[:5])
        print(
            f"Skipping {len(skipped)} corrupt image{'s' * (len(skipped) > 1)} of "
            f"{image_set.name} ({first})",
            flush=True,
        )
    return kept


def screen_splits(splits: data.RetrievalSplits, names) -> data.RetrievalSplits:
    """`splits` with the splits `names` screened (`screen`); others unchanged.

    Names of splits the dataset lacks (`test` of In-Shop) are passed over.
    """
    clean = {
        name: screen(getattr(splits, name))
        for name in names
        if getattr(splits, name) is not None
    }
    return dataclasses.replace(splits, **clean) if clean else splits


def load_splits(
    vehicleid_test_size: str | None = None, screen=EVALUATION_SPLITS
) -> data.RetrievalSplits:
    """Loads (indexes) the dataset, screens it and checks that the largest K fits.

    Args:
        vehicleid_test_size: for --dataset=vehicleid, this test size instead of
            --vehicleid_test_size.
        screen: the splits whose corrupt images are skipped and reported (see
            `screen_splits`): every split the caller reads.
    """
    if TFDS.value:
        splits = data.load_tfds(TFDS_NAMES[DATASET.value], data_dir=DATA_DIR.value)
    elif DATASET.value == "vehicleid" and vehicleid_test_size is not None:
        splits = data.load_vehicleid(DATA_DIR.value, test_size=vehicleid_test_size)
    else:
        splits = LOADERS[DATASET.value](DATA_DIR.value, MAX_PER_CLASS.value)
    splits = screen_splits(splits, screen)
    gallery = splits.test if splits.test is not None else splits.gallery
    largest = max(recall_ks())
    gallery_size = len(gallery) - (1 if splits.test is not None else 0)
    if largest > gallery_size:
        raise FlagError(
            f"--recall_ks asks for K={largest}, but the evaluation gallery has "
            f"{gallery_size} items"
        )
    return splits


def input_shape() -> tuple[int, int, int]:
    return (CROP.value, CROP.value, CHANNELS.value)


def make_eval_datasets(splits: data.RetrievalSplits):
    """`(query, gallery)` evaluation datasets; gallery is None for leave-one-out."""
    if splits.test is not None:
        return make_eval_dataset(splits.test), None
    return make_eval_dataset(splits.query), make_eval_dataset(splits.gallery)


def verbose() -> int | str:
    """The Keras verbosity from --verbose."""
    return "auto" if VERBOSE.value == "auto" else int(VERBOSE.value)


def _images(image_set: data.ImageSet, indices) -> np.ndarray:
    """The test-transformed images at `indices`, as a float32 array."""
    subset = image_set.subset(np.asarray(indices))
    batches = make_eval_dataset(subset)
    return np.concatenate([np.asarray(images) for images, _ in batches])


def make_eval_dataset(image_set: data.ImageSet):
    return data.eval_dataset(
        image_set,
        batch_size=EVAL_BATCH.value,
        resize_size=RESIZE.value,
        crop_size=CROP.value,
        channels=CHANNELS.value,
    )


def evaluate_and_plot(
    embeddings,
    splits: data.RetrievalSplits,
    out_dir: str,
    name: str,
    num_queries: int = 8,
    k: int = 5,
) -> dict[str, float]:
    """Recall@K, MAP@R and R-precision, plus two retrieval grid PNGs in `out_dir`.

    `retrieval_grid_{name}.png` shows queries spread evenly over the query set,
    `retrieval_grid_{name}_hardest.png` the queries whose first correct result
    ranks lowest (one more counting pass over the similarities, the cost of
    Recall@K), each with its top `k`.

    Args:
        embeddings: `(query, query_labels, gallery, gallery_labels)` as returned by
            `RetrievalEvaluation.embed()` (gallery entries None for leave-one-out).
        splits: the dataset, for the images of the grid.
        out_dir: where the grids are written.
        name: a tag for the files, e.g. "before" or "after".
    """
    query, query_labels, gallery, gallery_labels = embeddings
    metrics = retrieval.retrieval_metrics(
        query,
        query_labels,
        gallery,
        gallery_labels,
        ks=recall_ks(),
        backend=EVAL_BACKEND.value,
    )
    spread = np.linspace(0, len(query) - 1, min(num_queries, len(query))).astype(int)
    path = os.path.join(out_dir, f"retrieval_grid_{name}.png")
    _retrieval_grid(embeddings, splits, spread, k, path)
    ranks = retrieval.first_correct_ranks(query, query_labels, gallery, gallery_labels)
    hardest = np.argsort(-ranks, kind="stable")[:num_queries]
    hardest = hardest[ranks[hardest] >= 0]  # a class of one is never correct
    if hardest.size:
        path = os.path.join(out_dir, f"retrieval_grid_{name}_hardest.png")
        _retrieval_grid(embeddings, splits, hardest, k, path)
        absl_logging.info(
            "%s: the hardest queries' first correct results rank %s (0 = first)",
            path,
            ", ".join(str(r) for r in ranks[hardest]),
        )
    return metrics


def _retrieval_grid(embeddings, splits, chosen, k, path) -> None:
    """Draws the queries `chosen` with their top `k` (by `--eval_backend`)."""
    query, _, gallery, _ = embeddings
    leave_one_out = gallery is None
    query_set = splits.test if leave_one_out else splits.query
    gallery_set = splits.test if leave_one_out else splits.gallery
    neighbors, _ = retrieval.nearest_neighbors(
        query[chosen],
        query if leave_one_out else gallery,
        k=k + 1,
        backend=EVAL_BACKEND.value,
    )
    if leave_one_out:  # drop each query itself, by index
        neighbors = np.stack([row[row != q][:k] for row, q in zip(neighbors, chosen)])
    else:
        neighbors = neighbors[:, :k]
    shown, local = np.unique(neighbors, return_inverse=True)
    plots.plot_retrieval_grid(
        _images(query_set, chosen),
        query_set.labels[chosen],
        _images(gallery_set, shown),
        gallery_set.labels[shown],
        local.reshape(neighbors.shape),
        path,
        num_queries=len(chosen),
        k=k,
    )


def write_table(results: dict[str, dict[str, float]], out_dir: str) -> str:
    """Prints `{column: metrics}` as a table; writes JSON and a Recall@K PNG."""
    columns = list(results)
    keys = list(results[columns[-1]])
    lines = [f"{'':>12} " + " ".join(f"{c:>10}" for c in columns)]
    approximate = any(results[c].get("approximate") for c in columns)
    if approximate:
        lines.insert(0, "APPROXIMATE search (scann_ah): values may be below exact.")
    for key in keys:
        values = " ".join(f"{results[c].get(key, float('nan')):10.4f}" for c in columns)
        lines.append(f"{key:>12} {values}")
    print("\n".join(lines), flush=True)
    with open(os.path.join(out_dir, "retrieval.json"), "w") as f:
        json.dump(results, f, indent=2)
    title = "APPROXIMATE search (scann_ah)" if approximate else None
    plots.plot_recall_curve(
        results, os.path.join(out_dir, "recall_curve.png"), title=title
    )
    return "\n".join(lines)


def quiet_tensorflow() -> None:
    """Keeps TensorFlow's INFO chatter (SavedModel writing) off the console."""
    absl_logging.set_verbosity(absl_logging.WARNING)


def main(argv, run) -> None:
    """The scripts' `main`: one call of `run()`, flag and data errors as messages."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    quiet_tensorflow()
    try:
        run()
    except (FlagError, data.DatasetLayoutError, NonFiniteLossError) as error:
        raise SystemExit(f"error: {error}") from None
