"""xbm_tf.distribute and XBMContrastiveModel under MirroredStrategy on 2 CPU devices.

Logical devices must be configured before TensorFlow initialises its devices, which
other test modules of this pytest process have already done. So the mirrored
checks run once, in a fresh process (this file run as a script); it writes every
number to an .npz that the tests below compare.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xbm_tf.distribute import (
    make_strategy,
    parse_tf_config,
    replica_batch_size,
    worker_path,
)

DIM_IN, DIM_OUT, BATCH = 12, 6, 8
MEMORY, WARMUP, EPOCHS, ROWS = 28, 2, 2, 48  # 10 enqueues of 8 rows wrap 28 rows
REPO = Path(__file__).resolve().parents[1]


def _data(n=ROWS, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int32)
    centers = rng.normal(size=(classes, DIM_IN))
    x = centers[labels] + 0.5 * rng.normal(size=(n, DIM_IN))
    return x.astype(np.float32), labels


# ---------------------------------------------------------------- the subprocess


def _mirrored_checks(out: Path) -> None:
    """Single device vs MirroredStrategy on 2 logical CPUs; saves every result."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )
    import keras

    from xbm_tf import XBMContrastiveModel

    strategy = make_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
    x, y = _data()
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH, drop_remainder=True)
    res = {"replicas": strategy.num_replicas_in_sync}
    res["replica_batch"] = replica_batch_size(train, strategy)
    try:
        replica_batch_size(train.unbatch().batch(9, drop_remainder=True), strategy)
    except ValueError as error:
        res["odd_batch_error"] = str(error)

    def build(seed, memory_dtype="float32", loss=None):
        keras.utils.set_random_seed(seed)
        embedder = keras.Sequential(
            [
                keras.Input((DIM_IN,)),
                keras.layers.Dense(
                    16,
                    activation="relu",
                    kernel_regularizer=keras.regularizers.L2(0.01),
                ),
                keras.layers.Dense(DIM_OUT),
            ]
        )
        model = XBMContrastiveModel(
            embedder,
            memory_size=MEMORY,
            xbm_start_step=WARMUP,
            memory_dtype=memory_dtype,
            loss=loss,
        )
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
        return model

    def in_scope(seed, memory_dtype="float32", loss=None):
        with strategy.scope():
            model = build(seed, memory_dtype, loss)
            model(x[:1])  # build the variables
        return model

    def copies(model):
        """Each memory variable as a stack of its per-replica values."""
        return {
            v.name: np.stack(
                [np.asarray(t) for t in strategy.experimental_local_results(v.value)]
            )
            for v in model.memory.weights
        }

    def save_state(prefix, model, history=None):
        for name, stack in copies(model).items():
            res[f"{prefix}/memory/{name}"] = stack
        res[f"{prefix}/weights"] = np.concatenate(
            [np.ravel(w) for w in model.embedding_model.get_weights()]
        )
        res[f"{prefix}/iterations"] = int(model.optimizer.iterations.numpy())
        if model.optimizer.built:
            res[f"{prefix}/optimizer"] = np.concatenate(
                [np.ravel(v) for v in model.optimizer.variables]
            )
        for key, values in (history or {}).items():
            res[f"{prefix}/history/{key}"] = np.asarray(values)

    # Same global batches on one device and on two replicas.
    started = time.perf_counter()
    single = build(0)
    res["init/weights"] = np.concatenate(
        [np.ravel(w) for w in single.embedding_model.get_weights()]
    )
    history = single.fit(train, epochs=EPOCHS, verbose=0, shuffle=False)
    save_state("single", single, history.history)
    res["single_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    mirrored = in_scope(0)
    history = mirrored.fit(train, epochs=EPOCHS, verbose=0)
    save_state("mirrored", mirrored, history.history)
    res["mirrored_seconds"] = time.perf_counter() - started

    # A bfloat16 memory (stored as uint16 bit patterns) on one device and two.
    halves = (
        ("single_half", build(0, "bfloat16")),
        ("mirrored_half", in_scope(0, "bfloat16")),
    )
    for prefix, model in halves:
        model.fit(train, epochs=EPOCHS, verbose=0, shuffle=False)
        save_state(prefix, model)
        res[f"{prefix}/decoded"] = tf.cast(model.memory.read()[0], "float32").numpy()

    # pair_reduction="mean": each query's counts are over the global batch and
    # the memory, so two replicas give one device's losses and weights.
    from xbm_tf import ContrastiveLoss

    for prefix, model in (
        ("single_mean", build(0, loss=ContrastiveLoss(pair_reduction="mean"))),
        ("mirrored_mean", in_scope(0, loss=ContrastiveLoss(pair_reduction="mean"))),
    ):
        history = model.fit(train, epochs=EPOCHS, verbose=0, shuffle=False)
        save_state(prefix, model, history.history)

    # Evaluation ending on a partial batch of 5 rows, split 3 + 2 over replicas.
    xe, ye = _data(61, seed=3)
    val = tf.data.Dataset.from_tensor_slices((xe, ye)).batch(BATCH)
    res["eval/single"] = single.evaluate(val, verbose=0, return_dict=True)["loss"]
    res["eval/mirrored"] = mirrored.evaluate(val, verbose=0, return_dict=True)["loss"]

    # tf.train.Checkpoint written under the strategy, read under it and outside it.
    path = tf.train.Checkpoint(model=mirrored).write(str(out / "ckpt"))
    restored = in_scope(7)
    with strategy.scope():
        restored.optimizer.build(restored.trainable_variables)
    tf.train.Checkpoint(model=restored).read(path).assert_existing_objects_matched()
    save_state("ckpt", restored)
    plain = build(8)
    plain(x[:1])
    plain.optimizer.build(plain.trainable_variables)
    tf.train.Checkpoint(model=plain).read(path).assert_existing_objects_matched()
    res["ckpt_plain/memory/embeddings"] = np.asarray(plain.memory.embeddings)[None]

    # BackupAndRestore: interrupted after epoch 1 of 2, resumed by a fresh model.
    class Interrupt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("interrupted")

    backup = str(out / "backup")
    try:
        in_scope(0).fit(
            train,
            epochs=EPOCHS,
            verbose=0,
            callbacks=[keras.callbacks.BackupAndRestore(backup), Interrupt()],
        )
    except RuntimeError:
        pass
    resumed = in_scope(9)
    history = resumed.fit(
        train,
        epochs=EPOCHS,
        verbose=0,
        callbacks=[keras.callbacks.BackupAndRestore(backup)],
    )
    save_state("backup", resumed, history.history)

    # .keras file saved under the strategy, loaded under it.
    mirrored.save(out / "model.keras")
    with strategy.scope():
        loaded = keras.models.load_model(out / "model.keras")
    save_state("loaded", loaded)

    np.savez(out / "results.npz", **{k: np.asarray(v) for k, v in res.items()})


if __name__ == "__main__":
    _mirrored_checks(Path(sys.argv[1]))
    sys.exit(0)


# ---------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """The results of the subprocess (~40 s of CPU, shared by the slow tests)."""
    out = tmp_path_factory.mktemp("mirrored")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + sys.path))
    proc = subprocess.run(
        [sys.executable, __file__, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode:
        pytest.fail(f"mirrored checks failed:\n{proc.stderr[-4000:]}")
    with np.load(out / "results.npz") as results:
        return {k: results[k] for k in results.files}


def _replica_gap(float32_gap):
    """How far two replicas of 4 rows may train away from one device with 8.

    They run other kernels (oneDNN picks them by batch shape), which round in
    another order. The sums on the way: fan-ins 12 and 16, the L2 norm and the
    similarities over 6, each query's 8 + 28 keys and the mean over 8 rows, the
    L2 penalty over 192 weights; backward, the 6- and 16-wide products and the
    weight gradients over 8 rows: 306 terms. Twelve steps of SGD (lr 0.05,
    momentum 0.9) carry the gradients' error into the weights: 2.6e-4.
    """
    return float32_gap(306, lr=0.05, steps=EPOCHS * ROWS // BATCH, momentum=0.9)


def _assert_memory(res, prefix, want="single", rtol=0.0, atol=0.0):
    for name in ("embeddings", "labels", "count", "pointer"):
        got, ref = res[f"{prefix}/memory/{name}"], res[f"{want}/memory/{name}"][0]
        for replica, copy in enumerate(got):
            np.testing.assert_allclose(
                copy, ref, rtol=rtol, atol=atol, err_msg=f"{prefix} {name} {replica}"
            )


@pytest.mark.slow
def test_two_replicas_keep_identical_memories_equal_to_one_device(
    mirrored, float32_gap
):
    assert mirrored["replicas"] == 2 and mirrored["replica_batch"] == BATCH // 2
    copies = mirrored["mirrored/memory/embeddings"]
    assert copies.shape == (2, MEMORY, DIM_OUT)
    for name in ("embeddings", "labels", "count", "pointer"):
        first, second = mirrored[f"mirrored/memory/{name}"]
        np.testing.assert_array_equal(first, second, err_msg=name)
    # The memory wrapped: 10 enqueues of 8 global rows into 28 rows.
    enqueued = (EPOCHS * ROWS // BATCH - WARMUP) * BATCH
    assert int(mirrored["single/memory/count"][0]) == MEMORY
    assert int(mirrored["single/memory/pointer"][0]) == enqueued % MEMORY
    assert np.all(np.linalg.norm(copies[0], axis=1) > 0.99)  # every row written
    gap = _replica_gap(float32_gap)
    _assert_memory(mirrored, "mirrored", rtol=gap, atol=gap)


@pytest.mark.slow
def test_the_mean_pair_reduction_matches_one_device(mirrored):
    for key in ("loss", "batch_loss", "xbm_loss", "neg_similarity"):
        np.testing.assert_allclose(
            mirrored[f"mirrored_mean/history/{key}"],
            mirrored[f"single_mean/history/{key}"],
            rtol=1e-5,
            atol=1e-6,
        )
    assert mirrored["single_mean/history/xbm_loss"][-1] > 0
    # The mean is not the sum: a different scale, so different losses.
    assert not np.allclose(
        mirrored["single_mean/history/loss"], mirrored["single/history/loss"]
    )
    np.testing.assert_allclose(
        mirrored["mirrored_mean/weights"],
        mirrored["single_mean/weights"],
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.slow
def test_two_replicas_keep_identical_bfloat16_memories(mirrored):
    bits = mirrored["mirrored_half/memory/embeddings"]
    assert bits.dtype == np.uint16 and bits.shape == (2, MEMORY, DIM_OUT)
    for name in ("embeddings", "labels", "count", "pointer"):
        first, second = mirrored[f"mirrored_half/memory/{name}"]
        np.testing.assert_array_equal(first, second, err_msg=name)
    decoded = mirrored["mirrored_half/decoded"]
    assert np.all(np.abs(np.linalg.norm(decoded, axis=1) - 1) < 2.0**-6)
    # One device and two replicas round the bfloat16 similarities alike up to a
    # step here and there; after 10 steps the rows agree to a few such steps.
    np.testing.assert_allclose(decoded, mirrored["single_half/decoded"], atol=2.0**-5)
    for name in ("labels", "count", "pointer"):
        np.testing.assert_array_equal(
            mirrored[f"mirrored_half/memory/{name}"][0],
            mirrored[f"single_half/memory/{name}"][0],
        )


@pytest.mark.slow
def test_losses_and_weights_match_one_device(mirrored, float32_gap):
    gap = _replica_gap(float32_gap)
    keys = ("loss", "batch_loss", "xbm_loss", "neg_similarity", "memory_fill")
    for key in keys:
        single = mirrored[f"single/history/{key}"]
        np.testing.assert_allclose(
            mirrored[f"mirrored/history/{key}"], single, rtol=gap, atol=gap
        )
    assert mirrored["single/history/xbm_loss"][0] > 0
    np.testing.assert_allclose(
        mirrored["mirrored/weights"], mirrored["single/weights"], rtol=gap, atol=gap
    )
    assert int(mirrored["mirrored/iterations"]) == EPOCHS * ROWS // BATCH
    # Training moved the weights: this is not a comparison of two initialisations.
    assert np.abs(mirrored["mirrored/weights"] - mirrored["init/weights"]).max() > 0.01


@pytest.mark.slow
def test_evaluation_with_uneven_last_batch_matches_one_device(mirrored, float32_gap):
    assert float(mirrored["eval/mirrored"]) == pytest.approx(
        float(mirrored["eval/single"]), rel=_replica_gap(float32_gap)
    )


@pytest.mark.slow
def test_checkpoint_under_strategy_restores_every_replica(mirrored):
    _assert_memory(mirrored, "ckpt", want="mirrored")
    np.testing.assert_array_equal(
        mirrored["ckpt/weights"], mirrored["mirrored/weights"]
    )
    np.testing.assert_array_equal(
        mirrored["ckpt/optimizer"], mirrored["mirrored/optimizer"]
    )
    np.testing.assert_array_equal(
        mirrored["ckpt_plain/memory/embeddings"][0],
        mirrored["mirrored/memory/embeddings"][0],
    )


@pytest.mark.slow
def test_backup_and_restore_resumes_with_the_memory(mirrored):
    # Only the second epoch ran after the restore, and it ends where an
    # uninterrupted run ends.
    assert mirrored["backup/history/loss"].shape == (1,)
    assert int(mirrored["backup/iterations"]) == EPOCHS * ROWS // BATCH
    _assert_memory(mirrored, "backup", want="mirrored", atol=1e-6)
    np.testing.assert_allclose(
        mirrored["backup/weights"], mirrored["mirrored/weights"], atol=1e-6
    )


@pytest.mark.slow
def test_keras_file_round_trip_under_strategy(mirrored):
    _assert_memory(mirrored, "loaded", want="mirrored")
    np.testing.assert_array_equal(
        mirrored["loaded/weights"], mirrored["mirrored/weights"]
    )
    # Momentum and step count too, so training resumes where it stopped.
    np.testing.assert_array_equal(
        mirrored["loaded/optimizer"], mirrored["mirrored/optimizer"]
    )
    assert int(mirrored["loaded/iterations"]) == EPOCHS * ROWS // BATCH


@pytest.mark.slow
def test_odd_global_batch_is_named(mirrored):
    assert "global batch size 9 is not divisible by the 2 replicas" in str(
        mirrored["odd_batch_error"]
    )


# ------------------------------------------------ in-process: no devices needed


def test_make_strategy_names_and_default():
    import tensorflow as tf

    assert make_strategy("default") is tf.distribute.get_strategy()
    with pytest.raises(ValueError, match="Unknown strategy 'tpu'"):
        make_strategy("tpu")
    with pytest.raises(ValueError, match="devices is only used by the 'mirrored'"):
        make_strategy("default", devices=["/cpu:0"])


def test_multiworker_without_tf_config_is_named(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable"):
        make_strategy("multiworker")
    monkeypatch.setenv("TF_CONFIG", "{cluster: 1")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        make_strategy("multiworker")


@pytest.mark.parametrize(
    "config, message",
    [
        ([1], "must be a JSON object"),
        ({"task": {"type": "worker", "index": 0}}, 'needs "cluster"'),
        ({"cluster": {"worker": ["a:1"], "ps": ["b:2"]}}, "job 'ps' is not used"),
        ({"cluster": {"worker": ["a"]}}, "list of 'host:port' strings"),
        ({"cluster": {"worker": ["a:1"]}}, 'needs "task"'),
        (
            {"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}},
            "task type 'chief' is not a job of the cluster",
        ),
        (
            {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker"}},
            "task index None is out of range for the 2 'worker'",
        ),
        (
            {
                "cluster": {"worker": ["a:1", "b:2"]},
                "task": {"type": "worker", "index": 2},
            },
            "task index 2 is out of range",
        ),
    ],
)
def test_bad_tf_config_is_named(config, message):
    with pytest.raises(ValueError, match=message):
        parse_tf_config(json.dumps(config))


def test_good_tf_config_parses():
    config = {
        "cluster": {"chief": ["a:1"], "worker": ["b:2", "c:3"]},
        "task": {"type": "worker", "index": 1},
    }
    assert parse_tf_config(json.dumps(config)) == config


def test_replica_batch_size_needs_a_static_batch():
    import tensorflow as tf

    x, y = _data()
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    assert replica_batch_size(ds.batch(8, drop_remainder=True)) == 8
    with pytest.raises(
        ValueError, match=r"no static size \(element shape \(None, 12\)"
    ):
        replica_batch_size(ds.batch(8))


def test_worker_path_is_the_path_without_a_cluster(tmp_path):
    assert worker_path(str(tmp_path / "backup")) == str(tmp_path / "backup")
