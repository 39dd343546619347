"""Datasets and tf.data input pipelines for deep metric learning.

Loaders return `RetrievalSplits` (train classes / unseen test classes) of
`ImageSet`s; `train_dataset` turns a training `ImageSet` into infinite P x K
batches and `eval_dataset` gives every image once with the test transform.
Images come out as float32 in [0, 255]; backbone preprocessing is the model's.
"""

from __future__ import annotations

from xbm_tf.data.augment import TrainAugmentation, eval_transform
from xbm_tf.data.cars import CARS196_EXPECTED_COUNTS, load_cars196
from xbm_tf.data.cub import CUB_EXPECTED_COUNTS, load_cub
from xbm_tf.data.glyphs import load_glyphs
from xbm_tf.data.inshop import INSHOP_EXPECTED_COUNTS, load_inshop
from xbm_tf.data.layout import DatasetLayoutError, MissingDatasetFileError
from xbm_tf.data.pipeline import (
    drop_corrupt_images,
    eval_dataset,
    find_corrupt_images,
    train_dataset,
)
from xbm_tf.data.quickstart import QUICKSTART_CLASS_NAMES, load_quickstart
from xbm_tf.data.sampling import PKSampler
from xbm_tf.data.sop import SOP_EXPECTED_COUNTS, load_sop
from xbm_tf.data.splits import ImageSet, RetrievalSplits, remap_labels
from xbm_tf.data.tfds_sources import TFDS_NAMES, load_tfds
from xbm_tf.data.vehicleid import (
    VEHICLEID_EXPECTED_COUNTS,
    VEHICLEID_TEST_LISTS,
    load_vehicleid,
)

__all__ = [
    "CARS196_EXPECTED_COUNTS",
    "CUB_EXPECTED_COUNTS",
    "DatasetLayoutError",
    "INSHOP_EXPECTED_COUNTS",
    "ImageSet",
    "MissingDatasetFileError",
    "PKSampler",
    "QUICKSTART_CLASS_NAMES",
    "RetrievalSplits",
    "SOP_EXPECTED_COUNTS",
    "TFDS_NAMES",
    "TrainAugmentation",
    "VEHICLEID_EXPECTED_COUNTS",
    "VEHICLEID_TEST_LISTS",
    "drop_corrupt_images",
    "eval_dataset",
    "eval_transform",
    "find_corrupt_images",
    "load_cars196",
    "load_cub",
    "load_glyphs",
    "load_inshop",
    "load_quickstart",
    "load_sop",
    "load_tfds",
    "load_vehicleid",
    "remap_labels",
    "train_dataset",
]
