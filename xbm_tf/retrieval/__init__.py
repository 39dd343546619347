"""Search and retrieval metrics for embeddings, one module per job.

- `engines`: the search engines, one name each (`"exact_rank"`, `"exact"`,
  `"scann"`, `"scann_ah"`), and `nearest_neighbors`.
- `counting`: exact ranks of each query's best same-class item by one blocked
  matmul pass (Recall@K without top-K lists), shared tie rules.
- `metrics`: `recall_at_k`, `map_at_r`, `r_precision`, `retrieval_metrics`,
  `first_correct_ranks`,
  `metrics_from_neighbors`.
- `callback`: the `RetrievalEvaluation` Keras callback and `embed_dataset`.
- `inputs`: argument checks shared by all of them.
- `serving`: retrieval with a trained model, a SavedModel holding the embedding
  network, a ScaNN index and the gallery ids (`export_retrieval_model`,
  `load_retrieval_model`).
- `projector`: a TensorBoard Projector view of a gallery.
"""

from __future__ import annotations

from xbm_tf.retrieval.callback import RetrievalEvaluation, embed_dataset
from xbm_tf.retrieval.engines import (
    APPROXIMATE_ENGINES,
    ENGINES,
    EXACT_ENGINES,
    nearest_neighbors,
)
from xbm_tf.retrieval.metrics import (
    first_correct_ranks,
    map_at_r,
    metrics_from_neighbors,
    r_precision,
    recall_at_k,
    retrieval_metrics,
)
from xbm_tf.retrieval.projector import write_projector
from xbm_tf.retrieval.serving import (
    INDEX_TYPES,
    RetrievalModel,
    embed_gallery,
    export_retrieval_model,
    load_retrieval_model,
)

__all__ = [
    "APPROXIMATE_ENGINES",
    "ENGINES",
    "EXACT_ENGINES",
    "INDEX_TYPES",
    "RetrievalEvaluation",
    "RetrievalModel",
    "embed_dataset",
    "embed_gallery",
    "export_retrieval_model",
    "first_correct_ranks",
    "load_retrieval_model",
    "map_at_r",
    "metrics_from_neighbors",
    "nearest_neighbors",
    "r_precision",
    "recall_at_k",
    "retrieval_metrics",
    "write_projector",
]
