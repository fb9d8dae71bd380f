"""recoder_dist: Recoder's autoencoders and factorization models, trained on Ray."""

__version__ = "0.1.0"
