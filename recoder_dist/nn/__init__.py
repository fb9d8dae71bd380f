"""Models that Recoder trains: each registers itself by name (``registry``)."""

from recoder_dist.nn.autoencoder import DynamicAutoencoder
from recoder_dist.nn.base import FactorizationModel
from recoder_dist.nn.factorization import MatrixFactorization
from recoder_dist.nn.linear_embedding import LinearEmbedding
from recoder_dist.nn.multvae import MultVAE

__all__ = [
    "DynamicAutoencoder",
    "FactorizationModel",
    "LinearEmbedding",
    "MatrixFactorization",
    "MultVAE",
]
