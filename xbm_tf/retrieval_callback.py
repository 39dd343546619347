"""The evaluation callback (moved): re-exports `xbm_tf.retrieval.callback`."""

from __future__ import annotations

from xbm_tf.retrieval.callback import RetrievalEvaluation, embed_dataset

__all__ = ["RetrievalEvaluation", "embed_dataset"]
