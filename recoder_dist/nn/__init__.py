"""Models that Recoder trains."""

from recoder_dist.nn.autoencoder import DynamicAutoencoder
from recoder_dist.nn.base import FactorizationModel
from recoder_dist.nn.factorization import MatrixFactorization

__all__ = ["DynamicAutoencoder", "FactorizationModel", "MatrixFactorization"]
