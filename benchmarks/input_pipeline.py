r"""Is the input pipeline the bottleneck? Images/s of tf.data vs. train steps.

Writes JPEG files (crops of the two real photos shipped with scikit-learn,
resized to about CUB's 500 x 375) to a temporary folder, then measures in one
run:

* the training pipeline (`train_dataset`: decode, resize 256, random resized
  crop 224, flip, P x K = 16 x 4 batches), for each augmentation
  implementation, and the evaluation pipeline (`eval_dataset`);
* the train step rate of small Keras models on an in-memory batch of the same
  size, and `fit` fed by the real pipeline, so that the ratio shows whether
  the input keeps up.

A ratio pipeline/step above 1 means the pipeline produces images faster than
the model consumes them. Both compete for the same CPU cores here, which the
`fit` rows include.

Usage:
  python benchmarks/input_pipeline.py
  python benchmarks/input_pipeline.py --models=small,resnet50 --train_steps=3
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tempfile  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from xbm_tf.data import ImageSet, eval_dataset, train_dataset  # noqa: E402

_NUM_IMAGES = flags.DEFINE_integer("num_images", 256, "JPEG files to write.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 32, "Classes among them.")
_P = flags.DEFINE_integer("p", 16, "Classes per batch.")
_K = flags.DEFINE_integer("k", 4, "Images per class.")
_RESIZE = flags.DEFINE_integer("resize_size", 256, "Shorter side before cropping.")
_CROP = flags.DEFINE_integer("crop_size", 224, "Crop size.")
_BATCHES = flags.DEFINE_integer("batches", 15, "Timed pipeline batches.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed batches / steps first.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 10, "Timed train steps.")
_MODELS = flags.DEFINE_list(
    "models", ["small"], "Models: small, mobilenetv2, resnet50 (weights=None)."
)


def write_jpegs(folder: str, num_images: int, num_classes: int) -> ImageSet:
    """Writes varied crops of scikit-learn's sample photos as JPEG files."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(num_images):
        photo = photos[i % len(photos)]
        h = int(rng.integers(280, photo.shape[0] + 1))
        w = int(rng.integers(280, photo.shape[1] + 1))
        top = int(rng.integers(0, photo.shape[0] - h + 1))
        left = int(rng.integers(0, photo.shape[1] - w + 1))
        crop = Image.fromarray(photo[top : top + h, left : left + w])
        size = (500, 375) if i % 3 else (375, 500)
        path = os.path.join(folder, f"{i:05d}.jpg")
        crop.resize(size, Image.BILINEAR).save(path, quality=90)
        paths.append(path)
        labels.append(i % num_classes)
    return ImageSet(paths, np.array(labels), "benchmark")


def pipeline_rate(dataset, batches: int, warmup: int) -> float:
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    images = 0
    for _ in range(batches):
        x, _ = next(iterator)
        images += int(x.shape[0])
    return images / (time.perf_counter() - start)


def build_model(name: str, crop_size: int, num_classes: int) -> keras.Model:
    inputs = keras.Input((crop_size, crop_size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    if name == "small":
        for filters in (32, 64, 128, 256):
            x = keras.layers.Conv2D(filters, 3, strides=2, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
    else:
        trunk = {
            "mobilenetv2": keras.applications.MobileNetV2,
            "resnet50": keras.applications.ResNet50,
        }[name]
        x = trunk(include_top=False, weights=None, pooling="avg")(x)
    x = keras.layers.Dense(128)(x)
    outputs = keras.layers.Dense(num_classes)(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def step_rate(model: keras.Model, x, y, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return steps * len(y) / (time.perf_counter() - start)


def fit_rate(model: keras.Model, dataset, steps: int, warmup: int) -> float:
    model.fit(dataset, steps_per_epoch=warmup, epochs=1, verbose=0, shuffle=False)
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    return steps * _P.value * _K.value / (time.perf_counter() - start)


def main(argv):
    del argv
    batch = _P.value * _K.value
    sizes = dict(resize_size=_RESIZE.value, crop_size=_CROP.value)
    with tempfile.TemporaryDirectory() as folder:
        image_set = write_jpegs(folder, _NUM_IMAGES.value, _NUM_CLASSES.value)
        widths = [Image.open(p).size for p in image_set.images[:3]]
        print(
            f"{len(image_set)} JPEG files ({widths[0][0]}x{widths[0][1]} and "
            f"{widths[2][0]}x{widths[2][1]}), P x K = {_P.value} x {_K.value}, "
            f"{_CROP.value}x{_CROP.value}, {os.cpu_count()} CPU cores\n"
        )
        inputs = {}
        for implementation in ("keras_cv", "tf_image"):
            ds = train_dataset(
                image_set,
                p=_P.value,
                k=_K.value,
                seed=0,
                implementation=implementation,
                **sizes,
            )
            rate = pipeline_rate(ds, _BATCHES.value, _WARMUP.value)
            inputs[f"train pipeline, {implementation} augmentation"] = rate
        eval_ds = eval_dataset(image_set, batch_size=batch, **sizes).repeat()
        inputs["eval pipeline (resize + centre crop)"] = pipeline_rate(
            eval_ds, _BATCHES.value, _WARMUP.value
        )

        x, y = next(iter(train_dataset(image_set, p=_P.value, k=_K.value, **sizes)))
        steps = {}
        for name in _MODELS.value:
            model = build_model(name, _CROP.value, _NUM_CLASSES.value)
            steps[f"{name}: train step, in-memory batch"] = step_rate(
                model, x, y, _TRAIN_STEPS.value, _WARMUP.value
            )
            ds = train_dataset(image_set, p=_P.value, k=_K.value, seed=1, **sizes)
            steps[f"{name}: fit fed by the train pipeline"] = fit_rate(
                model, ds, _TRAIN_STEPS.value, _WARMUP.value
            )

    print(f"{'input pipeline':<48}{'images/s':>10}")
    for name, rate in inputs.items():
        print(f"  {name:<46}{rate:>10.1f}")
    keras_cv = inputs["train pipeline, keras_cv augmentation"]
    tf_image = inputs["train pipeline, tf_image augmentation"]
    header = f"model (batch {batch})"
    print(f"\n{header:<48}{'images/s':>10}{'keras_cv/step':>15}{'tf_image/step':>15}")
    for name, rate in steps.items():
        ratios = ""
        if "in-memory" in name:
            ratios = f"{keras_cv / rate:>15.2f}{tf_image / rate:>15.2f}"
        print(f"  {name:<46}{rate:>10.1f}{ratios}")
    print(
        "\nx/step = train pipeline images/s / train step images/s, measured apart "
        "(> 1: the input keeps up); the 'fit fed by' rows run both at once."
    )


if __name__ == "__main__":
    app.run(main)
