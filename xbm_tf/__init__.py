"""xbm-tf: Cross-Batch Memory for embedding learning, in Keras 3."""

from xbm_tf import losses
from xbm_tf.losses import ContrastiveLoss, MultiSimilarityLoss, TripletLoss
from xbm_tf.memory import CrossBatchMemory
from xbm_tf.model import XBMContrastiveModel

__version__ = "0.1.0"

__all__ = [
    "ContrastiveLoss",
    "CrossBatchMemory",
    "MultiSimilarityLoss",
    "TripletLoss",
    "XBMContrastiveModel",
    "__version__",
    "losses",
]
