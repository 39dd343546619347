"""Two workers on 127.0.0.1 train with MultiWorkerMirroredStrategy and one memory.

This file, run as a script with a TF_CONFIG, is the worker: it trains a few steps
and dumps its memory, weights and logs to `<out>/worker<i>.npz`. The test starts
two workers, waits a bounded time, and compares the workers with each other and
with one device trained on the same global batches.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

DIM_IN, DIM_OUT, BATCH = 12, 6, 8
MEMORY, WARMUP, EPOCHS, STEPS = 28, 2, 2, 6  # 10 enqueues of 8 rows wrap 28 rows
TIMEOUT = 240  # seconds for both workers, TensorFlow start-up included


def _data(n=STEPS * BATCH, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int32)
    centers = rng.normal(size=(classes, DIM_IN))
    x = centers[labels] + 0.5 * rng.normal(size=(n, DIM_IN))
    return x.astype(np.float32), labels


def _build(seed=0):
    import keras

    from xbm_tf import XBMContrastiveModel

    keras.utils.set_random_seed(seed)
    embedder = keras.Sequential(
        [
            keras.Input((DIM_IN,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(DIM_OUT),
        ]
    )
    model = XBMContrastiveModel(embedder, memory_size=MEMORY, xbm_start_step=WARMUP)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    return model


def _train(model, callbacks=()):
    """Fits `model` on the same global batches in every process; the history."""
    import tensorflow as tf

    x, y = _data()
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True)
    history = model.fit(
        train.repeat(),
        epochs=EPOCHS,
        steps_per_epoch=STEPS,
        verbose=0,
        callbacks=list(callbacks),
    )
    return history.history


def _eval_data():
    import tensorflow as tf

    x, y = _data(61, seed=3)  # ends on a partial batch of 5 rows
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)


def _state(model):
    state = {f"memory/{v.name}": np.asarray(v) for v in model.memory.weights}
    state["weights"] = np.concatenate(
        [np.ravel(w) for w in model.embedding_model.get_weights()]
    )
    state["iterations"] = int(model.optimizer.iterations.numpy())
    return state


# ---------------------------------------------------------------- the worker


def _worker(out: Path) -> None:
    from xbm_tf.distribute import make_strategy, replica_batch_size, worker_path

    strategy = make_strategy("multiworker")  # first: before any other TF call
    import keras
    import tensorflow as tf

    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    res = {"replicas": strategy.num_replicas_in_sync}
    x, y = _data()
    once = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True)
    res["replica_batch"] = replica_batch_size(once.repeat(), strategy)
    try:
        replica_batch_size(once, strategy)
    except ValueError as error:
        res["finite_error"] = str(error)

    with strategy.scope():
        model = _build()
    backup = worker_path(str(out / "backup"), strategy)
    res["backup_dir"] = backup
    started = time.perf_counter()
    backup_callback = keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)
    history = _train(model, [backup_callback])
    res["fit_seconds"] = time.perf_counter() - started
    res.update({f"history/{k}": v for k, v in history.items()})
    res.update(_state(model))
    res["eval"] = model.evaluate(_eval_data(), verbose=0, return_dict=True)["loss"]

    # A fresh model restores the finished run from this worker's backup.
    with strategy.scope():
        resumed = _build(seed=1)
        resumed(x[:1])
    resumed_history = _train(
        resumed, [keras.callbacks.BackupAndRestore(backup, delete_checkpoint=False)]
    )
    res["resumed/epochs_run"] = len(resumed_history.get("loss", []))
    res.update({f"resumed/{k}": v for k, v in _state(resumed).items()})
    np.savez(out / f"worker{task}.npz", **{k: np.asarray(v) for k, v in res.items()})


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
    sys.exit(0)


# ---------------------------------------------------------------- the test


@pytest.mark.slow
def test_two_workers_share_one_memory_equal_to_one_device(
    tmp_path, run_processes, float32_gap
):
    run_processes(__file__, [tmp_path], tmp_path, 2, "worker", TIMEOUT)
    workers = []
    for index in range(2):
        with np.load(tmp_path / f"worker{index}.npz") as results:
            workers.append({k: results[k] for k in results.files})
    first, second = workers
    assert int(first["replicas"]) == 2 and int(first["replica_batch"]) == BATCH // 2
    assert "must repeat for ever" in str(first["finite_error"])
    for name in ("embeddings", "labels", "count", "pointer"):
        np.testing.assert_array_equal(
            first[f"memory/{name}"], second[f"memory/{name}"], err_msg=name
        )
    np.testing.assert_array_equal(first["weights"], second["weights"])

    # One device, the same global batches.
    single = _build()
    history = _train(single)
    want = _state(single)
    assert int(want["memory/count"]) == MEMORY
    assert int(want["memory/pointer"]) == (EPOCHS * STEPS - WARMUP) * BATCH % MEMORY
    # A worker's replica of 4 rows runs other kernels than one device with 8
    # (oneDNN picks them by batch shape), which round in another order. The
    # sums on the way: fan-ins 12 and 16, the L2 norm and the similarities over
    # 6, each query's 8 + 28 keys and the mean over 8 rows; backward, the 6- and
    # 16-wide products and the weight gradients over 8 rows: 114 terms. Twelve
    # steps of SGD (lr 0.05, momentum 0.9) carry the gradients' error into the
    # weights (conftest's float32_gap): 9.5e-5.
    gap = float32_gap(114, lr=0.05, steps=EPOCHS * STEPS, momentum=0.9)
    for key, value in want.items():
        np.testing.assert_allclose(first[key], value, rtol=gap, atol=gap, err_msg=key)
    for key in ("loss", "batch_loss", "xbm_loss", "memory_fill"):
        np.testing.assert_allclose(
            first[f"history/{key}"], history[key], rtol=gap, atol=gap, err_msg=key
        )
    assert history["xbm_loss"][-1] > 0
    evaluation = single.evaluate(_eval_data(), verbose=0, return_dict=True)["loss"]
    assert float(first["eval"]) == pytest.approx(evaluation, rel=gap)

    # Each worker backed up to its own path; the chief's backup holds the memory.
    assert str(first["backup_dir"]) == str(tmp_path / "backup")
    assert str(second["backup_dir"]) == str(tmp_path / "workertemp_worker_1" / "backup")
    for worker in workers:  # and each worker restored its own backup
        assert int(worker["resumed/epochs_run"]) == 0
        for key in want:
            np.testing.assert_array_equal(worker[f"resumed/{key}"], worker[key])
    restored = _build(seed=2)
    restored(np.zeros((1, DIM_IN), np.float32))
    restored.optimizer.build(restored.trainable_variables)
    restored.load_weights(tmp_path / "backup" / "latest.weights.h5")
    np.testing.assert_array_equal(
        np.asarray(restored.memory.embeddings), first["memory/embeddings"]
    )
    assert (tmp_path / "workertemp_worker_1" / "backup" / "latest.weights.h5").exists()
