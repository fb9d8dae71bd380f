"""Data: the interaction matrices, their Ray Dataset form, and the negative-sampling collator."""

from recoder_dist.data.collator import Collator, SparseBatch, UserRows
from recoder_dist.data.dataset import RecommendationDataset
from recoder_dist.data.loader import (
    Batch,
    BatchCollator,
    RecommendationDataLoader,
    UsersInteractions,
)
from recoder_dist.data.parquet_rows import UserRowFiles

__all__ = [
    "Batch",
    "BatchCollator",
    "Collator",
    "RecommendationDataLoader",
    "RecommendationDataset",
    "SparseBatch",
    "UserRowFiles",
    "UserRows",
    "UsersInteractions",
]
