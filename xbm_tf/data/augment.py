"""Image transforms of the paper: train augmentation and the test transform.

Convention for every transform here: the input is one image `(H, W, C)` of
any dtype with values in [0, 255]; the output is float32 in [0, 255] with the
channels unchanged. Backbone-specific preprocessing (scaling, mean/std) belongs
to the model.

Train (the reference XBM code's torchvision pipeline): resize the shorter side
to `resize_size` (256), random resized crop to `crop_size` x `crop_size` (224)
covering `scale` = (0.2, 1.0) of the area with aspect ratio in (3/4, 4/3),
random horizontal flip. Test: resize the shorter side to `resize_size`, then
centre crop `crop_size`.
"""

from __future__ import annotations

import tensorflow as tf

IMPLEMENTATIONS = ("keras_cv", "tf_image")


def _check_sizes(resize_size: int, crop_size: int) -> None:
    if crop_size < 1 or resize_size < crop_size:
        raise ValueError(
            "Need 1 <= crop_size <= resize_size, got "
            f"resize_size={resize_size}, crop_size={crop_size}."
        )


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes `image` so that its shorter side is `size`, keeping the aspect.

    The longer side becomes `floor(size * long / short)`, as in torchvision's
    `Resize(size)`. Bilinear with antialiasing; an image already at that size is
    returned unchanged (as float32).

    Args:
        image: `(H, W, C)` tensor.
        size: the target length of the shorter side.

    Returns:
        float32 `(H', W', C)` tensor with `min(H', W') == size`.
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    short = tf.minimum(height, width)
    new_height = tf.where(height <= width, size, (size * height) // short)
    new_width = tf.where(height <= width, (size * width) // short, size)
    resized = tf.image.resize(
        image, tf.stack([new_height, new_width]), method="bilinear", antialias=True
    )
    return tf.clip_by_value(resized, 0.0, 255.0)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Crops the central `size` x `size` window (offsets rounded down).

    Args:
        image: `(H, W, C)` tensor with `H, W >= size`.
        size: the side of the crop.

    Returns:
        `(size, size, C)` tensor `image[top:top + size, left:left + size]` with
        `top = (H - size) // 2` and `left = (W - size) // 2`.
    """
    shape = tf.shape(image)
    top = (shape[0] - size) // 2
    left = (shape[1] - size) // 2
    crop = image[top : top + size, left : left + size]
    return tf.ensure_shape(crop, [size, size, image.shape[-1]])


def eval_transform(image: tf.Tensor, *, resize_size: int, crop_size: int) -> tf.Tensor:
    """The test transform: shorter side to `resize_size`, centre crop `crop_size`.

    Args:
        image: `(H, W, C)` tensor with values in [0, 255].
        resize_size: the length of the shorter side after resizing (256).
        crop_size: the side of the central crop (224).

    Returns:
        float32 `(crop_size, crop_size, C)` tensor in [0, 255].

    Example:

    >>> x = tf.zeros((300, 400, 3), tf.uint8)
    >>> eval_transform(x, resize_size=256, crop_size=224).shape
    TensorShape([224, 224, 3])
    """
    _check_sizes(resize_size, crop_size)
    return center_crop(resize_shorter_side(image, resize_size), crop_size)


class TrainAugmentation:
    """The paper's training augmentation, seeded, as a tf.data map function.

    Two implementations give the same transform family:

    * `"keras_cv"` (default): `keras_cv.layers.RandomCropAndResize` and
      `keras_cv.layers.RandomFlip`. Their random state is stateful
      (`tf.random.Generator`, seeded `tf.random.uniform`), so the stream is
      reproducible for a seed only when images pass through in order:
      `parallel_safe` is False and the pipeline maps it sequentially. The crop
      box is drawn in coordinates relative to the image, so its pixel aspect
      ratio is the drawn ratio times the image's (resized anyway to a square).
      The area and aspect-ratio samplers get distinct seeds: with one seed,
      keras-cv 0.9 draws both from the same random stream (correlation 1).
    * `"tf_image"`: `tf.image.stateless_sample_distorted_bounding_box` (pixel
      aspect ratio, up to 10 attempts, else the whole image, like torchvision)
      and `tf.image.stateless_random_flip_left_right`, driven by a per-image
      seed: deterministic under parallel map (`parallel_safe` is True).

    Args:
        resize_size: the shorter side after the first resize (256).
        crop_size: the output side (224).
        scale: the range of the crop area as a fraction of the image area.
        ratio: the range of the crop aspect ratio (width / height).
        flip: apply a random horizontal flip.
        seed: the random seed.
        implementation: `"keras_cv"` or `"tf_image"`.

    Call arguments:
        image: `(H, W, C)` tensor with values in [0, 255].
        element_seed: int `(2,)` tensor, distinct per image; required by
            `"tf_image"`, ignored by `"keras_cv"`.

    Returns:
        float32 `(crop_size, crop_size, C)` tensor in [0, 255].

    Example:

    >>> augment = TrainAugmentation(resize_size=32, crop_size=28, seed=1)
    >>> augment(tf.zeros((28, 28, 1), tf.uint8)).shape
    TensorShape([28, 28, 1])
    """

    def __init__(
        self,
        *,
        resize_size: int = 256,
        crop_size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        seed: int = 0,
        implementation: str = "keras_cv",
    ):
        _check_sizes(resize_size, crop_size)
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}.")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}.")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation must be one of {IMPLEMENTATIONS}, got "
                f"{implementation!r}."
            )
        self.resize_size = resize_size
        self.crop_size = crop_size
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.flip = flip
        self.seed = int(seed)
        self.implementation = implementation
        if implementation == "keras_cv":
            import keras_cv

            sampler = keras_cv.core.UniformFactorSampler
            self._crop = keras_cv.layers.RandomCropAndResize(
                target_size=(crop_size, crop_size),
                crop_area_factor=sampler(*self.scale, seed=self.seed),
                aspect_ratio_factor=sampler(*self.ratio, seed=self.seed + 1),
                seed=self.seed + 2,
                dtype="float32",
            )
            self._flip = keras_cv.layers.RandomFlip(
                "horizontal", seed=self.seed + 3, dtype="float32"
            )

    @property
    def parallel_safe(self) -> bool:
        """Whether parallel map keeps the output deterministic for a seed."""
        return self.implementation == "tf_image"

    def __call__(self, image: tf.Tensor, element_seed: tf.Tensor | None = None):
        image = resize_shorter_side(image, self.resize_size)
        if self.implementation == "keras_cv":
            image = self._crop(image)
            if self.flip:
                image = self._flip(image)
        else:
            if element_seed is None:
                raise ValueError("The 'tf_image' implementation needs element_seed.")
            crop_seed, flip_seed = tf.unstack(
                tf.random.experimental.stateless_split(
                    tf.cast(element_seed, tf.int64), num=2
                )
            )
            begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
                tf.shape(image),
                bounding_boxes=tf.zeros([1, 0, 4]),
                seed=crop_seed,
                min_object_covered=0.0,
                aspect_ratio_range=self.ratio,
                area_range=self.scale,
                max_attempts=10,
                use_image_if_no_bounding_boxes=True,
            )
            image = tf.image.resize(
                tf.slice(image, begin, size),
                [self.crop_size, self.crop_size],
                method="bilinear",
                antialias=True,
            )
            if self.flip:
                image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        image = tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0)
        return tf.ensure_shape(image, [self.crop_size, self.crop_size, image.shape[-1]])
