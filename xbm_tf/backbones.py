"""Embedding networks: a convolutional trunk, global pooling, Dense, L2 norm.

`build_embedding_model` returns a plain `keras.Model` mapping a batch of images,
float32 in `[0, 255]` and channels last, to L2-normalised float32 embeddings. The
backbone's own preprocessing runs inside the model, so the data pipeline and the
exported SavedModel both feed raw pixel values.

Grayscale images: `"tiny"` accepts any channel count; the ImageNet backbones need
3 channels, so let the data pipeline expand grayscale images to RGB (e.g.
`tf.image.grayscale_to_rgb`) before they reach the model.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import keras

__all__ = ["ImagePreprocessing", "build_embedding_model"]

_POOLINGS = {
    "max": keras.layers.GlobalMaxPooling2D,
    "avg": keras.layers.GlobalAveragePooling2D,
}
_POLICIES = (None, "float32", "mixed_float16", "mixed_bfloat16")


def _rescale_01(x):
    return x / 255.0


# Each backbone's own input preprocessing, applied to float32 images in [0, 255].
# EfficientNet rescales and normalises inside the network (its preprocess_input
# is the identity).
_PREPROCESS = {
    "resnet50": keras.applications.resnet50.preprocess_input,
    "mobilenet_v2": keras.applications.mobilenet_v2.preprocess_input,
    "efficientnet_b0": keras.applications.efficientnet.preprocess_input,
    "tiny": _rescale_01,
}


@keras.saving.register_keras_serializable(package="xbm_tf")
class ImagePreprocessing(keras.layers.Layer):
    """Applies a backbone's own input preprocessing to images in `[0, 255]`.

    Args:
        backbone: one of `"resnet50"` (caffe mode: RGB to BGR, ImageNet mean
            subtracted), `"mobilenet_v2"` (scaled to `[-1, 1]`),
            `"efficientnet_b0"` (identity: the network rescales itself) or
            `"tiny"` (scaled to `[0, 1]`).
        **kwargs: standard layer arguments (`name`, `dtype`).

    Call arguments:
        images: float tensor `(batch, height, width, channels)` in `[0, 255]`.

    Example:
        >>> layer = ImagePreprocessing("tiny")
        >>> float(layer(keras.ops.full((1, 2, 2, 1), 255.0))[0, 0, 0, 0])
        1.0
    """

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        if backbone not in _PREPROCESS:
            raise ValueError(
                f"Unknown backbone {backbone!r}; valid: {sorted(_PREPROCESS)}."
            )
        self.backbone = backbone

    def call(self, images):
        return _PREPROCESS[self.backbone](images)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"backbone": self.backbone})
        return config


@contextlib.contextmanager
def _global_dtype_policy(policy: str):
    """Sets Keras' global dtype policy inside the block, restoring it afterwards.

    `keras.applications` constructors take no `dtype` argument: their layers
    read the global policy when they are created, so the trunk is built inside
    this block. The previous global policy is restored even on error.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _application_builder(constructor_name: str):
    def build(input_shape, weights, dtype):
        # Looked up at call time so that tests can monkeypatch the constructor.
        constructor = getattr(keras.applications, constructor_name)
        with _global_dtype_policy(dtype):
            return constructor(
                include_top=False,
                weights=weights,
                input_shape=tuple(input_shape),
                pooling=None,
            )

    return build


def _tiny_cnn(input_shape, weights, dtype):
    """Three conv/BN/ReLU blocks (32, 64, 128 filters), 2x2 max pool between."""
    del weights  # Only local files, loaded by the caller.
    inputs = keras.Input(shape=tuple(input_shape))
    x = inputs
    for i, filters in enumerate((32, 64, 128)):
        if i:
            x = keras.layers.MaxPooling2D(2, padding="same", dtype=dtype)(x)
        x = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=False, dtype=dtype
        )(x)
        x = keras.layers.BatchNormalization(dtype=dtype)(x)
        x = keras.layers.ReLU(dtype=dtype)(x)
    return keras.Model(inputs, x, name="tiny_cnn")


# Each builder returns the trunk (a feature map model) for
# (input_shape, weights: "imagenet" | None, dtype policy name).
_BUILDERS = {
    "resnet50": _application_builder("ResNet50"),
    "mobilenet_v2": _application_builder("MobileNetV2"),
    "efficientnet_b0": _application_builder("EfficientNetB0"),
    "tiny": _tiny_cnn,
}


