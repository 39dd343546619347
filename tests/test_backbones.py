"""Tests for xbm_tf.backbones."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from xbm_tf.backbones import ImagePreprocessing, build_embedding_model


def _images(shape, n=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 255.0, size=(n, *shape)).astype("float32")


def _randomize(model, seed=0):
    """Random signed weights and positive BN variances, so that loads are visible."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        if "moving_variance" in v.path or "gamma" in v.path:
            value = rng.uniform(0.5, 1.5, size=v.shape)
        else:
            value = rng.normal(0.0, 0.1, size=v.shape)
        v.assign(value.astype("float32"))


# 32x32 is the smallest input keras.applications accepts for these trunks. One
# application trunk is built under a mixed policy, which keras.applications only
# takes from the global policy.
@pytest.mark.parametrize(
    "backbone, input_shape, policy, compute",
    [
        ("tiny", (28, 28, 1), None, "float32"),
        ("resnet50", (32, 32, 3), None, "float32"),
        ("mobilenet_v2", (32, 32, 3), "mixed_bfloat16", "bfloat16"),
        ("efficientnet_b0", (32, 32, 3), None, "float32"),
    ],
)
def test_output_shape_dtype_and_unit_norm(backbone, input_shape, policy, compute):
    model = build_embedding_model(
        backbone, embedding_dim=16, input_shape=input_shape, mixed_precision=policy
    )
    out = model(_images(input_shape, n=3), training=False)
    assert tuple(out.shape) == (3, 16)
    assert out.dtype == "float32"
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert model.name == f"{backbone}_embedding"
    trunk = model.layers[2]
    convs = [layer for layer in trunk.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(layer.compute_dtype == compute for layer in convs)
    for name in ("preprocess", "pool", "embedding", "l2_normalize"):
        assert model.get_layer(name).compute_dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"


def test_tiny_accepts_any_channel_count_and_size():
    for shape in [(32, 32, 3), (17, 23, 5)]:
        model = build_embedding_model("tiny", 4, input_shape=shape)
        assert tuple(model(_images(shape)).shape) == (2, 4)


def test_preprocessing_matches_each_backbone_convention():
    pixel = np.array([[[[255.0, 0.0, 51.0]]]], dtype="float32")  # RGB
    caffe = ImagePreprocessing("resnet50")(pixel)
    # RGB -> BGR, minus the ImageNet BGR means.
    np.testing.assert_allclose(
        np.ravel(caffe), [51 - 103.939, 0 - 116.779, 255 - 123.68], atol=1e-4
    )
    np.testing.assert_allclose(
        np.ravel(ImagePreprocessing("mobilenet_v2")(pixel)),
        [1.0, -1.0, -0.6],
        atol=1e-6,
    )
    np.testing.assert_allclose(
        np.ravel(ImagePreprocessing("tiny")(pixel)), [1.0, 0.0, 0.2], atol=1e-6
    )
    np.testing.assert_array_equal(ImagePreprocessing("efficientnet_b0")(pixel), pixel)


@pytest.mark.parametrize(
    "policy, compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")]
)
def test_mixed_precision_trunk_with_float32_head(policy, compute):
    shape = (28, 28, 3)
    full = build_embedding_model("tiny", 16, input_shape=shape)
    mixed = build_embedding_model("tiny", 16, input_shape=shape, mixed_precision=policy)
    _randomize(full)
    mixed.set_weights(full.get_weights())
    x = _images(shape, n=4)
    out = mixed(x, training=False)
    assert out.dtype == "float32"
    trunk = mixed.get_layer("tiny_cnn")
    convs = [layer for layer in trunk.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(layer.compute_dtype == compute for layer in convs)
    for name in ("preprocess", "pool", "embedding", "l2_normalize"):
        assert mixed.get_layer(name).compute_dtype == "float32"
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # Same weights: the low precision trunk perturbs the embeddings, slightly.
    diff = np.abs(np.asarray(out) - np.asarray(full(x, training=False))).max()
    assert 0.0 < diff < 1e-2
    assert keras.config.dtype_policy().name == "float32"


def _fake_application(calls, fail=False):
    def constructor(**kwargs):
        calls.append((kwargs, keras.config.dtype_policy().name))
        if fail:
            raise RuntimeError("download failed")
        inputs = keras.Input(kwargs["input_shape"])
        return keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs), name="fake")

    return constructor


def test_imagenet_weights_forwarded_to_keras_applications(monkeypatch):
    calls = []
    monkeypatch.setattr(keras.applications, "ResNet50", _fake_application(calls))
    model = build_embedding_model(
        "resnet50",
        8,
        input_shape=(64, 64, 3),
        weights="imagenet",
        mixed_precision="mixed_float16",
    )
    assert calls == [
        (
            {
                "include_top": False,
                "weights": "imagenet",
                "input_shape": (64, 64, 3),
                "pooling": None,
            },
            "mixed_float16",
        )
    ]
    assert model.get_layer("fake").get_layer(index=1).compute_dtype == "float16"
    assert keras.config.dtype_policy().name == "float32"


def test_global_policy_restored_when_trunk_construction_fails(monkeypatch):
    calls = []
    monkeypatch.setattr(
        keras.applications, "MobileNetV2", _fake_application(calls, fail=True)
    )
    with pytest.raises(RuntimeError, match="download failed"):
        build_embedding_model(
            "mobilenet_v2",
            8,
            input_shape=(32, 32, 3),
            weights="imagenet",
            mixed_precision="mixed_bfloat16",
        )
    assert calls[0][1] == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == "float32"


