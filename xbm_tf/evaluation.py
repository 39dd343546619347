"""Retrieval evaluation (moved): re-exports `xbm_tf.retrieval` under its old name.

The search engines live in `xbm_tf.retrieval.engines`, the metrics in
`xbm_tf.retrieval.metrics`; this module keeps `xbm_tf.evaluation.recall_at_k` and
the other names importable from where they were.
"""

from __future__ import annotations

from xbm_tf.retrieval.engines import ENGINES as BACKENDS
from xbm_tf.retrieval.engines import nearest_neighbors
from xbm_tf.retrieval.metrics import (
    map_at_r,
    metrics_from_neighbors,
    r_precision,
    recall_at_k,
    retrieval_metrics,
)

__all__ = [
    "BACKENDS",
    "map_at_r",
    "metrics_from_neighbors",
    "nearest_neighbors",
    "r_precision",
    "recall_at_k",
    "retrieval_metrics",
]
