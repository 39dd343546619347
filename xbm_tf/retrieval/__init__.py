"""Retrieval with a trained model: the retrieval SavedModel (ScaNN index inside)."""

from __future__ import annotations

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
]
