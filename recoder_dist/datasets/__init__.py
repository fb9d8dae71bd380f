"""Public datasets and evaluation splits."""

from recoder_dist.datasets.movielens import load_ml100k
from recoder_dist.datasets.splits import StrongSplit, strong_generalization_split

__all__ = ["StrongSplit", "load_ml100k", "strong_generalization_split"]