def build_embedding_model(
    backbone: str = "resnet50",
    embedding_dim: int = 512,
    input_shape: tuple = (224, 224, 3),
    weights: str | None = None,
    pooling: str = "max",
    mixed_precision: str | None = None,
    name: str | None = None,
) -> keras.Model:
    """Builds an embedding network: preprocessing, trunk, pooling, Dense, L2 norm.

    The layers are `images` (input) -> `preprocess` -> the trunk (a nested
    model) -> `pool` -> `embedding` (Dense) -> `l2_normalize`.

    Args:
        backbone: `"resnet50"` (the paper's), `"mobilenet_v2"` or
            `"efficientnet_b0"` (light, for CPU), from `keras.applications`, or
            `"tiny"`, a 3-block CNN for tests and the quickstart that works on
            small inputs (e.g. 28x28) with any number of channels.
        embedding_dim: size of the embeddings.
        input_shape: `(height, width, channels)` of the images. The
            `keras.applications` backbones need 3 channels and at least 32x32.
        weights: `None` (random initialisation); `"imagenet"`, passed to
            `keras.applications` (downloaded on first use, needs network; not
            available for `"tiny"`); or the path of a local weights file, either
            of the whole embedding model (as written by `model.save_weights`)
            or of the trunk alone (e.g. Keras' ImageNet "notop" `.h5` file
            copied to an offline machine). The whole model is tried first.
        pooling: `"max"` (global max pooling, as in the reference XBM code) or
            `"avg"`.
        mixed_precision: `None` or `"float32"` (full precision),
            `"mixed_float16"` or `"mixed_bfloat16"`: the dtype policy of the
            trunk. The preprocessing, pooling, embedding head and output stay
            float32. For `keras.applications` trunks, Keras' global dtype policy
            is set while the trunk is built and restored afterwards. With
            `"mixed_float16"`, train with a `keras.optimizers.LossScaleOptimizer`.
        name: model name; defaults to `f"{backbone}_embedding"`.

    Returns:
        A `keras.Model` mapping float32 images in `[0, 255]`, shape
        `(batch, *input_shape)`, to float32 embeddings `(batch, embedding_dim)`
        of unit L2 norm.

    Raises:
        ValueError: unknown `backbone`, `pooling` or `mixed_precision`; bad
            `embedding_dim` or `input_shape`; `"imagenet"` for `"tiny"`; a
            weights file that does not fit the model.
        FileNotFoundError: `weights` is a path that does not exist.

    Example:
        >>> model = build_embedding_model("tiny", embedding_dim=8,
        ...                               input_shape=(28, 28, 1))
        >>> model(keras.ops.zeros((2, 28, 28, 1))).shape
        TensorShape([2, 8])
    """
    if backbone not in _BUILDERS:
        raise ValueError(f"Unknown backbone {backbone!r}; valid: {sorted(_BUILDERS)}.")
    if pooling not in _POOLINGS:
        raise ValueError(f"Unknown pooling {pooling!r}; valid: {sorted(_POOLINGS)}.")
    if mixed_precision not in _POLICIES:
        raise ValueError(
            f"Unknown mixed_precision {mixed_precision!r}; valid: {list(_POLICIES)}."
        )
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, int):
        raise ValueError(f"embedding_dim must be an int, got {embedding_dim!r}.")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}.")
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            f"input_shape must be (height, width, channels), got {input_shape}."
        )
    if backbone != "tiny" and input_shape[-1] != 3:
        raise ValueError(
            f"Backbone {backbone!r} needs 3-channel images, got input_shape="
            f"{input_shape}: expand grayscale images to RGB in the data pipeline "
            "or use backbone='tiny'."
        )
    weights_file = None
    if weights is not None and weights != "imagenet":
        weights_file = os.fspath(weights)
        if not os.path.isfile(weights_file):
            raise FileNotFoundError(
                f"Weights file {weights_file!r} not found (weights must be None, "
                "'imagenet' or the path of a local weights file)."
            )
    if weights == "imagenet" and backbone == "tiny":
        raise ValueError(
            "weights='imagenet' is not available for backbone 'tiny'; use None "
            "or a local weights file."
        )
    policy = mixed_precision or "float32"

    trunk = _BUILDERS[backbone](
        input_shape, "imagenet" if weights == "imagenet" else None, policy
    )
    inputs = keras.Input(shape=input_shape, dtype="float32", name="images")
    x = ImagePreprocessing(backbone, dtype="float32", name="preprocess")(inputs)
    x = trunk(x)
    x = _POOLINGS[pooling](dtype="float32", name="pool")(x)
    x = keras.layers.Dense(embedding_dim, dtype="float32", name="embedding")(x)
    outputs = keras.layers.UnitNormalization(
        axis=-1, dtype="float32", name="l2_normalize"
    )(x)
    model = keras.Model(inputs, outputs, name=name or f"{backbone}_embedding")
    if weights_file is not None:
        _load_weights_file(model, trunk, weights_file)
    return model


def _load_checked(target: keras.Model, path: str) -> str | None:
    """Loads `path` into `target`; returns None on success, else the reason.

    Keras may skip parts of a file that do not match the model without raising,
    so every float variable is first set to NaN and must be overwritten.
    """
    variables = [v for v in target.weights if "float" in str(v.dtype)]
    for v in variables:
        v.assign(keras.ops.full(v.shape, float("nan"), dtype=v.dtype))
    try:
        with warnings.catch_warnings():
            # Keras warns about parts it skips; the NaN check below reports them.
            warnings.simplefilter("ignore")
            target.load_weights(path)
    except Exception as e:  # Reported to the user by the caller.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = " ".join(lines[:3]).split(" Target variable:")[0].rstrip(".:")
        return f"{type(e).__name__}: {reason[:400]}"
    missing = [v.path for v in variables if bool(keras.ops.all(keras.ops.isnan(v)))]
    if missing:
        return (
            f"{len(missing)} of {len(variables)} variables not found in the file, "
            f"e.g. {missing[:3]}"
        )
    return None


def _load_weights_file(model: keras.Model, trunk: keras.Model, path: str) -> None:
    """Loads a whole-model or trunk-only weights file, or raises a ValueError."""
    initial = model.get_weights()
    whole_error = _load_checked(model, path)
    if whole_error is None:
        return
    model.set_weights(initial)
    trunk_error = _load_checked(trunk, path)
    if trunk_error is None:
        return
    raise ValueError(
        f"Weights file {path!r} does not fit model {model.name!r} (trunk "
        f"{trunk.name!r}, input shape {tuple(model.input.shape[1:])}). As the "
        f"whole embedding model: {whole_error}. As the trunk alone: {trunk_error}."
    )