@pytest.mark.parametrize("pooling, reduce", [("max", np.max), ("avg", np.mean)])
def test_pooling_equals_hand_computation_on_feature_map(pooling, reduce, float32_gap):
    shape = (20, 20, 3)
    model = build_embedding_model("tiny", 8, input_shape=shape, pooling=pooling)
    _randomize(model)
    x = _images(shape, n=3)
    features = np.asarray(keras.Model(model.input, model.get_layer("pool").input)(x))
    assert features.shape == (3, 5, 5, 128)
    kernel, bias = model.get_layer("embedding").get_weights()
    dense = reduce(features, axis=(1, 2)) @ kernel + bias
    expected = dense / np.linalg.norm(dense, axis=1, keepdims=True)
    # Keras and numpy compute the head in float32 with other kernels: the mean
    # over 25 positions, the 128-wide Dense and the L2 norm over 8 (the max and
    # the trunk's features are the same on both sides): conftest's float32_gap.
    gap = float32_gap(25 + 128 + 8)
    np.testing.assert_allclose(model(x), expected, rtol=gap, atol=gap)


def test_max_and_avg_pooling_differ_with_same_weights():
    shape = (20, 20, 3)
    max_model = build_embedding_model("tiny", 8, input_shape=shape, pooling="max")
    avg_model = build_embedding_model("tiny", 8, input_shape=shape, pooling="avg")
    _randomize(max_model)
    avg_model.set_weights(max_model.get_weights())
    x = _images(shape)
    assert np.abs(np.asarray(max_model(x)) - np.asarray(avg_model(x))).max() > 1e-2


def test_local_weights_file_round_trip(tmp_path):
    shape = (28, 28, 1)
    source = build_embedding_model("tiny", 8, input_shape=shape)
    _randomize(source)
    path = str(tmp_path / "model.weights.h5")
    source.save_weights(path)
    loaded = build_embedding_model("tiny", 8, input_shape=shape, weights=path)
    fresh = build_embedding_model("tiny", 8, input_shape=shape)
    x = _images(shape, n=4)
    np.testing.assert_array_equal(loaded(x), source(x))
    assert np.abs(np.asarray(fresh(x)) - np.asarray(source(x))).max() > 1e-2
    for a, b in zip(loaded.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_trunk_only_weights_file_loads_trunk_and_keeps_fresh_head(tmp_path):
    shape = (28, 28, 1)
    source = build_embedding_model("tiny", 8, input_shape=shape)
    _randomize(source)
    path = str(tmp_path / "trunk.weights.h5")
    source.get_layer("tiny_cnn").save_weights(path)
    loaded = build_embedding_model("tiny", 8, input_shape=shape, weights=path)
    for a, b in zip(
        loaded.get_layer("tiny_cnn").get_weights(),
        source.get_layer("tiny_cnn").get_weights(),
    ):
        np.testing.assert_array_equal(a, b)
    kernel, bias = loaded.get_layer("embedding").get_weights()
    assert np.isfinite(kernel).all() and np.all(bias == 0.0)  # Fresh initialiser.
    out = np.asarray(loaded(_images(shape)))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_missing_weights_file_names_it(tmp_path):
    path = str(tmp_path / "nowhere.weights.h5")
    with pytest.raises(FileNotFoundError, match="nowhere.weights.h5"):
        build_embedding_model("tiny", 8, input_shape=(28, 28, 1), weights=path)


@pytest.mark.parametrize(
    "other_dim, other_shape", [(16, (28, 28, 1)), (8, (28, 28, 3))]
)
def test_mismatched_weights_file_names_it(tmp_path, other_dim, other_shape):
    path = str(tmp_path / "other.weights.h5")
    build_embedding_model("tiny", other_dim, input_shape=other_shape).save_weights(path)
    with pytest.raises(ValueError, match=r"other\.weights\.h5.*does not fit") as err:
        build_embedding_model("tiny", 8, input_shape=(28, 28, 1), weights=path)
    assert "tiny_cnn" in str(err.value)


def test_weights_file_that_is_not_hdf5_names_it(tmp_path):
    path = tmp_path / "broken.weights.h5"
    path.write_text("not a weights file")
    with pytest.raises(ValueError, match="broken.weights.h5"):
        build_embedding_model("tiny", 8, input_shape=(28, 28, 1), weights=str(path))


def test_saved_and_reloaded_as_keras_file(tmp_path):
    shape = (28, 28, 1)
    model = build_embedding_model("tiny", 8, input_shape=shape)
    _randomize(model)
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    x = _images(shape)
    np.testing.assert_allclose(reloaded(x), model(x), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backbone": "vgg"}, r"backbone 'vgg'.*'efficientnet_b0'.*'tiny'"),
        ({"pooling": "sum"}, r"pooling 'sum'.*\['avg', 'max'\]"),
        ({"mixed_precision": "float16"}, r"mixed_precision 'float16'.*mixed_float16"),
        ({"embedding_dim": 0}, r"embedding_dim must be >= 1, got 0"),
        ({"input_shape": (28, 28)}, r"input_shape must be \(height, width"),
        (
            {"backbone": "resnet50", "input_shape": (32, 32, 1)},
            r"'resnet50' needs 3-channel images.*\(32, 32, 1\).*grayscale",
        ),
        ({"weights": "imagenet"}, r"'imagenet' is not available for backbone 'tiny'"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs, message):
    args = {"backbone": "tiny", "embedding_dim": 8, "input_shape": (28, 28, 1)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        build_embedding_model(**args)
