r"""Trains an embedding model with Cross-Batch Memory.

  python scripts/train.py --flagfile configs/quickstart.flags
  python scripts/train.py --flagfile configs/cub.flags --data_dir /data/CUB_200_2011

Everything is written to --workdir: TensorBoard logs, a CSV log, the last model
(checkpoints/last.keras), a backup that lets a killed run resume where it stopped
(memory included: run the same command again), the Recall@K before and after
training (retrieval.json, recall_curve.png, retrieval_grid_before.png and
retrieval_grid_after.png), timing.json, and the SavedModel of the embedding
network in workdir/export. With --drift_every_steps, the feature
drift of a fixed probe set of training images (drift@dt in log.csv and TensorBoard,
feature_drift.png).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app  # noqa: E402
from common import FlagError  # noqa: E402

from xbm_tf import (  # noqa: E402
    ContrastiveLoss,
    FeatureDrift,
    MultiSimilarityLoss,
    TripletLoss,
    XBMContrastiveModel,
    data,
    plots,
)
from xbm_tf.backbones import build_embedding_model  # noqa: E402
from xbm_tf.backup import TrainingBackup, fit_segments  # noqa: E402
from xbm_tf.distribute import (  # noqa: E402
    lost_workers,
    replica_batch_size,
    synchronize_batch_norm,
    worker_path,
)
from xbm_tf.export import export_embedding_model  # noqa: E402
from xbm_tf.optimization import make_optimizer  # noqa: E402
from xbm_tf.retrieval import RetrievalEvaluation  # noqa: E402
from xbm_tf.terminate_on_nonfinite import TerminateOnNonFinite  # noqa: E402


def check_train_flags() -> None:
    """Checks the training flags that need no data, before anything is loaded."""
    common.require(common.WORKDIR, common.MEMORY_SIZE, common.STEPS)
    common.check_data_flags()
    common.check_loss_flags()
    common.check_strategy_flags()
    common.check_positive(common.EMBEDDING_DIM, common.LR)
    if common.XBM_START.value < 0:
        raise FlagError(f"--xbm_start_step={common.XBM_START.value} must be >= 0")
    batch = common.P.value * common.K.value
    if common.P.value < 2 or common.K.value < 2:
        raise FlagError(
            f"--p={common.P.value} and --k={common.K.value}: a P x K batch needs at "
            "least 2 classes and 2 images per class (positives and negatives)"
        )
    if common.MEMORY_SIZE.value < batch:
        raise FlagError(
            f"--memory_size={common.MEMORY_SIZE.value} is smaller than the batch "
            f"--p x --k = {batch}: the memory must hold at least one batch"
        )
    if common.STEPS.value < 1 or common.STEPS_PER_EPOCH.value < 1:
        raise FlagError("--steps and --steps_per_epoch must be positive")
    if common.DRIFT_EVERY.value < 0 or common.DRIFT_PROBES.value < 1:
        raise FlagError(
            "--drift_every_steps must be >= 0 (0 = off) and --drift_probes >= 1"
        )
    if common.DRIFT_EVERY.value:
        common.drift_deltas()
    vehicleid = common.DATASET.value == "vehicleid"
    if vehicleid and common.VEHICLEID_TEST_SIZE.value == "all":
        raise FlagError(
            "--vehicleid_test_size=all is for evaluate.py; train.py evaluates on "
            "one test list (small, medium or large)"
        )
    if common.BACKUP_EVERY.value < 1:
        raise FlagError(
            f"--backup_every_steps={common.BACKUP_EVERY.value} must be positive"
        )
    weights = common.WEIGHTS.value
    if weights.lower() not in ("imagenet", "none") and not os.path.isfile(weights):
        raise FlagError(
            f"--weights={weights} is neither 'imagenet', 'none' nor an existing file"
        )
    export_dir = os.path.join(common.WORKDIR.value, "export")
    if os.path.isdir(export_dir) and os.listdir(export_dir):
        if not common.OVERWRITE.value:
            raise FlagError(
                f"{export_dir} already holds an export: pass --overwrite to replace "
                "it, or choose another --workdir"
            )


def make_train_dataset(splits: data.RetrievalSplits, strategy=None):
    """The infinite P x K training stream, after checking P against the classes.

    Returns `dataset(start_step=0)`: the stream from that step, a function of
    (--seed, step); under a strategy, distributed so that each worker decodes
    only its own replicas' rows of every global batch.
    """
    if common.P.value > splits.num_train_classes:
        raise FlagError(
            f"--p={common.P.value} classes per batch, but the training split has "
            f"only {splits.num_train_classes} classes"
        )
    train_set = splits.train

    def local(start_step=0, input_context=None):
        return data.train_dataset(
            train_set,
            p=common.P.value,
            k=common.K.value,
            resize_size=common.RESIZE.value,
            crop_size=common.CROP.value,
            channels=common.CHANNELS.value,
            flip=common.FLIP.value,
            implementation=common.AUGMENTATION.value,
            seed=common.SEED.value,
            start_step=start_step,
            input_context=input_context,
        )

    if strategy is not None:
        replica_batch_size(local(), strategy)  # divisible by the replicas, static

    def dataset(start_step=0):
        if common.STRATEGY.value == "default":
            return local(start_step)
        return strategy.distribute_datasets_from_function(
            lambda context: local(start_step, context)
        )

    return dataset


def build_model() -> XBMContrastiveModel:
    weights = common.WEIGHTS.value
    embedder = build_embedding_model(
        backbone=common.BACKBONE.value,
        embedding_dim=common.EMBEDDING_DIM.value,
        input_shape=common.input_shape(),
        weights=None if weights.lower() == "none" else weights,
        pooling=common.POOLING.value,
        mixed_precision=None if common.MIXED.value == "none" else common.MIXED.value,
    )
    if tf.distribute.get_strategy().num_replicas_in_sync > 1:
        # Each replica normalises with the global batch's statistics, as one
        # device trained on the global batch would.
        synchronize_batch_norm(embedder)
    losses = {
        "contrastive": lambda: ContrastiveLoss(
            neg_margin=common.CONTRASTIVE_NEG_MARGIN.value,
            pair_reduction=common.CONTRASTIVE_PAIR_REDUCTION.value,
        ),
        "triplet": lambda: TripletLoss(
            margin=common.TRIPLET_MARGIN.value,
            mining=common.TRIPLET_MINING.value,
            pair_reduction=common.TRIPLET_PAIR_REDUCTION.value,
        ),
        "multi_similarity": lambda: MultiSimilarityLoss(
            alpha=common.MS_ALPHA.value,
            beta=common.MS_BETA.value,
            threshold=common.MS_THRESHOLD.value,
            epsilon=common.MS_EPSILON.value,
        ),
    }
    model = XBMContrastiveModel(
        embedder,
        memory_size=common.MEMORY_SIZE.value,
        xbm_weight=common.XBM_WEIGHT.value,
        xbm_start_step=common.XBM_START.value,
        memory_dtype=common.MEMORY_DTYPE.value,
        loss=losses[common.LOSS.value](),
    )
    optimizer = make_optimizer(
        common.OPTIMIZER.value,
        learning_rate=common.LR.value,
        weight_decay=common.WEIGHT_DECAY.value,
        momentum=common.MOMENTUM.value,
        decay_steps=[int(s) for s in common.LR_DECAY_STEPS.value],
        decay_factor=common.LR_DECAY_FACTOR.value,
    )
    if common.MIXED.value == "mixed_float16":
        # float16 gradients underflow without loss scaling (train_step scales).
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(
        optimizer=optimizer,
        # XLA is not available under a tf.distribute strategy on this stack.
        jit_compile=common.JIT.value and common.STRATEGY.value == "default",
    )
    model(keras.ops.zeros((1, *common.input_shape())))
    return model


def make_drift(splits: data.RetrievalSplits, model, workdir: str):
    """The FeatureDrift callback of --drift_every_steps (None when 0)."""
    if not common.DRIFT_EVERY.value:
        return None
    return FeatureDrift(
        splits.train,
        deltas=common.drift_deltas(),
        every_n_steps=common.DRIFT_EVERY.value,
        num_probes=common.DRIFT_PROBES.value,
        seed=common.SEED.value,
        log_dir=os.path.join(workdir, "tensorboard"),
        embedding_model=model,
        batch_size=common.EVAL_BATCH.value,
        resize_size=common.RESIZE.value,
        crop_size=common.CROP.value,
        channels=common.CHANNELS.value,
    )


def make_callbacks(
    evaluation: RetrievalEvaluation,
    workdir: str,
    drift: FeatureDrift | None = None,
    steps_per_epoch: int | None = None,
) -> list:
    """Evaluation and drift first, so TensorBoard, CSV log, checkpoints see them.

    TerminateOnNonFinite stops at the first non-finite loss, before any epoch-end
    callback saves the bad weights; it counts full epochs of `steps_per_epoch`,
    so after a mid-epoch resume it names the run's true step.
    """
    return [
        TerminateOnNonFinite(steps_per_epoch=steps_per_epoch),
        evaluation,
        *([drift] if drift is not None else []),
        keras.callbacks.TensorBoard(os.path.join(workdir, "tensorboard")),
        keras.callbacks.CSVLogger(os.path.join(workdir, "log.csv"), append=True),
        keras.callbacks.ModelCheckpoint(
            os.path.join(workdir, "checkpoints", "last.keras")
        ),
        TrainingBackup(os.path.join(workdir, "backup"), common.BACKUP_EVERY.value),
    ]


class FitTimer(keras.callbacks.Callback):
    """Times `fit` (after any resume) and writes `timing.json` when it ends.

    A resumed run calls `fit` more than once (`fit_segments`): the time and the
    steps count from the first call's start.
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.start = None

    def on_train_begin(self, logs=None):
        if self.start is None:
            self.start = time.perf_counter()
            self.start_step = int(self.model.optimizer.iterations.numpy())

    def on_train_end(self, logs=None):
        seconds = time.perf_counter() - self.start
        steps = int(self.model.optimizer.iterations.numpy()) - self.start_step
        timing = dict(train_seconds=seconds, steps=steps, steps_per_second=0.0)
        if seconds > 0:
            timing["steps_per_second"] = steps / seconds
        with open(self.path, "w") as f:
            json.dump(timing, f, indent=2)


