"""Retrieval with a trained model: a SavedModel with a ScaNN index, a Projector view."""

from __future__ import annotations

from xbm_tf.retrieval.projector import write_projector
from xbm_tf.retrieval.serving import (
    INDEX_TYPES,
    RetrievalModel,
    embed_gallery,
    export_retrieval_model,
    load_retrieval_model,
)

__all__ = [
    "INDEX_TYPES",
    "RetrievalModel",
    "embed_gallery",
    "export_retrieval_model",
    "load_retrieval_model",
    "write_projector",
]
