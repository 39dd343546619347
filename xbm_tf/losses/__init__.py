"""Pair losses on a (query, key) signature: one function serves batch and memory."""

from xbm_tf.losses.base import PairLoss
from xbm_tf.losses.contrastive import ContrastiveLoss, contrastive_loss
from xbm_tf.losses.fused import fused_contrastive_loss
from xbm_tf.losses.multi_similarity import MultiSimilarityLoss, multi_similarity_loss
from xbm_tf.losses.triplet import TripletLoss, triplet_loss

__all__ = [
    "ContrastiveLoss",
    "MultiSimilarityLoss",
    "PairLoss",
    "TripletLoss",
    "contrastive_loss",
    "fused_contrastive_loss",
    "multi_similarity_loss",
    "triplet_loss",
]