def run(extra_callbacks=()) -> dict:
    """Trains as the flags say; returns the final metrics."""
    check_train_flags()
    # A multi-worker strategy must be made before any other TensorFlow call.
    strategy = common.make_strategy()
    # Non-chief workers write their (required) copies beside the chief's workdir.
    workdir = worker_path(common.WORKDIR.value, strategy)
    replicas = strategy.num_replicas_in_sync
    if common.P.value % replicas:
        raise FlagError(
            f"--p={common.P.value} is not divisible by the {replicas} replicas: "
            "each replica must hold whole classes of --k images"
        )
    keras.utils.set_random_seed(common.SEED.value)
    # Screens every split read below (training, drift probes, evaluation).
    splits = common.load_splits(screen=("train", *common.EVALUATION_SPLITS))
    print(splits.describe(), flush=True)
    train = make_train_dataset(splits, strategy)
    query, gallery = common.make_eval_datasets(splits)
    os.makedirs(workdir, exist_ok=True)
    with strategy.scope():
        model = build_model()
    evaluation = RetrievalEvaluation(
        query,
        gallery_data=gallery,
        ks=common.recall_ks(),
        every_n_epochs=common.EVAL_EVERY.value,
        backend=common.EVAL_BACKEND.value,
        log_dir=os.path.join(workdir, "tensorboard"),
        embedding_model=model,
    )
    drift = make_drift(splits, model, workdir)
    before = common.evaluate_and_plot(evaluation.embed(), splits, workdir, "before")
    steps_per_epoch = min(common.STEPS_PER_EPOCH.value, common.STEPS.value)
    epochs = -(-common.STEPS.value // steps_per_epoch)
    callbacks = (
        make_callbacks(evaluation, workdir, drift, steps_per_epoch)
        + list(extra_callbacks)
        + [FitTimer(os.path.join(workdir, "timing.json"))]
    )
    backup = next(c for c in callbacks if isinstance(c, TrainingBackup))
    start = backup.restore(model)  # weights, optimizer, memory; the step done
    if start:
        print(f"Resuming from the backup at step {start}", flush=True)
        if common.AUGMENTATION.value == "keras_cv":
            print(
                "The P x K batches continue exactly; keras-cv crops and flips do "
                "not (use --augmentation=tf_image for an exact resume)",
                flush=True,
            )
    # Mid-epoch, a first fit finishes the epoch: the stream starts at the step.
    try:
        for first, initial, end, steps in fit_segments(start, steps_per_epoch, epochs):
            model.fit(
                train(first),
                initial_epoch=initial,
                epochs=end,
                steps_per_epoch=steps,
                callbacks=callbacks,
                verbose=common.verbose(),
                shuffle=False,  # the P x K stream is shuffled by its sampler
            )
    except tf.errors.OpError as error:
        lost = lost_workers(error) if common.STRATEGY.value == "multiworker" else []
        if not lost:
            raise
        print(
            f"error: lost contact with {', '.join(lost)}: killed, crashed or cut "
            "off. Start every worker again with its command: the run resumes "
            "from the backups.",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        # At once: TensorFlow's shutdown would wait for the dead worker (tens of
        # seconds); the backups on disk are complete (written atomically).
        os._exit(1)
    # The callback already embedded the test split after the last epoch, if it
    # evaluated then: reuse those embeddings rather than embed it again.
    last = evaluation.last_epoch_embeddings
    final = last[1] if last and last[0] == epochs - 1 else evaluation.embed()
    after = common.evaluate_and_plot(final, splits, workdir, "after")
    if drift is not None and drift.series:
        path = plots.plot_feature_drift(
            drift.series, os.path.join(workdir, "feature_drift.png")
        )
        print(f"Wrote the feature drift to {path}", flush=True)
    print("\nRetrieval on the unseen test classes:", flush=True)
    common.write_table({"before": before, "after": after}, workdir)
    export_dir = os.path.join(workdir, "export")
    export_embedding_model(
        model.embedding_model, export_dir, overwrite=common.OVERWRITE.value
    )
    print(f"Exported the embedding model to {export_dir}", flush=True)
    backup.delete()  # only now: a run killed before this point resumes
    return after


def main(argv):
    common.main(argv, run)


if __name__ == "__main__":
    app.run(main)
