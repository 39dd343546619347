"""Every documented option of the scripts, run end to end on configs/smoke.flags.

Each case of `TRAIN_CASES` runs scripts/train.py for a few steps with some of
the documented option values (combined so that each value runs at least once),
and checks that the option reached the model, that the run finishes and
exports with finite losses, and that scripts/evaluate.py on the export gives
the run's final Recall@K. Then scripts/index.py and scripts/search.py over
their options: --index=tree_ah (with its free slots, id -1 and score -inf,
through the SavedModel itself), --split=train, a .keras --model, In-Shop's
query and gallery splits, and --overwrite reruns.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import evaluate  # noqa: E402
import index  # noqa: E402
import search  # noqa: E402
import train  # noqa: E402
from script_data import INSHOP_ARGS, stop_after, write_inshop  # noqa: E402

from xbm_tf import MultiSimilarityLoss, TripletLoss, data  # noqa: E402
from xbm_tf.backbones import build_embedding_model  # noqa: E402
from xbm_tf.export import export_embedding_model  # noqa: E402
from xbm_tf.retrieval import load_retrieval_model  # noqa: E402

pytestmark = pytest.mark.slow
FLAGS = flags.FLAGS


def _sop_mock(tmp_path):
    """`--tfds --dataset=sop` served by tfds' mock: real JPEG bytes, 8 classes.

    Training: classes 1-4, 4 images each; test: classes 11-14, 3 images each
    (the mock replaces the prepared TFDS files; the loader, its split and the
    decoding of the bytes are the real ones).
    """
    import tensorflow_datasets as tfds

    quickstart = data.load_quickstart(max_per_class=12)
    splits = {"train": (quickstart.train, range(4), 4), "test": (None, range(4), 3)}
    splits["test"] = (quickstart.test, range(4), 3)

    def encoded(image_set, classes, per_class):
        images, labels = [], []
        for n, c in enumerate(sorted(set(image_set.labels))[: len(classes)]):
            for i in np.flatnonzero(image_set.labels == c)[:per_class]:
                buffer = io.BytesIO()
                from PIL import Image

                Image.fromarray(image_set.images[i][..., 0]).convert("RGB").save(
                    buffer, format="JPEG", quality=95
                )
                images.append(buffer.getvalue())
                labels.append(n)
        return images, labels

    served = {}
    for split, (image_set, classes, per_class) in splits.items():
        images, labels = encoded(image_set, classes, per_class)
        offset = 0 if split == "train" else 10
        served[split] = (images, [label + offset for label in labels])

    def as_dataset(self, split, *args, **kwargs):
        images, labels = served[split]
        return tf.data.Dataset.from_tensor_slices(
            {"image": images, "class_id": tf.constant(labels, tf.int64)}
        )

    return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def _trunk_policy(model) -> str:
    """The dtype policy of the trunk's first convolution."""
    return model.embedding_model.get_layer("tiny_cnn").layers[1].dtype_policy.name


# name: (flags, check(model) -> bool, context(tmp_path) or None)
TRAIN_CASES = {
    "triplet-sgd-float16-scann": (
        [
            "--loss=triplet",
            "--optimizer=sgd",
            "--momentum=0.5",
            "--memory_dtype=float16",
            "--eval_backend=scann",
            "--mixed_precision=mixed_bfloat16",
            "--verbose=2",
        ],
        lambda model: (
            isinstance(model.pair_loss, TripletLoss)
            and isinstance(model.optimizer, keras.optimizers.SGD)
            and model.optimizer.momentum == 0.5
            and model.memory_dtype == "float16"
            and _trunk_policy(model) == "mixed_bfloat16"
        ),
        None,
    ),
    "multi_similarity-mixed_float16-scann_ah": (
        [
            "--loss=multi_similarity",
            "--mixed_precision=mixed_float16",
            "--eval_backend=scann_ah",
        ],
        lambda model: (
            isinstance(model.pair_loss, MultiSimilarityLoss)
            # float16 gradients need loss scaling: train.py's LossScaleOptimizer.
            and isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
            and _trunk_policy(model) == "mixed_float16"
        ),
        None,
    ),
    "tfds-sop-exact": (
        ["--tfds", "--dataset=sop", "--eval_backend=exact"],
        lambda model: True,
        _sop_mock,
    ),
    "inshop-query-gallery": (
        [*INSHOP_ARGS],
        lambda model: True,
        None,
    ),
}


