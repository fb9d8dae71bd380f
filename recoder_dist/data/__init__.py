"""Data: the interaction matrices, their Ray Dataset form, and the negative-sampling collator."""

from recoder_dist.data.collator import Collator, SparseBatch, UserRows
from recoder_dist.data.dataset import RecommendationDataset

__all__ = ["Collator", "RecommendationDataset", "SparseBatch", "UserRows"]
