"""Per-worker input: each worker decodes only its own replicas' rows.

This file, run as a script, is a training process: either one worker of two on
127.0.0.1 (MultiWorkerMirroredStrategy, TF_CONFIG set) or one process with two
logical CPU devices (MirroredStrategy). It counts the images its input pipeline
decodes over a finite P x K stream, records what each of its replicas received,
then trains with `fit` on the per-worker stream and dumps weights and memory to
an .npz. The tests check the rows against the seeded P x K indices and the
training against one device on the same global batches.

The crops cover the whole image at its size and there are no flips, so images
come out as they went in; the first pixel of image `i` is `i`, which names the
image a row was decoded from.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

P, K, SIZE, STEPS, EPOCHS, FIT_STEPS = 4, 2, 8, 5, 2, 3
MEMORY, WARMUP, SEED = 20, 1, 7
TIMEOUT = 600  # seconds for the processes, TensorFlow start-up included
# 7 classes with 1 to 7 images: classes smaller than K repeat images.
LABELS = np.repeat(np.arange(7) * 3 + 2, np.arange(1, 8))


def _image_set():
    from xbm_tf.data import ImageSet

    rng = np.random.default_rng(0)
    centers = rng.integers(0, 256, (LABELS.max() + 1, SIZE, SIZE, 1))
    noise = rng.integers(-40, 41, (len(LABELS), SIZE, SIZE, 1))
    images = np.clip(centers[LABELS] + noise, 0, 255).astype(np.uint8)
    images[:, 0, 0, 0] = np.arange(len(LABELS))
    return ImageSet(images, LABELS, name="pattern")


def _dataset(**kwargs):
    from xbm_tf.data import train_dataset

    return train_dataset(
        _image_set(),
        p=P,
        k=K,
        resize_size=SIZE,
        crop_size=SIZE,
        seed=SEED,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        flip=False,
        implementation="tf_image",
        **kwargs,
    )


def _build():
    import keras

    from xbm_tf import XBMContrastiveModel

    keras.utils.set_random_seed(0)
    embedder = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 1)),
            keras.layers.Rescaling(1 / 255.0),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(6),
        ]
    )
    model = XBMContrastiveModel(embedder, memory_size=MEMORY, xbm_start_step=WARMUP)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    return model


def _fit(model, dataset):
    history = model.fit(
        dataset, epochs=EPOCHS, steps_per_epoch=FIT_STEPS, verbose=0, shuffle=False
    )
    state = {f"memory/{v.name}": np.asarray(v) for v in model.memory.weights}
    state["weights"] = np.concatenate(
        [np.ravel(w) for w in model.embedding_model.get_weights()]
    )
    state["loss"] = np.asarray(history.history["loss"])
    return state


# ---------------------------------------------------------------- the process


def _process(out: Path, mode: str) -> None:
    import tensorflow as tf

    from xbm_tf.distribute import make_strategy

    if mode == "multiworker":
        strategy = make_strategy("multiworker")  # first: before other TF calls
        worker = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        name = f"worker{worker}"
    else:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        strategy = make_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
        worker, name = 0, "mirrored"
    from xbm_tf.data import pipeline

    decoded = []
    loader = pipeline._loader

    def counting_loader(image_set, channels):
        load = loader(image_set, channels)

        def record(index):
            decoded.append(int(index))
            return index

        def counted(index):
            index = tf.py_function(record, [index], tf.int64)
            return load(tf.ensure_shape(index, []))

        return counted

    pipeline._loader = counting_loader
    finite = strategy.distribute_datasets_from_function(
        lambda context: _dataset(num_steps=STEPS, input_context=context)
    )
    local = len(strategy.extended.worker_devices)
    replicas = {}  # global replica id -> [(image values, labels) per step]
    for images, labels in finite:
        for i, (x, y) in enumerate(
            zip(
                strategy.experimental_local_results(images),
                strategy.experimental_local_results(labels),
            )
        ):
            values = np.asarray(x)
            replicas.setdefault(worker * local + i, []).append(
                (np.rint(values[:, 0, 0, 0]).astype(np.int64), np.asarray(y))
            )
    pipeline._loader = loader
    result = {"decoded": np.asarray(sorted(decoded), np.int64)}
    result["num_replicas"] = strategy.num_replicas_in_sync
    for replica, batches in replicas.items():
        result[f"images/{replica}"] = np.stack([b[0] for b in batches])
        result[f"labels/{replica}"] = np.stack([b[1] for b in batches])

    with strategy.scope():
        model = _build()
    infinite = strategy.distribute_datasets_from_function(
        lambda context: _dataset(input_context=context)
    )
    result.update(_fit(model, infinite))
    np.savez(out / f"{name}.npz", **result)


if __name__ == "__main__":
    _process(Path(sys.argv[1]), sys.argv[2])
    sys.exit(0)


# ---------------------------------------------------------------- the tests


def _run(run_processes, out: Path, mode: str, count: int) -> list[dict]:
    """Runs `count` processes of this file in `mode`; their results."""
    cluster = mode == "multiworker"
    run_processes(__file__, [out, mode], out, count, mode, TIMEOUT, cluster=cluster)
    names = ["mirrored"] if mode == "mirrored" else [f"worker{i}" for i in range(count)]
    results = []
    for name in names:
        with np.load(out / f"{name}.npz") as loaded:
            results.append({k: loaded[k] for k in loaded.files})
    return results


def _global_batches():
    from xbm_tf.data import PKSampler

    sampler = PKSampler(LABELS, p=P, k=K, seed=SEED)
    return np.stack([sampler.batch(step) for step in range(STEPS)])


def _check_replica_rows(results, replicas):
    """Each replica holds its rows of every global batch: whole classes."""
    batches = _global_batches()
    share = P * K // replicas
    held = {}
    for result in results:
        held.update({k: v for k, v in result.items() if k.startswith("images/")})
        for key in (k for k in result if k.startswith("labels/")):
            groups = result[key].reshape(STEPS, -1, K)
            assert (groups == groups[..., :1]).all(), key  # whole classes
    assert sorted(held) == [f"images/{r}" for r in range(replicas)]
    for r in range(replicas):
        want = batches[:, r * share : (r + 1) * share]
        np.testing.assert_array_equal(held[f"images/{r}"], want, err_msg=str(r))
        for result in results:
            if f"labels/{r}" in result:
                np.testing.assert_array_equal(result[f"labels/{r}"], LABELS[want])
    return batches


def _check_training(result, float32_gap):
    single = _build()
    want = _fit(single, _dataset())
    assert int(want["memory/count"]) == MEMORY  # 5 enqueues of 8 rows wrap 20
    assert np.abs(want["memory/embeddings"]).min() > 0
    # Replicas of 4 rows run other kernels than one device with 8 (oneDNN picks
    # them by batch shape), so they round differently. The sums on the way:
    # fan-ins 64 and 16, the L2 norm and the similarities over 6, each query's
    # 8 + 20 keys and the mean over 8 rows; backward, the 6- and 16-wide
    # products and the weight gradients over 8 rows: 158 terms in all. Six
    # steps of SGD (lr 0.05, momentum 0.9) carry the gradients' error into the
    # weights (conftest's float32_gap: 7.5e-5; seen: 3.5e-5 on AVX-512).
    gap = float32_gap(158, lr=0.05, steps=EPOCHS * FIT_STEPS, momentum=0.9)
    for key, value in want.items():
        np.testing.assert_allclose(result[key], value, rtol=gap, atol=gap, err_msg=key)


@pytest.mark.slow
def test_two_workers_decode_each_image_of_the_global_batch_once(
    tmp_path, run_processes, float32_gap
):
    workers = _run(run_processes, tmp_path, "multiworker", 2)
    batches = _check_replica_rows(workers, replicas=2)
    # Each worker decoded exactly its own rows of each step, each once.
    for index, worker in enumerate(workers):
        own = batches[:, index * P * K // 2 : (index + 1) * P * K // 2]
        np.testing.assert_array_equal(worker["decoded"], np.sort(own.ravel()))
    both = np.concatenate([w["decoded"] for w in workers])
    np.testing.assert_array_equal(np.sort(both), np.sort(batches.ravel()))
    np.testing.assert_array_equal(workers[0]["weights"], workers[1]["weights"])
    _check_training(workers[0], float32_gap)


@pytest.mark.slow
def test_mirrored_replicas_get_consecutive_rows_like_one_device(
    tmp_path, run_processes, float32_gap
):
    (result,) = _run(run_processes, tmp_path, "mirrored", 1)
    assert int(result["num_replicas"]) == 2
    batches = _check_replica_rows([result], replicas=2)
    np.testing.assert_array_equal(result["decoded"], np.sort(batches.ravel()))
    _check_training(result, float32_gap)


def test_input_context_shares_must_hold_whole_classes():
    import tensorflow as tf

    context = tf.distribute.InputContext(
        num_input_pipelines=1, input_pipeline_id=0, num_replicas_in_sync=8
    )
    with pytest.raises(ValueError, match="8 must split into 8 replicas of whole"):
        _dataset(input_context=context)
    # Two pipelines of one replica each: each pipeline gets its half.
    for index in range(2):
        context = tf.distribute.InputContext(2, index, 2)
        rows = [
            np.rint(np.asarray(x)[:, 0, 0, 0]).astype(np.int64)
            for x, _ in _dataset(num_steps=STEPS, input_context=context)
        ]
        half = P * K // 2
        want = _global_batches()[:, index * half : (index + 1) * half]
        np.testing.assert_array_equal(np.stack(rows), want)