class _Model(keras.callbacks.Callback):
    """Keeps the model the run trains."""

    def on_train_begin(self, logs=None):
        self.trained = self.model


def _finite_losses(workdir) -> list[dict]:
    rows = list(csv.DictReader(open(os.path.join(workdir, "log.csv"))))
    assert rows
    for row in rows:
        for key in ("loss", "batch_loss", "xbm_loss"):
            assert math.isfinite(float(row[key])), (key, row)
    assert float(rows[-1]["xbm_loss"]) > 0  # the memory took part
    return rows


def _evaluate_agrees(parse, args, workdir, after, output_dir):
    """evaluate.py on the export reproduces the run's final numbers."""
    parse(
        *args,
        f"--model={os.path.join(workdir, 'export')}",
        f"--output_dir={output_dir}",
    )
    metrics = evaluate.run()
    assert set(metrics) == set(after)
    for key, value in after.items():
        # The same float32 embeddings (the export runs the trained graph) and
        # the same engine: the same neighbours, so the same counts.
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    return metrics


@pytest.fixture(scope="module")
def inshop_root(tmp_path_factory):
    return write_inshop(tmp_path_factory.mktemp("inshop"))


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train_option_finishes_exports_and_evaluate_agrees(
    parse, tmp_path, inshop_root, case
):
    args, check, context = TRAIN_CASES[case]
    args = list(args)
    if "--dataset=inshop" in args:
        args.append(f"--data_dir={inshop_root}")
    if "--tfds" in args:
        args.append(f"--data_dir={tmp_path}")
    workdir = tmp_path / "run"
    with context(tmp_path) if context else contextlib.nullcontext():
        parse(f"--workdir={workdir}", *args)
        seen = _Model()
        after = train.run(extra_callbacks=[seen])
        assert check(seen.trained), case
        assert (workdir / "export" / "saved_model.pb").exists()
        _finite_losses(workdir)
        saved = json.load(open(workdir / "retrieval.json"))["after"]
        assert saved == pytest.approx(after)
        if "scann_ah" in case:
            assert after["approximate"] == 1.0
        _evaluate_agrees(parse, args, workdir, after, tmp_path / "eval")
        if case == "inshop-query-gallery":
            # In-Shop: 8 queries against 12 gallery images, both evaluated.
            assert (tmp_path / "eval" / "retrieval_grid_test.png").exists()
            # A successful --overwrite rerun replaces the export.
            before = (workdir / "export" / "saved_model.pb").stat().st_mtime_ns
            parse(f"--workdir={workdir}", *args, "--overwrite", "--steps=3")
            train.run()
            assert (workdir / "export" / "saved_model.pb").stat().st_mtime_ns > before
            assert not (workdir / "backup").exists()


