"""Fixtures for the data tests: real images (from the quickstart packages)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def real_images() -> np.ndarray:
    """20 real RGB uint8 images, one per quickstart class, of varied sizes."""
    from xbm_tf.data.quickstart import _raw_images

    images, labels = _raw_images()
    picked = []
    for c in range(20):
        gray = images[np.flatnonzero(labels == c)[0], :, :, 0]
        size = (28 + 4 * (c % 3), 28 + 2 * (c % 4))  # (width, height)
        resized = Image.fromarray(gray).resize(size, Image.BILINEAR)
        rgb = np.stack([np.asarray(resized)] * 3, axis=-1)
        rgb[..., 0] = 255 - rgb[..., 0]  # make the channels differ
        picked.append(rgb)
    return picked


def write_image(path: str, array: np.ndarray, fmt: str = "JPEG") -> str:
    """Writes `array` (H, W, 3) uint8 to `path`, creating folders; returns path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=fmt, quality=95)
    return path


def encode_jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def image_writer():
    return write_image


@pytest.fixture
def jpeg_encoder():
    return encode_jpeg
