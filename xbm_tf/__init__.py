"""xbm-tf: Cross-Batch Memory for embedding learning, in Keras 3."""

from xbm_tf import data, distribute, losses, plots, retrieval
from xbm_tf.backbones import build_embedding_model
from xbm_tf.backup import TrainingBackup, fit_segments
from xbm_tf.export import export_embedding_model, load_exported_embedder
from xbm_tf.feature_drift import FeatureDrift
from xbm_tf.losses import ContrastiveLoss, MultiSimilarityLoss, TripletLoss
from xbm_tf.memory import CrossBatchMemory
from xbm_tf.model import XBMContrastiveModel
from xbm_tf.optimization import make_optimizer
from xbm_tf.retrieval import (
    RetrievalEvaluation,
    export_retrieval_model,
    load_retrieval_model,
    map_at_r,
    r_precision,
    recall_at_k,
)
from xbm_tf.terminate_on_nonfinite import TerminateOnNonFinite

__version__ = "0.1.0"

__all__ = [
    "ContrastiveLoss",
    "CrossBatchMemory",
    "FeatureDrift",
    "MultiSimilarityLoss",
    "RetrievalEvaluation",
    "TerminateOnNonFinite",
    "TrainingBackup",
    "TripletLoss",
    "XBMContrastiveModel",
    "__version__",
    "build_embedding_model",
    "data",
    "distribute",
    "export_embedding_model",
    "export_retrieval_model",
    "fit_segments",
    "load_exported_embedder",
    "load_retrieval_model",
    "losses",
    "make_optimizer",
    "map_at_r",
    "plots",
    "r_precision",
    "recall_at_k",
    "retrieval",
]