def test_xla_keras_cv_run_resumes_with_its_warning(parse, tmp_path, capsys):
    workdir = tmp_path / "run"
    args = ["--jit_compile=true", "--augmentation=keras_cv", "--steps=6"]
    parse(f"--workdir={workdir}", *args)
    with pytest.raises(KeyboardInterrupt):
        train.run(extra_callbacks=[stop_after(4)])
    capsys.readouterr()
    seen = _Model()
    after = train.run(extra_callbacks=[seen])
    out = capsys.readouterr().out
    assert "Resuming from the backup at step 3" in out
    assert "keras-cv crops and flips do not" in out  # the documented warning
    assert seen.trained.jit_compile is True
    assert (workdir / "export" / "saved_model.pb").exists()
    _finite_losses(workdir)
    _evaluate_agrees(parse, args, workdir, after, tmp_path / "eval")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny embedding network as an export (SavedModel) and a .keras file."""
    folder = tmp_path_factory.mktemp("models")
    model = build_embedding_model("tiny", 16, input_shape=(28, 28, 1), weights=None)
    model.save(folder / "model.keras")
    export = export_embedding_model(model, folder / "export")
    return str(export), str(folder / "model.keras")


def _write_pngs(images, folder):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = os.path.join(folder, f"q{i}.png")
        tf.io.write_file(path, tf.io.encode_png(image))
        paths.append(path)
    return paths


def test_index_tree_ah_free_slots_train_split_keras_model_and_overwrite(
    parse, tmp_path, models, capsys
):
    _, keras_file = models
    out = tmp_path / "retrieval"
    # 120 training images in 30 leaves, 1 searched: fewer than 10 items found.
    tree_ah = [
        "--split=train",
        "--index=tree_ah",
        "--num_leaves=30",
        "--leaves_to_search=1",
        "--reorder=10",
        "--search_k=10",
    ]
    parse(f"--model={keras_file}", f"--output={out}", *tree_ah)
    index.run()
    source = json.loads((out / "index.json").read_text())
    assert (source["split"], source["index"], source["num_items"]) == (
        "train",
        "tree_ah",
        120,
    )
    # The SavedModel itself marks the free slots: id -1, score -inf, at the end.
    train_images = data.load_quickstart(max_per_class=12).train.images
    queries = train_images[[0, 40, 80]].astype(np.float32)
    got = load_retrieval_model(out)(queries)
    ids, scores = np.asarray(got["ids"]), np.asarray(got["scores"])
    free = ids == -1
    assert free.any() and (scores[free] == -np.inf).all()
    assert np.isfinite(scores[~free]).all() and (~free[:, 0]).all()
    assert (np.diff(free.astype(int), axis=1) >= 0).all()  # free slots come last
    # search.py prints them and draws them blank.
    paths = _write_pngs(train_images[[0, 40]], tmp_path / "q")
    parse(f"--retrieval={out}", "--show=10")
    result = search.run(paths)
    printed = capsys.readouterr().out
    assert (np.asarray(result["ids"]) == -1).any()
    assert "      -inf  -1" in printed
    assert search.written_by_search(str(out / "search_results.png"))
    # A rerun of index.py with --overwrite replaces it (brute force now).
    parse(f"--model={keras_file}", f"--output={out}", "--split=train", "--overwrite")
    index.run()
    assert json.loads((out / "index.json").read_text())["index"] == "brute_force"
    ids = np.asarray(load_retrieval_model(out)(queries)["ids"])
    assert (ids >= 0).all()


@pytest.mark.parametrize("split", ["query", "gallery"])
def test_index_inshop_split_then_search_shows_classes(
    parse, tmp_path, models, inshop_root, capsys, split
):
    export, keras_file = models
    out = tmp_path / "retrieval"
    model = export if split == "gallery" else keras_file
    parse(
        *INSHOP_ARGS,
        f"--data_dir={inshop_root}",
        f"--model={model}",
        f"--split={split}",
        f"--output={out}",
        "--search_k=3",
    )
    index.run()
    size = {"query": 8, "gallery": 12}[split]
    assert json.loads((out / "index.json").read_text())["num_items"] == size
    gallery = data.load_inshop(inshop_root)
    image_set = getattr(gallery, split)
    capsys.readouterr()
    parse(f"--retrieval={out}")
    result = search.run(list(image_set.images[:2]))
    ids = np.asarray(result["ids"]).astype(str)
    assert ids[0, 0] == image_set.images[0]  # an indexed image finds itself
    printed = capsys.readouterr().out
    label = image_set.labels[0]
    assert f"{image_set.images[0]}  class {label}\n" in printed
    assert search.written_by_search(str(out / "search_results.png"))


@pytest.mark.parametrize("backend", ["scann", "scann_ah"])
def test_evaluate_backends_with_a_keras_model_agree_with_exact(
    parse, tmp_path, models, backend
):
    _, keras_file = models
    parse(f"--model={keras_file}", f"--output_dir={tmp_path / 'exact'}")
    exact = evaluate.run()
    parse(
        f"--model={keras_file}",
        f"--output_dir={tmp_path / backend}",
        f"--eval_backend={backend}",
    )
    got = evaluate.run()
    assert got.pop("approximate", None) == (1.0 if backend == "scann_ah" else None)
    # 119-item gallery: scann_ah's tree searches every leaf and re-scores its
    # candidates exactly, so even it finds the exact lists here.
    for key, value in exact.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
