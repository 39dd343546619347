"""Tests for xbm_tf.export."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from xbm_tf.backbones import build_embedding_model
from xbm_tf.export import (
    INPUT_KEY,
    OUTPUT_KEY,
    export_embedding_model,
    load_exported_embedder,
)

SHAPE = (28, 28, 1)
# The tiny network's sums, on one grey image: 3x3 convolutions over 1, 32 and
# 64 channels (9, 288 and 576 terms), the rescaling and three batch norms (a
# few roundings each), the 128-wide Dense and the L2 norm: about 1030 terms. An
# export and `predict` (XLA, other batch sizes) run other kernels, so they are
# within conftest's float32_gap(TINY_SUMS) = 1.2e-4 of each other.
TINY_SUMS = 1030


def _model(seed, input_shape=SHAPE):
    model = build_embedding_model("tiny", 8, input_shape=input_shape)
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if "moving_variance" in v.path:
            v.assign(rng.uniform(0.5, 1.5, size=v.shape).astype("float32"))
        else:
            v.assign(rng.normal(0.0, 0.1, size=v.shape).astype("float32"))
    return model


def _images(n=5, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 255.0, size=(n, *shape)).astype("float32")


def test_export_round_trip_matches_predict(tmp_path, float32_gap):
    model = _model(0)
    path = export_embedding_model(model, tmp_path / "export")
    assert path == str(tmp_path / "export")
    assert sorted(os.listdir(tmp_path)) == ["export"]  # No staging leftovers.

    signature = tf.saved_model.load(path).signatures["serving_default"]
    (input_spec,) = signature.structured_input_signature[1].values()
    assert list(signature.structured_input_signature[1]) == [INPUT_KEY] == ["images"]
    assert input_spec.shape.as_list() == [None, 28, 28, 1]
    assert input_spec.dtype == tf.float32
    assert list(signature.structured_outputs) == [OUTPUT_KEY] == ["embeddings"]

    x = _images()
    embed = load_exported_embedder(path)
    out = embed(x)
    assert out.dtype == np.float32 and out.shape == (5, 8)
    gap = float32_gap(TINY_SUMS)
    np.testing.assert_allclose(out, model.predict(x, verbose=0), rtol=gap, atol=gap)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        signature(images=tf.constant(x))["embeddings"].numpy(), out, atol=1e-6
    )


def test_existing_export_not_overwritten_without_flag(tmp_path):
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError) as err:
        export_embedding_model(_model(0), export_dir)
    assert str(export_dir) in str(err.value)
    assert "overwrite=True" in str(err.value)
    assert os.listdir(export_dir) == ["keep.txt"]
    assert (export_dir / "keep.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["export"]


def test_overwrite_replaces_previous_export(tmp_path, float32_gap):
    export_dir = tmp_path / "export"
    old_model, new_model = _model(0), _model(1)
    export_embedding_model(old_model, export_dir)
    export_embedding_model(new_model, export_dir, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["export"]
    x = _images()
    out = load_exported_embedder(export_dir)(x)
    gap = float32_gap(TINY_SUMS)
    np.testing.assert_allclose(out, new_model(x, training=False), rtol=gap, atol=gap)
    assert np.abs(out - np.asarray(old_model(x, training=False))).max() > 1e-2


def test_failed_overwrite_keeps_previous_export(tmp_path, monkeypatch, float32_gap):
    export_dir = tmp_path / "export"
    old_model = _model(0)
    export_embedding_model(old_model, export_dir)
    archive_class = type(keras.export.ExportArchive())

    def failing_write_out(self, filepath, options=None, verbose=True):
        os.makedirs(filepath)
        open(os.path.join(filepath, "saved_model.pb"), "w").close()  # Partial.
        raise OSError("disk full")

    monkeypatch.setattr(archive_class, "write_out", failing_write_out)
    with pytest.raises(OSError, match="disk full"):
        export_embedding_model(_model(1), export_dir, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["export"]
    x = _images()
    np.testing.assert_allclose(
        load_exported_embedder(export_dir)(x),
        old_model(x, training=False),
        rtol=float32_gap(TINY_SUMS),
        atol=float32_gap(TINY_SUMS),
    )


def test_uint8_input_and_variable_image_size(tmp_path, float32_gap):
    model = _model(0, input_shape=(None, None, 1))
    path = export_embedding_model(model, tmp_path / "export", input_dtype="uint8")
    embed = load_exported_embedder(path)
    assert embed.signature.structured_input_signature[1][INPUT_KEY].dtype == tf.uint8
    for shape in [(28, 28, 1), (20, 36, 1)]:
        pixels = np.random.default_rng(0).integers(0, 256, size=(3, *shape))
        pixels = pixels.astype("uint8")
        np.testing.assert_allclose(
            embed(pixels),
            model(pixels.astype("float32"), training=False),
            rtol=float32_gap(TINY_SUMS),
            atol=float32_gap(TINY_SUMS),
        )


def test_export_dir_that_is_a_file_and_empty_dir(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_embedding_model(_model(0), a_file, overwrite=True)
    assert a_file.read_text() == "x"
    empty = tmp_path / "empty"
    empty.mkdir()
    export_embedding_model(_model(0), empty)  # An empty directory is fine.
    assert tf.saved_model.contains_saved_model(str(empty))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"input_dtype 'int32'.*'float32', 'uint8'"):
        export_embedding_model(_model(0), tmp_path / "e", input_dtype="int32")
    with pytest.raises(ValueError, match=r"input_shape must be .*\(28, 28\)"):
        export_embedding_model(_model(0), tmp_path / "e", input_shape=(28, 28))
    assert os.listdir(tmp_path) == []


def test_refuses_training_model_that_wraps_the_embedding_model(tmp_path):
    class Wrapper(keras.Model):
        def __init__(self, embedding_model):
            super().__init__()
            self.embedding_model = embedding_model
            self.memory = self.add_weight(shape=(1000, 8), trainable=False)

        def call(self, images):
            return self.embedding_model(images)

    with pytest.raises(ValueError, match=r"export its `\.embedding_model`"):
        export_embedding_model(Wrapper(_model(0)), tmp_path / "export")
    assert os.listdir(tmp_path) == []


def test_load_errors_name_the_path(tmp_path):
    not_saved_model = tmp_path / "weights_only"
    not_saved_model.mkdir()
    with pytest.raises(FileNotFoundError, match="weights_only.*not a TensorFlow"):
        load_exported_embedder(not_saved_model)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        load_exported_embedder(tmp_path / "missing_dir")

    path = export_embedding_model(_model(0), tmp_path / "export")
    embed = load_exported_embedder(path)
    with pytest.raises(ValueError, match=r"\(2, 32, 32, 1\).*\(None, 28, 28, 1\)"):
        embed(np.zeros((2, 32, 32, 1), "float32"))


def test_load_rejects_saved_model_without_embeddings_signature(tmp_path):
    module = tf.Module()
    module.f = tf.function(
        lambda x: {"logits": x * 2.0},
        input_signature=[tf.TensorSpec((None, 3), tf.float32)],
    )
    path = str(tmp_path / "other")
    tf.saved_model.save(module, path, signatures={"serving_default": module.f})
    with pytest.raises(ValueError, match=r"other.*'embeddings'.*logits"):
        load_exported_embedder(path)


@pytest.mark.parametrize("input_dtype", ["float32", "uint8"])
def test_bad_and_empty_batches_are_handled_inside_the_saved_model(
    tmp_path, input_dtype
):
    model = _model(0)
    path = export_embedding_model(model, tmp_path / "e", input_dtype=input_dtype)
    embed = load_exported_embedder(path)  # a fresh load of the export
    signature = tf.saved_model.load(path).signatures["serving_default"]
    # An empty batch: (0, 8) embeddings, without running the network (whose
    # batch normalization fails on an empty batch with oneDNN on AVX-512).
    empty = np.zeros((0, *SHAPE), input_dtype)
    assert embed(empty).shape == (0, 8)
    assert signature(images=tf.constant(empty))["embeddings"].shape == (0, 8)
    if input_dtype == "uint8":
        return  # no pixel of a uint8 image is NaN
    for pixel in (np.nan, np.inf):
        x = _images(4)
        x[2] = pixel  # an image full of NaN (or Inf)
        x[3, 0, 0, 0] = pixel
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"row 2 \(of 4\)"):
            embed(x)
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"`images` row 2"):
            signature(images=tf.constant(x))
